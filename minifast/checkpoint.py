"""Atomic saving and safe loading of state files."""
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
from pathlib import Path

import torch

__all__ = ['atomic_save', 'load_state', 'check_state_dict', 'UnsafeCheckpointError']

# the process's umask, read once at import: reading it means setting it, which would race with threads creating files
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_save(obj, file):
    """torch.save `obj` to `file` through a temporary file in the same folder and os.replace.

    A write that fails (disk full, interrupt) leaves any previous file intact and no partial file behind.
    """
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{file.name}.', suffix='.tmp', dir=file.parent)
    try:
        # mkstemp makes the file readable by its owner only; give it the mode torch.save(file) would (0o666 less
        # the umask), so a checkpoint in a shared folder stays readable by whoever could read it before
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return file


def load_state(file, device=None):
    """Load a file written by `atomic_save` (or a plain state dict) with torch's weights-only unpickler.

    Only tensors and plain containers are accepted; nothing in the file is ever run. A file holding pickled code or
    objects raises `UnsafeCheckpointError`, a truncated or corrupt one ValueError, a missing one FileNotFoundError.
    Files ending in `.safetensors` are read with the optional `safetensors` package.
    """
    file = Path(file)
    if not file.exists():
        pattern = '*.safetensors' if file.suffix == '.safetensors' else '*.pth'
        near = sorted(p.name for p in file.parent.glob(pattern)) if file.parent.exists() else []
        raise FileNotFoundError(f"no such file: {file}" + (f" (files there: {', '.join(near)})" if near else ''))
    if file.suffix == '.safetensors':
        return _load_safetensors(file, device)
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights only load failed' in str(e).lower() or 'unsupported global' in str(e).lower():
            what, readable = _refused_global(e, file)
            if what or readable:  # a well-formed pickle that torch refused
                m = re.search(r'Unsupported operand \d+', str(e))
                raise UnsafeCheckpointError(file, what, m.group(0) if m else None) from None
        raise _corrupt(file, e) from e
    except Exception as e:
        if device is not None and isinstance(e, RuntimeError) and ('device' in str(e) or 'cuda' in str(e).lower()):
            raise ValueError(f'{file} could not be loaded onto device {device}: {e}') from e
        raise _corrupt(file, e) from e


def check_state_dict(model, sd, file, strict=True):
    """Raise, naming `file` and the mismatched keys/shapes, unless `sd` loads into `model` cleanly."""
    if not isinstance(sd, dict):
        raise ValueError(f'{file} holds a {type(sd).__name__}, not a state dict')
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f'{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}'
              for k, v in own.items() if k in sd and hasattr(sd[k], 'shape') and sd[k].shape != v.shape]
    problems = []
    if strict and missing:
        problems.append(f'missing keys {missing[:5]}' + (f' and {len(missing) - 5} more' if len(missing) > 5 else ''))
    if strict and unexpected:
        problems.append(f'unexpected keys {unexpected[:5]}' + (f' and {len(unexpected) - 5} more'
                                                                 if len(unexpected) > 5 else ''))
    if shapes:
        problems.append('shape mismatch ' + '; '.join(shapes[:5]))
    if problems:
        raise ValueError(f'{file} does not match the model ({type(model).__name__}): ' + '; '.join(problems)
                         + '. The model was left unchanged.')


class UnsafeCheckpointError(ValueError):
    """A state file that holds pickled code or objects, which `load_state` refuses to unpickle."""

    def __init__(self, file, what=None, reason=None):
        self.file, self.what = Path(file), what
        found = (f'it refers to {what}' if what else f'it uses pickle opcodes ({reason})' if reason
                 else 'it holds pickled code or objects')
        super().__init__(
            f'{file}: refused to load: {found}, which torch\'s weights-only unpickler does not allow. minifast '
            f'loads tensors and plain containers (dict, list, tuple, numbers, strings) only and never runs code '
            f'from a file. If you trust where the file came from, load it yourself with '
            f'torch.load({os.fspath(file)!r}, weights_only=False) and pass on the state dict it holds.')


# torch names the refused global in one of these forms, depending on the version and on why it was refused
_GLOBAL_RES = (re.compile(r'unsupported GLOBAL ([\w.]+) whose module'),
               re.compile(r'Unsupported global: GLOBAL ([\w.]+) was not'),
               re.compile(r'GLOBAL ([\w.]+)'))
_OS_MODULES = {'posix': 'os', 'nt': 'os'}


def _name_global(name):
    """'eval' -> 'builtins.eval'; 'posix.system' -> 'posix.system (os.system)'."""
    if '.' not in name:
        return f'builtins.{name}'
    mod, _, rest = name.partition('.')
    return f'{name} ({_OS_MODULES[mod]}.{rest})' if mod in _OS_MODULES else name


def _refused_global(err, file):
    """(the global torch refused or None, whether the file's pickle reads cleanly).

    The global comes from torch's message, or else from reading (never running) the file's pickle opcodes.
    """
    for msg in (str(err), str(err.__cause__ or '')):
        for r in _GLOBAL_RES:
            m = r.search(msg)
            if m:
                return _name_global(m.group(1)), True
    found, readable = _scan_globals(file)
    return (_name_global(found) if found else None), readable


def _pickle_bytes(file, limit=64 << 20):
    """The pickle stream of a torch zip file (its data.pkl) or of a plain pickle file, at most `limit` bytes."""
    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as z:
            names = [n for n in z.namelist() if n.endswith('data.pkl')]
            if not names:
                return b''
            with z.open(names[0]) as f:
                return f.read(limit)
    with open(file, 'rb') as f:
        return f.read(limit)


def _scan_globals(file):
    """(the first global outside torch and collections that the file's pickle names, or None; whether it parsed).

    pickletools only decodes the opcodes; nothing is imported or called.
    """
    safe = ('torch', 'collections', '_codecs', 'numpy')
    found, memo, strings = None, {}, []
    try:
        for op, arg, _ in pickletools.genops(_pickle_bytes(file)):
            if op.name in ('GLOBAL', 'INST'):
                name = '.'.join(str(arg).split(' ', 1))
            elif op.name == 'STACK_GLOBAL' and len(strings) >= 2:
                name = f'{strings[-2]}.{strings[-1]}'
            else:
                if isinstance(arg, str) and 'UNICODE' in op.name:
                    strings.append(arg)
                elif op.name == 'MEMOIZE' and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ('PUT', 'BINPUT', 'LONG_BINPUT') and strings:
                    memo[arg] = strings[-1]
                elif op.name in ('GET', 'BINGET', 'LONG_BINGET') and arg in memo:
                    strings.append(memo[arg])
                continue
            if found is None and name.split('.', 1)[0] not in safe:
                found = name
    except Exception:  # not a pickle, or a cut one: report what was found, if anything
        return found, False
    return found, True


def _corrupt(file, err):
    """ValueError for a file torch cannot read: truncated, corrupt, or not a torch file at all."""
    try:
        size = f'{file.stat().st_size} bytes'
    except OSError:
        size = 'unknown size'
    detail = f'{type(err).__name__}: {err}' if str(err) else type(err).__name__
    if file.is_dir():
        return ValueError(f'{file} is a folder, not a state file')
    return ValueError(f'{file} ({size}) is truncated or not a torch file (for example an interrupted copy or '
                      f'download, or a file of another kind): torch.load failed with {detail}. Save it again, or '
                      f'copy it again from its source.')


def _load_safetensors(file, device=None):
    """A .safetensors file as a dict of tensors, through the optional `safetensors` package."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(f'{file} is a .safetensors file, and reading it needs the `safetensors` package, which is '
                          f'not installed: pip install safetensors') from None
    try:
        return load_file(os.fspath(file), device='cpu' if device is None else str(device))
    except Exception as e:
        raise _corrupt(file, e) from e
