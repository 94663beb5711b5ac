"""`learn.export`: a trained model as a folder holding its weights (minifast's checksummed format, or safetensors)
and a JSON manifest saying how to build it again, with no pickle; and the reading side `read_export`, which never
imports a module that neither minifast nor its caller trusts (`load_learner` in minifast.exported builds on it).

The manifest (manifest.json) holds: the format and its version, the minifast and torch versions, the model's
factory ('package.module:name') and its keyword arguments, the data's input_spec() (classes, size, crop, stats...),
the loss (an importable function, or a torch loss class and its constructor arguments) and its activation, the
precision, and the weights file's name, byte size, sha256 and number of state-dict keys.
"""
import hashlib
import importlib
import inspect
import json
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .checkpoint import atomic_save, check_state_dict, load_state, pid_alive
from .data.core import DataBunch
from .data.images import ImageDataBunch
from .inference import ACTIVATIONS, activation_name
from .models.factory import importable_name, is_recorded_factory, json_args, model_spec

__all__ = ['export', 'read_export', 'bare_model', 'ExportError', 'UnsafeExportError', 'CorruptExportError',
           'NoTrainingData', 'FORMAT', 'FORMAT_VERSION', 'TRUSTED']

FORMAT, FORMAT_VERSION = 'minifast-export', 1
MANIFEST = 'manifest.json'
WEIGHTS = {'minifast': 'weights.pth', 'safetensors': 'weights.safetensors'}
# the modules whose model functions, model classes and losses a manifest may name without the caller's trust=
TRUSTED = ('minifast', 'torchvision.models', 'torch.nn')
# factory arguments that would fetch weights (a download, or a file named by the manifest): the export has them
_WEIGHT_ARGS = ('pretrained', 'weights', 'weights_backbone')
_MODULE = re.compile(r'^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$')


class ExportError(ValueError):
    """An export that cannot be written, or read back, as asked; `file` is the file or folder concerned."""

    def __init__(self, file, message):
        self.file = Path(file)
        super().__init__(f'{file}: {message}')


class UnsafeExportError(ExportError):
    """An export whose manifest names code that load_learner does not trust (and so never imports)."""


class CorruptExportError(ExportError):
    """An export whose files are not the ones written: a changed weights file, a broken manifest, weights that do
    not fit the model."""


def bare_model(model):
    """`model` without the wrappers of a fit: torch.compile's, DistributedDataParallel's, DataParallel's."""
    while True:
        if isinstance(getattr(model, '_orig_mod', None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


# ---- writing -------------------------------------------------------------------------------------------------
def export(learn, file='export', factory=None, args=None, format=None):
    """Write what inference needs to the folder learn.path/file (an absolute `file` is used as it is): the model's
    weights (on CPU, unwrapped) and manifest.json (how to build the model, the data's input spec, the loss and its
    activation). No pickle: `load_learner(learn.path, file)` builds the learner again in another process.

    Args:
        file: the export folder (fastai v1's 'export.pkl' names a folder too). An export already there is replaced
            atomically: an error or Ctrl-C while writing leaves it as it was, with no temporary folder behind.
        factory: how to build the model, when minifast did not record it (a model class of your own): an importable
            function or class, or its name 'package.module:name'. `args`: its keyword arguments (JSON values).
        format: None or 'minifast' (minifast's checksummed torch file), or 'safetensors' (needs the package).

    Returns the folder's path.
    """
    fmt = 'minifast' if format is None else format
    if fmt not in WEIGHTS:
        raise ValueError(f"export: format must be None, 'minifast' or 'safetensors', got {format!r}")
    if fmt == 'safetensors':
        _safetensors()  # before anything is built: a missing package is the first thing to say
    folder = Path(file) if Path(file).is_absolute() else Path(learn.path) / file
    _check_replaceable(folder)
    model = bare_model(learn.model)
    spec = _model_entry(model, factory, args, folder)
    data_spec = _data_entry(learn.data, folder)
    loss = _loss_entry(learn.loss_func)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    check = _build(spec, None, f'export to {folder}')  # what load_learner will build must take these weights
    try:
        check_state_dict(check, sd, f'the model built by {_call(spec)}')
    except ValueError as e:
        raise ExportError(folder, f'cannot export: {e}. The learner\'s model ({type(model).__qualname__}) is not '
                                  f'what its factory builds (was it changed after it was built?): pass factory= and '
                                  f'args= that build it') from None
    manifest = {'format': FORMAT, 'version': FORMAT_VERSION, 'minifast': __version__, 'torch': torch.__version__,
                'model': {**spec, 'class': type(model).__qualname__}, 'data': data_spec, 'loss': loss,
                'precision': learn.stepper.precision}
    _write(folder, manifest, sd, fmt)
    return folder


def _call(spec):
    """'pkg.mod:f(a=1, b=2)': a factory call, for messages."""
    return f"{spec['factory']}({', '.join(f'{k}={v!r}' for k, v in spec['args'].items())})"


def _code(spec):
    """'from pkg.mod import f; model = f(a=1)': the Python that builds the model of `spec`, for messages."""
    mod, _, name = spec['factory'].partition(':')
    args = ', '.join(f'{k}={v!r}' for k, v in spec['args'].items())
    return f'from {mod} import {name}; model = {name}({args})'


def _model_entry(model, factory, args, folder):
    """{'factory': 'pkg.mod:name', 'args': {...}}: given, or recorded on the model when it was built."""
    if factory is None:
        if args is not None:
            raise ExportError(folder, 'export: args= was given without factory=; pass the function or class that '
                                      'builds the model with these keyword arguments as factory=')
        spec, reason = model_spec(model)
        if spec is None:
            raise ExportError(folder, f'cannot export the model ({type(model).__qualname__} from '
                                      f'{type(model).__module__}): {reason}. Pass factory= (an importable function '
                                      f"or class that builds it, or its name 'package.module:name') and args= (its "
                                      f"keyword arguments as JSON values): learn.export(factory=MyNet, args={{'n': "
                                      f'10}}). A class defined in a notebook or a script cannot be imported by '
                                      f'another process: move it into a .py module first')
    else:
        try:
            name = factory if isinstance(factory, str) else importable_name(factory)
        except ValueError as e:
            raise ExportError(folder, f'export: factory={factory!r} cannot be named for load_learner: {e}') from None
        try:
            spec = {'factory': name, 'args': json_args({} if args is None else args, 'export: args')}
        except ValueError as e:
            raise ExportError(folder, str(e)) from None
    fetch = [k for k in _WEIGHT_ARGS if spec['args'].get(k) not in (None, False)]
    if fetch:
        raise ExportError(folder, f"export: the factory's arguments ask for weights ({', '.join(fetch)}); the "
                                  f'export carries them: pass {fetch[0]}=None or False')
    return spec


def _data_entry(data, folder):
    spec_fn = getattr(data, 'input_spec', None)
    if spec_fn is None:
        raise ExportError(folder, f'cannot export: the learner\'s data ({type(data).__name__}) has no input_spec(), '
                                  f'which says what the model\'s inputs are; use a DataBunch or an ImageDataBunch')
    try:
        return json.loads(json.dumps(spec_fn(), allow_nan=False))
    except ValueError as e:
        raise ExportError(folder, f'cannot export the data\'s input spec: {e}') from None


def _loss_entry(loss_func):
    """{'function': name} or {'class': name, 'kwargs': {...}}, with its activation; or {'reason': why not}."""
    entry = {}
    try:
        if isinstance(loss_func, nn.Module):
            cls = type(loss_func)
            params = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                      if p.name != 'self' and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            kwargs = {k: getattr(loss_func, k) for k in params if hasattr(loss_func, k)}
            entry = {'class': importable_name(cls), 'kwargs': json_args(kwargs, f'the loss {cls.__name__}\'s')}
        else:
            entry = {'function': importable_name(loss_func)}
    except ValueError as e:
        name = getattr(loss_func, '__name__', type(loss_func).__name__)
        entry = {'reason': f'the loss function {name} cannot be recorded: {e}'}
        warnings.warn(f"export: {entry['reason']}. The loaded learner predicts as this one does, but computes no "
                      f'loss (with_loss=True, validate, fit)')
    entry['activation'] = activation_name(loss_func)
    return entry


def _safetensors():
    try:
        import safetensors.torch  # an optional extra: only this format needs it
    except ImportError:
        raise ImportError("export(format='safetensors') needs the `safetensors` package, which is not installed: "
                          "pip install safetensors (or use the default format)") from None
    return safetensors.torch


def _sha256(file):
    h = hashlib.sha256()
    with open(file, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _check_replaceable(folder):
    """An existing `folder` is replaced only when it is an export (nothing but an export's files in it)."""
    if not (folder.exists() or folder.is_symlink()):
        return
    if not folder.is_dir() or folder.is_symlink():
        raise ExportError(folder, 'export: a file (not an export folder) is there; remove it or export elsewhere')
    other = sorted(p.name for p in folder.iterdir() if p.name not in (MANIFEST, *WEIGHTS.values()))
    if other or not (folder / MANIFEST).exists():
        raise ExportError(folder, f"export: this folder is not an export (it holds {other or 'no manifest.json'}); "
                                  f'it was left as it is: remove it or export elsewhere')


def _temp_name(folder, kind):
    return folder.parent / f'.{folder.name}.p{os.getpid()}.{secrets.token_hex(4)}.{kind}'


def _stale(folder, name):
    """'tmp' or 'old' when `name` is a temporary folder of an export to `folder` whose process is gone, else None."""
    m = re.match(rf'^\.{re.escape(folder.name)}\.p(\d+)\.[0-9a-f]{{8}}\.(tmp|old)$', name)
    return None if m is None or pid_alive(int(m.group(1))) else m.group(2)


def _clean_stale(folder):
    """The temporary folders of an export whose process was killed: a previous export moved aside in the instant
    before the new one took its place is put back; a half-written new one is removed."""
    try:
        entries = sorted(folder.parent.iterdir(), key=lambda p: p.name.endswith('.tmp'))
    except OSError:
        return
    for p in entries:
        kind = _stale(folder, p.name)
        if kind == 'old' and not folder.exists():
            os.rename(p, folder)
        elif kind is not None:
            shutil.rmtree(p, ignore_errors=True)


def _write(folder, manifest, sd, fmt):
    """Write the export into a temporary folder next to `folder`, then swap it in."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(folder)
    tmp = _temp_name(folder, 'tmp')
    os.mkdir(tmp)  # with the process's umask, like any folder the user makes
    try:
        wfile = tmp / WEIGHTS[fmt]
        if fmt == 'safetensors':
            # safetensors wants contiguous tensors that share no memory (tied weights do)
            _safetensors().save_file({k: v.contiguous().clone() for k, v in sd.items()}, os.fspath(wfile),
                                     metadata={'format': FORMAT})
        else:
            atomic_save(sd, wfile)
        manifest['weights'] = {'file': wfile.name, 'format': fmt, 'bytes': wfile.stat().st_size,
                               'sha256': _sha256(wfile), 'keys': len(sd)}
        text = json.dumps(manifest, indent=1, allow_nan=False) + '\n'
        with open(tmp / MANIFEST, 'w', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp, folder):
    """Put the finished folder `tmp` at `folder`; an existing export there is moved aside first and removed after,
    or put back if the swap fails."""
    old = _temp_name(folder, 'old') if folder.exists() else None
    if old is not None:
        os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except BaseException:
        if old is not None and not folder.exists():
            os.rename(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- reading -------------------------------------------------------------------------------------------------
def export_folder(path, file):
    """The export folder of load_learner(path, file): path/file, or `file` when absolute (or `path` when None)."""
    if file is None:
        return Path(path)
    return Path(file) if Path(file).is_absolute() else Path(path) / file


def read_export(folder, device='cpu', trust=()):
    """(model with the export's weights, data from its input spec, loss function, manifest) of the export in
    `folder`, checked: see load_learner. Nothing outside minifast, torchvision.models, torch.nn and the `trust`
    module prefixes is imported."""
    folder = Path(folder)
    trust = _trust(trust)
    manifest = read_manifest(folder)
    mfile = folder / MANIFEST
    _resolve_spec(manifest['model'], trust, mfile)  # an untrusted factory is refused before anything is read
    wfile = folder / manifest['weights']['file']
    sd = _read_weights(wfile, manifest['weights'])
    model = _build(manifest['model'], trust, mfile)
    try:
        check_state_dict(model, sd, wfile)
    except ValueError as e:
        raise CorruptExportError(wfile, f'its weights do not fit the model that {manifest["model"]["factory"]} '
                                        f'builds: {e}') from None
    model.load_state_dict(sd, strict=True)
    model.eval()
    data = _data_from_spec(manifest['data'], device, mfile)
    data.train_dl = NoTrainingData(data.train_dl, folder, manifest)
    return model, data, _loss(manifest['loss'], trust, mfile), manifest


def _trust(trust):
    trust = (trust,) if isinstance(trust, str) else tuple(trust or ())
    bad = [t for t in trust if not (isinstance(t, str) and _MODULE.match(t))]
    if bad:
        raise ValueError(f"load_learner: trust= takes module names ('mypackage', 'mypackage.models'), got {bad}")
    return trust


def _under(mod, prefixes):
    return any(mod == p or mod.startswith(p + '.') for p in prefixes)


_FIELDS = {'format': str, 'version': int, 'model': dict, 'data': dict, 'loss': dict, 'weights': dict}


def read_manifest(folder):
    """The manifest of the export in `folder`, checked for its fields (CorruptExportError naming what is wrong)."""
    folder = Path(folder)
    mfile = folder / MANIFEST
    if not folder.is_dir():
        if folder.is_file():
            raise ExportError(folder, 'this is a file, not a minifast export folder (a fastai export.pkl is a '
                                      'pickle, which minifast never loads); export the model again with minifast')
        near = sorted(p.name for p in folder.parent.iterdir() if (p / MANIFEST).exists()) \
            if folder.parent.is_dir() else []
        aside = [n for n in near if _stale(folder, n) == 'old']
        if aside:  # an export killed while swapping folders moved the previous one there
            raise FileNotFoundError(f'no export folder {folder}, but {folder.parent / aside[0]} holds the export an '
                                    f'interrupted export moved aside: rename it to {folder.name} (or export again)')
        raise FileNotFoundError(f'no export folder {folder}' + (f' (exports there: {", ".join(near)})' if near
                                                                 else ''))
    try:
        text = mfile.read_text(encoding='utf-8')
    except FileNotFoundError:
        raise CorruptExportError(mfile, 'missing: the folder holds no manifest.json, so it is not an export (or '
                                        'its export was cut short)') from None
    except UnicodeDecodeError as e:
        raise CorruptExportError(mfile, f'not UTF-8 text ({e})') from None
    try:
        m = json.loads(text)
    except ValueError as e:
        raise CorruptExportError(mfile, f'not valid JSON ({e})') from None
    if not isinstance(m, dict):
        raise CorruptExportError(mfile, f'holds a JSON {type(m).__name__}, not an object')
    wrong = [f'{k} (a {t.__name__})' for k, t in _FIELDS.items() if not isinstance(m.get(k), t)]
    if wrong:
        raise CorruptExportError(mfile, f"fields missing or of the wrong type: {', '.join(wrong)}")
    if m['format'] != FORMAT:
        raise CorruptExportError(mfile, f'format {m["format"]!r} is not {FORMAT!r}')
    if m['version'] > FORMAT_VERSION:
        raise CorruptExportError(mfile, f'written by minifast {m.get("minifast")} in export format {m["version"]}; '
                                        f'this minifast ({__version__}) reads up to {FORMAT_VERSION}: upgrade it')
    model, w, loss = m['model'], m['weights'], m['loss']
    checks = [('model.factory', isinstance(model.get('factory'), str)),
              ('model.args', isinstance(model.get('args'), dict)),
              ('data.kind', m['data'].get('kind') in ('image', 'tensor')),
              ('loss.activation', loss.get('activation') in ACTIVATIONS),
              ('weights.file', w.get('file') in WEIGHTS.values()),  # a bare known name: no path leaves the folder
              ('weights.bytes', isinstance(w.get('bytes'), int) and w['bytes'] >= 0),
              ('weights.sha256', isinstance(w.get('sha256'), str) and re.fullmatch('[0-9a-f]{64}', w['sha256'])),
              ('weights.keys', isinstance(w.get('keys'), int))]
    wrong = [k for k, ok in checks if not ok]
    if wrong:
        raise CorruptExportError(mfile, f"fields missing or invalid: {', '.join(wrong)}")
    return m


def _resolve(name, trust, what, where, role):
    """The function or class `name` ('package.module:name') names, imported only when its module is trusted
    (TRUSTED, or a prefix in `trust`); UnsafeExportError naming it otherwise. role: 'model' or 'loss'."""
    mod, sep, attr = name.partition(':') if isinstance(name, str) else ('', '', '')
    if not (sep and _MODULE.match(mod) and attr.isidentifier() and not attr.startswith('_')):
        raise UnsafeExportError(where, f"{what} {name!r} is not an importable name 'package.module:name'")
    everything = trust is None  # export checking what its own caller named: nothing to refuse
    trust = () if everything else trust
    ok = TRUSTED + trust
    if not everything and not _under(mod, ok):
        raise UnsafeExportError(where, f'{what} {name} is outside the modules load_learner trusts '
                                       f'({", ".join(ok)}), so it was not imported. If you trust this export and '
                                       f"{mod}, pass trust=('{mod.split('.')[0]}',)")
    try:
        obj = getattr(importlib.import_module(mod), attr, None)
    except ImportError as e:
        raise ExportError(where, f'{what} {name}: its module cannot be imported ({e})') from None
    if obj is None or not callable(obj):
        raise ExportError(where, f'{what} {name}: {mod} has no function or class {attr}')
    home = getattr(obj, '__module__', None) or ''
    if everything:
        return obj
    if not _under(home, ok):  # a name imported into a trusted module from elsewhere (os.system...)
        raise UnsafeExportError(where, f'{what} {name} is {home}.{getattr(obj, "__qualname__", attr)}, outside the '
                                       f'trusted modules ({", ".join(ok)})')
    if not _under(mod, trust) and not _fits(obj, role):
        kind = 'model function or model class' if role == 'model' else 'loss function or loss class'
        raise UnsafeExportError(where, f'{what} {name} is not a {kind} of {mod}; pass trust=(\'{mod}\',) if you '
                                       f'trust this export to call it')
    return obj


def _fits(obj, role):
    """Whether `obj`, from a module trusted by default, is what a manifest may name in `role`."""
    if isinstance(obj, type):
        return issubclass(obj, nn.Module)
    if role == 'loss':
        return obj.__module__ == 'torch.nn.functional'
    if is_recorded_factory(obj):
        return True
    if obj.__module__.startswith('torchvision.models'):
        import torchvision.models as tvm  # only for a manifest naming torchvision: it costs a second to import
        return obj.__name__ in tvm.list_models() and tvm.get_model_builder(obj.__name__) is obj
    return False


def _resolve_spec(spec, trust, where):
    """(factory, keyword arguments with the importable ones resolved) of a model spec."""
    fn = _resolve(spec['factory'], trust, 'the model factory', where, 'model')
    args = dict(spec['args'])
    fetch = [k for k in _WEIGHT_ARGS if args.get(k) not in (None, False)]
    if fetch:
        raise UnsafeExportError(where, f"the model factory's arguments ask for weights ({fetch[0]}="
                                       f'{args[fetch[0]]!r}); an export carries its own and load_learner fetches '
                                       f'none')
    for k in getattr(fn, 'recorded_importable', ()):
        if isinstance(args.get(k), str) and ':' in args[k]:  # 'pkg.mod:name'; a bare name (timm's) is passed as is
            args[k] = _resolve(args[k], trust, f"{spec['factory']}'s argument {k}", where, 'model')
    return fn, args


def _build(spec, trust, where):
    """The model `spec` describes, built on CPU without touching the global RNG. trust=None (export's own check):
    everything the spec names is trusted, as the caller named it."""
    fn, args = _resolve_spec(spec, trust, where)
    try:
        with torch.random.fork_rng(devices=[]):  # initialisation draws numbers the caller's run must not lose
            model = fn(**args)
    except Exception as e:
        raise ExportError(where, f'{_call(spec)} failed: {type(e).__name__}: {e}') from e
    if not isinstance(model, nn.Module):
        raise ExportError(where, f'{_call(spec)} returned a {type(model).__name__}, not an nn.Module')
    return model


def _read_weights(wfile, entry):
    """The state dict in `wfile`, after its size and sha256 are checked against the manifest's `entry`."""
    if not wfile.is_file():
        raise CorruptExportError(wfile, 'missing: the manifest names it but the export folder does not hold it')
    size = wfile.stat().st_size
    if size != entry['bytes']:
        raise CorruptExportError(wfile, f'{size} bytes, but the manifest says {entry["bytes"]}: the file changed '
                                        f'after the export (a cut copy?); export the model again')
    digest = _sha256(wfile)
    if digest != entry['sha256']:
        raise CorruptExportError(wfile, f'sha256 {digest}, but the manifest says {entry["sha256"]}: the file '
                                        f'changed after the export; export the model again')
    sd = load_state(wfile)  # weights-only (and for minifast's format, its own checksum)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CorruptExportError(wfile, 'does not hold a state dict of tensors')
    if len(sd) != entry['keys']:
        raise CorruptExportError(wfile, f'{len(sd)} tensors, but the manifest says {entry["keys"]}')
    return sd


def _data_from_spec(spec, device, where):
    cls = ImageDataBunch if spec['kind'] == 'image' else DataBunch
    try:
        return cls.from_spec(spec, device=device)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptExportError(where, f'its data spec cannot be used ({type(e).__name__}: {e})') from None


def _loss(entry, trust, where):
    """The loss function an entry of the manifest names; a stand-in when the export could not record it."""
    if 'function' in entry:
        return _resolve(entry['function'], trust, 'the loss function', where, 'loss')
    if 'class' in entry:
        cls = _resolve(entry['class'], trust, 'the loss class', where, 'loss')
        kwargs = entry.get('kwargs', {})
        if not isinstance(kwargs, dict):
            raise CorruptExportError(where, 'loss.kwargs is not an object')
        try:
            return cls(**kwargs)
        except Exception as e:
            raise ExportError(where, f"the loss {entry['class']}(**{kwargs}) failed: {type(e).__name__}: {e}") \
                from None
    base = {'softmax': _UnrecordedSoftmaxLoss, 'sigmoid': _UnrecordedSigmoidLoss}.get(entry['activation'],
                                                                                      _UnrecordedLoss)
    return base(entry.get('reason', 'the export recorded no loss'))


class _UnrecordedLoss(nn.Module):
    """Stands in for a loss the export could not record: predictions work, computing a loss says why not."""

    def __init__(self, reason):
        super().__init__()
        self.reason = reason

    def forward(self, *args, **kwargs):
        raise RuntimeError(f'this learner was loaded from an export without its loss ({self.reason}); set '
                           f'learn.loss_func to compute losses')


# subclasses of torch's losses so that inference applies the same activation (softmax, sigmoid) as the original
class _UnrecordedSoftmaxLoss(nn.CrossEntropyLoss):
    __init__, forward = _UnrecordedLoss.__init__, _UnrecordedLoss.forward


class _UnrecordedSigmoidLoss(nn.BCEWithLogitsLoss):
    __init__, forward = _UnrecordedLoss.__init__, _UnrecordedLoss.forward


class NoTrainingData:
    """The training loader of a learner loaded from an export, which has no training data: iterating it, or asking
    its length (fit, lr_find), raises an error saying how to get a learner that trains."""

    def __init__(self, dl, folder, manifest):
        self.dataset, self.batch_size, self.drop_last = dl.dataset, dl.batch_size, True
        self.folder, self.manifest = folder, manifest

    def message(self):
        w = self.manifest['weights']
        file = Path(self.folder) / w['file']
        load = (f"learn.load({os.fspath(file)!r})" if w['format'] == 'minifast' else
                f"learn.model.load_state_dict(safetensors.torch.load_file({os.fspath(file)!r}))")
        return (f'this learner was loaded from the export {self.folder} and holds no training data, so it '
                f'predicts but cannot train. To train this model further, build a Learner with your data and the '
                f'same model, then load the exported weights: {_code(self.manifest["model"])}; '
                f'learn = Learner(data, model); {load}')

    def __len__(self):
        raise ValueError(self.message())

    def __iter__(self):
        raise ValueError(self.message())

    def __repr__(self):
        return f'NoTrainingData(export {self.folder})'
