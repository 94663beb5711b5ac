"""`minifast smith`: Leslie Smith's hyper-parameter workflow (seed 004) end to end, resumable.

Steps (one function each; `run(args)` chains them):
  1. data        - the DataBunch and a batch of it (batch.png)
  2. lr_find     - LR range test (lr_find.png); max_lr = lr_find's max_lr (cached in lr_find.json)
  3. superconv   - grid: 1cycle at max_lr vs a constant lr of max_lr/10, same epochs (superconvergence.png)
  4. momentum    - grid: moms (0.95, 0.85) vs (0.99, 0.90) (momentum.png)
  5. weight decay- grid: 1e-3, 1e-4, 1e-5, 0, then the half-decade neighbours of the best non-zero value
                   (wd.png, wd_fine.png)
  6. final       - fit_one_cycle with the choices, weight snapshots and checkpoints (final_*.png)
  7. interpolate - losses between two snapshots of the final run (interpolation.png, interpolation.json)
and report.md, which embeds every plot and says what was chosen and why. Every training run (grids and final) is
a record of runs.jsonl; a second invocation reuses those records and caches and trains only what is missing.
"""
import hashlib
import importlib.util
import json
import math
import os
import re
import secrets
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager, suppress
from numbers import Number
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from .callbacks.snapshots import WeightSnapshots
from .callbacks.trackers import MLflowLogger, TensorBoardLogger, WandbLogger
from .callbacks.tracking import Checkpoint
from .checkpoint import load_state, pid_alive
from .data import ImageList, cifar10, cifar100, cifar_transforms, get_transforms, synthetic_cifar
from .determinism import set_seed
from .distributed import launched
from .grid import (GridResult, append_record, as_shown, grid_search, logged_runs, plain, read_log, run_key,
                   run_record, run_records, split_config, tracked)
from .search import publish, search, wait_for, worker_id
from .landscape import BN_MODES, InterpolationResult, interpolate_losses, plot_interpolation
from .core import DivergenceError
from .learner import Learner
from .lock import FolderLockedError, acquire, release
from .data.cache import ImageDecodeError
from .data.datasets import DatasetNotFoundError
from .metrics import accuracy, top_k_accuracy
from .models import cifar_resnet
from .optim import least_acting_wd
from .resume import checkpoint_info, find_checkpoint, is_finished
from .options import add_arguments, refuse_small, worker_argv  # re-exported: smith.add_arguments was their home

__all__ = ['run', 'add_arguments', 'SIZES', 'make_data', 'model_fn', 'learner_factory', 'save_plot', 'make_tracker',
           'replace_with', 'local_workers']

# sizes per mode: the built-in default (< 5 minutes on a 2-core CPU), --quick (tests), and a real dataset
SIZES = {
    'default': dict(n_train=4000, n_valid=1000, bs=64, epochs=8, grid_epochs=2, num_it=100, interp_points=17,
                    interp_batches=4, arch='resnet8', seeds=2),
    'quick': dict(n_train=96, n_valid=64, bs=32, epochs=3, grid_epochs=2, num_it=12, interp_points=5,
                  interp_batches=1, arch='resnet8', seeds=1),
    'real': dict(n_train=None, n_valid=None, bs=256, epochs=15, grid_epochs=2, num_it=100, interp_points=41,
                 interp_batches=8, arch='resnet56', seeds=2),
}
MOMS = [(0.95, 0.85), (0.99, 0.90)]
WDS = [1e-3, 1e-4, 1e-5, 0.]
CONST_DIV = 10      # the constant-lr run of step 3 uses max_lr / CONST_DIV
FALLBACK_LR = 1e-2  # when lr_find suggests nothing
LR_RULE = 'max_lr-1'  # the version of lr_find's max_lr rule: part of lr_find.json's key, so a change recomputes it


# ----------------------------------------------------------------------------------------------------- helpers
def _say(*a):
    print('smith:', *a, flush=True)


def _sizes(args):
    mode = 'quick' if args.quick else 'real' if args.data else 'default'
    s = dict(SIZES[mode])
    for k in s:
        v = getattr(args, k, None)
        if v is not None:
            s[k] = v
    # else a step fails much later, e.g. `--epochs 1` at step 7
    refuse_small('smith', s, epochs=(2, 'step 7 interpolates between two snapshots of the final fit'), grid_epochs=1,
                 bs=1, num_it=2, n_train=1, n_valid=1, seeds=1)
    return s


def replace_with(file, write):
    """Call `write(tmp)` on a temporary path of this call's own in `file`'s folder (two writers never share one),
    then atomically replace `file` with it: `file` is the old or the new one, never a mix (an interrupt never
    leaves half a file), and a failed write leaves no temporary file."""
    file = Path(file)
    tmp = file.parent / f'.{file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp'
    try:
        write(tmp)
        os.replace(tmp, file)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


def _save(fig, file):
    """Write `fig` to `file` (its format from the suffix) through replace_with, and close it."""
    try:
        replace_with(file, lambda tmp: fig.savefig(tmp, format=Path(file).suffix[1:], dpi=90, bbox_inches='tight'))
    finally:
        plt.close(fig)


def save_plot(fig, file, title):
    """Title `fig` (its only axes, else the figure), then write it to `file` as _save does."""
    if len(fig.axes) == 1:
        fig.axes[0].set_title(title)
    else:
        fig.suptitle(title)
        fig.tight_layout()  # makes room for the suptitle above the axes' own titles
    _save(fig, file)


def make_tracker(kind, out, name, cmd='smith'):
    """The tracker --tracker `kind` names, writing beside the run folder `out`: TensorBoard in OUT/tensorboard,
    MLflow in sqlite:///OUT/mlflow.db (or MLFLOW_TRACKING_URI) under the experiment `name`, W&B under OUT (offline
    unless WANDB_MODE says otherwise), one run (or folder) per invocation, holding every run of it (those reused
    from runs.jsonl replayed); None for None. A missing library exits with the line that installs it."""
    if kind is None:
        return None
    if importlib.util.find_spec(kind) is None:  # the logger imports it at its first write: say so before training
        raise SystemExit(f'{cmd}: --tracker {kind}: the {kind} package is not installed; pip install minifast[track]')
    if kind == 'tensorboard':
        # one folder per invocation: a second one replays the reused runs, which must not add to the first's
        # (made here, with a suffix when taken: a reused invocation can start within the second of the last)
        stamp, n = time.strftime('%Y%m%d-%H%M%S'), 1
        while True:
            folder = out / 'tensorboard' / (stamp if n == 1 else f'{stamp}-{n}')
            try:
                folder.mkdir(parents=True)
                return TensorBoardLogger(folder)
            except FileExistsError:
                n += 1
    if kind == 'mlflow':
        return MLflowLogger(experiment=name, tracking_uri=os.environ.get('MLFLOW_TRACKING_URI')
                            or f"sqlite:///{out / 'mlflow.db'}", artifact_location=str(out / 'mlruns'),
                            run_name=f"{name} {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return WandbLogger(project='minifast', name=name, dir=str(out), mode=os.environ.get('WANDB_MODE', 'offline'))


def metrics_for(n_classes, k=5):
    """The workflow's metrics: accuracy, and top_k_accuracy when k < n_classes (else it is always 1.0)."""
    return [accuracy, top_k_accuracy] if k < n_classes else [accuracy]


def data_error(cmd, flag, value, e, downloads):
    """One line for a data problem `e` met loading `flag value`, with a fix that exists on this command line
    (`downloads`: whether the command downloads missing CIFAR files)."""
    if isinstance(e, DatasetNotFoundError):
        root = e.folder.parent
        got = ('the download failed (' + _one_line(f'{type(e.download_error).__name__}: {e.download_error}') + ') and '
               if e.download_error is not None else '')
        fix = (f'or give --data-root the folder that holds {e.folder.name}' if downloads else
               f'or give {flag} the folder that holds {e.folder.name} ({cmd} does not download; `minifast smith '
               f'--data cifar10 --data-root {root}` does)')
        return (f'{cmd}: {flag} {value}: {got}{e.folder} lacks {_few(e.missing)}; get "{e.title}" from {e.url} and '
                f'extract it into {root}, {fix}')
    if isinstance(e, ImageDecodeError) and e.bad:
        f, why = e.bad[0]
        more = f' (and {len(e.bad) - 1} more unreadable files)' if len(e.bad) > 1 else ''
        return (f'{cmd}: {flag} {value}: cannot read image {f} ({_one_line(why)}){more}; add --ignore-errors to '
                f'skip such files')
    # the library's own message, less the function it comes from (a name the command line never shows)
    return f'{cmd}: {flag} {value}: ' + re.sub(r'^[A-Za-z_][\w.]*: ', '', _one_line(str(e)))


def _one_line(text):
    return ' '.join(str(text).split())


def _few(names, n=3):
    return ', '.join(names[:n]) + (f' and {len(names) - n} more files' if len(names) > n else '')


def _cached(file, key, problem):
    """The cache `file` when it was made for `key` and holds what its step needs (`problem(obj)`: why not, or None).
    Otherwise None, and the step recomputes it: silently when the file is missing or was made for other settings,
    with a warning naming the file when it is unreadable, garbled or holds values of the wrong types."""
    file = Path(file)
    if not file.exists():
        return None
    try:
        obj = json.loads(file.read_text())
    except (OSError, ValueError) as e:  # ValueError: invalid JSON (a truncated file), or bytes that are not UTF-8
        why = f'unreadable or not valid JSON ({type(e).__name__}: {e})'
    else:
        if isinstance(obj, dict) and isinstance(obj.get('key'), dict) and obj['key'] != key:
            return None  # made for other settings (data, model, sizes): recomputed for these
        try:
            why = (f'a JSON {type(obj).__name__}, not an object' if not isinstance(obj, dict) else
                   f"its 'key' is {obj.get('key')!r}, not an object" if not isinstance(obj.get('key'), dict) else
                   problem(obj))
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # a checker tripping on a value: garbled too
            why = f'{type(e).__name__}: {e}'
        if why is None:
            return obj
    warnings.warn(f'{file}: {why}; it is ignored and this step is recomputed (the file is rewritten)')
    return None


JSON_TMP = re.compile(r'^\.(.+\.json)\.(\d+)\.[0-9a-f]{8}\.tmp$')  # _write_json's temporary files


def _remove_stale_tmp(out):
    """Remove the temporary files of _write_json in `out` whose writer is gone (killed during a write)."""
    for p in out.iterdir():
        m = JSON_TMP.match(p.name)
        if m and not pid_alive(int(m.group(2))):
            with suppress(OSError):
                p.unlink()


def _num(v, none=True, finite=False):
    """Whether `v` is a JSON number (None too with `none`; only a finite one with `finite`)."""
    if v is None:
        return none
    return isinstance(v, Number) and not isinstance(v, bool) and (not finite or math.isfinite(v))


def _write_json(file, obj):
    """Write `obj` to `file` as JSON through replace_with (atomic, a temporary file of this call's own)."""
    text = json.dumps(plain(obj), indent=1)  # non-finite numbers as null: strict JSON

    def write(tmp):
        with open(tmp, 'x') as f:  # 'x': never another writer's file
            f.write(text)
    replace_with(file, write)


def _fmt_wd(v):
    return 'none acts' if v is None else f'{v:g}'


def _fmt_lr(v):
    return 'None' if v is None else f'{v:.3g}'


def _half_decade(wd):
    """Smith's neighbours of a weight decay: 10**(log10(wd) +- 0.5), to one significant figure (1e-4 -> 3e-4, 3e-5)."""
    e = math.log10(wd)
    return [float(f'{10 ** (e + 0.5):.0e}'), float(f'{10 ** (e - 0.5):.0e}')]


def model_fn(arch, n_classes, cmd='smith'):
    """A function making a new CIFAR ResNet `arch` (resnetN) for `n_classes`; SystemExit naming --arch if bad."""
    name = arch.lower().replace('-', '')
    if not name.startswith('resnet') or not name[6:].isdigit():
        raise SystemExit(f'{cmd}: --arch {arch!r}: expected resnetN with N = 6n + 2 (8, 14, 20, 32, 44, 56, 110)')
    depth = int(name[6:])
    if depth < 8 or (depth - 2) % 6:
        raise SystemExit(f'{cmd}: --arch {arch!r}: the depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110)')
    return lambda: cifar_resnet(depth, n_classes)


# ----------------------------------------------------------------------------------------------------- steps
def make_data(args, s, cmd='smith'):
    """Step 1's DataBunch: the built-in set, CIFAR-10/100, or an image folder. A data problem (a missing folder or
    file, an unreadable image, a class missing from training) exits with one line naming it (and the command `cmd`),
    or with --debug raises."""
    try:
        data, what = _make_data(args, s, cmd)
    except (OSError, ValueError) as e:
        if getattr(args, 'debug', False):
            raise
        raise SystemExit(data_error(cmd, '--data', args.data, e, downloads=True)) from None
    refuse_no_batch(cmd, data, what, s['bs'], builtin=not args.data)
    return data, what


def refuse_no_batch(cmd, data, what, bs, builtin):
    """SystemExit naming the numbers when `data` has fewer training images than one batch of `bs` (the training
    loader drops the last, partial batch, so the first step would fail on an empty loader)."""
    n = len(data.train_ds)
    if n < bs:
        raise SystemExit(f'{cmd}: {what}: {n} training images, fewer than one batch (--bs {bs}); lower --bs'
                         + (' or raise --n-train' if builtin else ''))


def _make_data(args, s, cmd):
    set_seed(args.seed)
    if not args.data:
        data = synthetic_cifar(n_classes=10, n_train=s['n_train'], n_valid=s['n_valid'], seed=args.seed,
                               tfms=cifar_transforms(), bs=s['bs'])
        return data, f"the built-in 32x32 shapes set ({s['n_train']} training, {s['n_valid']} validation images, " \
                     f'10 classes)'
    if args.data.lower() in ('cifar10', 'cifar100'):
        fn = cifar10 if args.data.lower() == 'cifar10' else cifar100
        data = fn(args.data_root, download=True, tfms=cifar_transforms(), bs=s['bs'])
        return data, f'{args.data.upper()} from {args.data_root}'
    path = Path(args.data)
    if not path.is_dir():
        raise SystemExit(f"{cmd}: --data {args.data}: {'not a folder' if path.exists() else 'no such folder'} (give "
                         f"'cifar10', 'cifar100' or a folder of class sub-folders)")
    il = ImageList.from_folder(path, ignore_errors=getattr(args, 'ignore_errors', False))
    valid = next((v for v in ('test', 'valid') if (path / v).is_dir()), None)
    if (path / 'train').is_dir() and valid:
        il, how = il.split_by_folder(train='train', valid=valid), f'train/ and {valid}/'
    else:
        il, how = il.split_by_rand_pct(0.2, seed=args.seed), 'a random 20% held out'
    data = (il.label_from_folder().transform(get_transforms(), size=(args.size, args.size))
            .databunch(bs=s['bs']).normalize())
    return data, f'the image folder {path} ({how}; {len(data.train_ds)} training images, {data.c} classes)'


def step_data(data, out):
    """Step 1: a batch of augmented training images -> batch.png."""
    save_plot(data.show_batch(rows=3, figsize=(5, 5)), out / 'batch.png', 'augmented training images')


def step_lr_find(make_learner, out, seed, num_it, key, max_lr=None, tracker=None):
    """Step 2: the LR range test -> lr_find.png; max_lr = lr_find's max_lr (else 1e-2), or --max-lr.

    Returns (info dict, skipped)."""
    file, png = out / 'lr_find.json', out / 'lr_find.png'
    info = _cached(file, key, _lr_find_problem)
    skipped = info is not None and png.exists()
    if not skipped:
        set_seed(seed)
        learn = make_learner()
        res = learn.lr_find(num_it=num_it)
        save_plot(learn.recorder.plot(suggestion=True), png, f'LR range test ({len(res.lrs)} steps)')
        if tracker is not None:  # lr_find hides the learner's callbacks: its curve and suggestions are logged here
            with tracker.child('LR range test') as t:
                t.log_params({'num_it': num_it, 'seed': seed})  # a child logs its params only in a fit
                if res.max_lr:
                    t.log_metrics({'lr_find/max_lr': res.max_lr}, step=0)
                t.log_figure(learn.recorder.plot(suggestion=True), 'lr_find')
        info = {'key': key, 'max_lr': res.max_lr, 'steep': res.steep, 'valley': res.valley, 'minimum': res.minimum,
                'note': res.note, 'plateau': bool(res.plateau), 'diverged': bool(res.diverged), 'n_steps': len(res.lrs),
                'lrs': [float(x) for x in res.lrs], 'losses': [float(x) for x in res.losses]}
        _write_json(file, info)
    ok = lambda v: v is not None and math.isfinite(v) and v > 0  # noqa: E731
    if max_lr is not None:
        info['chosen'], info['rule'] = max_lr, 'given with --max-lr'
    elif ok(info['max_lr']):
        info['chosen'], info['rule'] = info['max_lr'], "lr_find's max_lr"
    else:
        info['chosen'], info['rule'] = FALLBACK_LR, f'the fallback {FALLBACK_LR:g} (the curve gave no suggestion)'
    return info, skipped


def _lr_find_problem(info):
    """Why a cached lr_find.json cannot be used (a value of the wrong type), or None."""
    bad = [k for k in ('max_lr', 'steep', 'valley', 'minimum') if not _num(info.get(k, ''))]
    if bad:
        return f'the suggestion(s) {bad} are not numbers (or null)'
    if not (info.get('note') is None or isinstance(info['note'], str)):
        return f"'note' is {info['note']!r}, not a text or null"
    if not isinstance(info.get('diverged'), bool):
        return f"'diverged' is {info.get('diverged')!r}, not true or false"
    n = info.get('n_steps')
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        return f"'n_steps' is {n!r}, not a number of steps"
    for k in ('lrs', 'losses'):
        if not (isinstance(info.get(k), list) and all(_num(v) for v in info[k])):
            return f"{k!r} is not a list of numbers"
    return None


TAG = {}  # what make_learner builds (data, model, batch size): part of every run's identity in the log


def _best(res, fallback, what):
    """(the best summary of res by final valid loss, whether it is a tie); when every run diverged, (None, False)
    and a warning line saying `fallback` is kept."""
    try:
        best = res.best('valid_loss')
    except ValueError:
        _say(f'{what}: every run diverged; keeping {fallback} (lower max_lr with --max-lr)')
        return None, False
    return best, bool(best['tie'])


def _seed_list(seed):
    return list(seed) if isinstance(seed, (list, tuple)) else [seed]


def _grid(make_learner, configs, out, seed, epochs, max_lr, log, name, png, quiet, fixed=None, scale=None):
    """One grid_search call (over the seeds `seed`, a list or one) whose finished runs come from the log; returns
    (GridResult, trained, skipped). `scale`: {'tracker': a tracker every trained run is mirrored to, 'storage': an
    Optuna storage the grid's runs are shared through with other workers} (see run)."""
    scale = scale or {}
    before = len(read_log(log))
    with warnings.catch_warnings():  # fit's warning of a decay that cannot act: one line below, and in the report
        warnings.filterwarnings('ignore', message='fit: weight decay wd=', category=UserWarning)
        if scale.get('storage'):
            res, trained = _shared_grid(make_learner, configs, out, seed, epochs, max_lr, log, name, fixed, scale)
        else:
            res = grid_search(make_learner, configs, epochs=epochs, max_lr=max_lr, seeds=_seed_list(seed), log=log,
                              tag=TAG, fixed=fixed, tracker=scale.get('tracker'))
            trained = len(read_log(log)) - before
    skipped = len(res.runs) - trained
    _save(res.plot('valid_loss', title=name + _seeds_note(res)), out / png)
    _say(f'{name}: {trained} run(s) trained, {skipped} skipped (already in {log.name})')
    noop = [c['name'] for c in res.summary() if c['noop']]
    if noop:
        _say(f"{name}: weight decay never acted in {', '.join(noop)} (lr*wd <= 2^-25: float32 rounds 1 - lr*wd to "
             f"1.0), the same runs as wd=0; marked 'wd no-op'")
    if not quiet:
        print(res.table(), flush=True)
    return res, trained, skipped


def _digest(obj):
    return hashlib.sha1(json.dumps(plain(obj), sort_keys=True).encode()).hexdigest()[:10]


def _shared_grid(make_learner, configs, out, seed, epochs, max_lr, log, name, fixed, scale):
    """_grid's runs through the Optuna storage scale['storage'], shared with the other workers (minifast.search
    with the list of configs: every run trained once by some worker, each worker waiting until the grid is
    complete); one study per seed, named after what the grid trains. A run already in the local log (an earlier
    grid's: every worker's log holds every finished grid) is taken from it, as grid_search does, and the runs missing
    from the log are appended to it (an export). Returns (GridResult, runs this process trained)."""
    fixed = dict(fixed or {})
    logged, by_seed, trained = logged_runs(log), {}, 0
    for sd in _seed_list(seed):
        todo, have = [], {}
        for i, c in enumerate(configs):
            full = {**fixed, **c}
            pol, n_ep, _, _ = split_config(full, 'one_cycle', epochs)
            rec = logged.get(json.dumps(run_key(full, sd, n_ep, max_lr, pol, TAG), sort_keys=True))
            if rec is not None:
                have[i] = as_shown(rec, c, fixed)
            else:
                todo.append(i)
        if todo:
            ident = _digest({'tag': TAG, 'configs': [configs[i] for i in todo], 'fixed': fixed, 'epochs': epochs,
                             'max_lr': max_lr})
            res = search(make_learner, [configs[i] for i in todo], epochs=epochs, max_lr=max_lr, seed=sd,
                         pruner=None, fixed=fixed, tag=TAG, storage=scale['storage'],
                         study_name=f'smith {ident} seed {sd}', tracker=scale.get('tracker'),
                         checkpoints=out / 'search_checkpoints', silent=True)
            trained += sum(r.get('worker') == worker_id() for r in res.runs)
            for r in res.runs:
                append_record(log, r)
            have.update({todo[r['slot']]: r for r in res.runs})
        by_seed[sd] = [have[i] for i in range(len(configs))]
    return GridResult([r for sd in by_seed for r in by_seed[sd]]), trained


def _seeds_note(res):
    n = max((len(c['runs']) for c in res.summary()), default=1)
    return f' (mean of {n} seeds, range shaded)' if n > 1 else ''


def _final_metric(rec, k):
    v = rec['final'].get(k)
    return float('nan') if v is None else v


def step_superconvergence(make_learner, out, seed, epochs, max_lr, log, quiet, scale=None):
    """Step 3: 1cycle at max_lr against a constant lr of max_lr / CONST_DIV, the same epochs -> superconvergence.png.
    Returns (GridResult, 'beat', 'did not beat' or 'tied with', trained, skipped)."""
    # the 1cycle run names its momentum, so that step 4's run of the same pair is this run (taken from the log)
    configs = [{'policy': 'one_cycle', 'moms': MOMS[0]}, {'policy': 'constant', 'lr': max_lr / CONST_DIV}]
    res, tr, sk = _grid(make_learner, configs, out, seed, epochs, max_lr, log,
                        'super-convergence check: 1cycle vs constant lr', 'superconvergence.png', quiet, scale=scale)
    one, const = res.summary('valid_loss')
    won = ('tied with' if 'tie' in (one['rank'], const['rank']) else
           'beat' if one['rank'] == 'best' and one['complete'] else 'did not beat')
    return res, won, tr, sk


def step_momentum(make_learner, out, seed, epochs, max_lr, log, quiet, scale=None):
    """Step 4: cyclic momentum (0.95, 0.85) against (0.99, 0.90) -> momentum.png; the lower valid loss wins, and on a
    tie the default (0.95, 0.85). The first pair's run is step 3's 1cycle run (from the log when it is there)."""
    res, tr, sk = _grid(make_learner, [{'moms': m} for m in MOMS], out, seed, epochs, max_lr, log,
                        'momentum test', 'momentum.png', quiet, fixed={'policy': 'one_cycle'}, scale=scale)
    best, tie = _best(res, MOMS[0], 'momentum test')
    return res, tuple(best['config']['moms']) if best and not tie else MOMS[0], tr, sk


def _acting(c):
    return bool(c['config'].get('wd')) and not c['noop']


def _pick_wd(res, fallback, what):
    """(wd, why) from a wd grid: the lowest mean valid loss, the best estimate the grid gives; when the seeds cannot
    tell it from others (a tie), still that one, and `why` names the tied values (more seeds would separate them).
    A wd that never acted is never the pick: it trained as wd=0."""
    best, tie = _best(res, fallback, what)
    if best is None:
        return fallback, 'every run diverged, so the fallback'
    tied = ''
    if tie:
        values = ', '.join(f"{c['config']['wd']:g}" + (' (no-op)' if c['noop'] else '')
                           for c in res.summary('valid_loss') if c['rank'] in ('best', 'tie'))
        tied = f' (a tie: the seeds cannot tell wd = {values} apart; more seeds, --seeds, would say more)'
    if best['noop']:
        return 0., (f"the lowest mean final valid loss was wd={best['config']['wd']:g}'s, whose decay never acted "
                    f"(the same runs as wd=0): 0" + tied)
    return best['config']['wd'], 'the lowest mean final valid loss' + tied


def step_weight_decay(make_learner, out, seed, epochs, max_lr, moms, log, quiet, scale=None):
    """Step 5: wd in 1e-3, 1e-4, 1e-5, 0 (wd.png), then the half-decade neighbours of the best non-zero value that
    acts (wd_fine.png); the chosen wd: the lowest mean valid loss over all six configs, a tie or not (see _pick_wd).
    Returns (coarse, fine, best non-zero (None when none acts), its neighbours,
    chosen wd, why, trained, skipped)."""
    coarse, tr1, sk1 = _grid(make_learner, [{'moms': moms, 'wd': w} for w in WDS], out, seed, epochs, max_lr, log,
                             'weight decay: coarse grid', 'wd.png', quiet, scale=scale)
    acting = [r for c in coarse.summary('valid_loss') if _acting(c) for r in c['runs']]
    best_nz = _pick_wd(GridResult(acting), WDS[1], 'weight decay')[0] if acting else None
    fine_wds = _half_decade(best_nz or WDS[1])
    fine, tr2, sk2 = _grid(make_learner, [{'moms': moms, 'wd': w} for w in fine_wds], out, seed, epochs, max_lr,
                           log, f'weight decay: half-decade neighbours of {best_nz or WDS[1]:g}', 'wd_fine.png', quiet,
                           scale=scale)
    chosen, why = _pick_wd(GridResult(coarse.runs + fine.runs), best_nz or WDS[1], 'weight decay')
    return coarse, fine, best_nz, fine_wds, chosen, why, tr1 + tr2, sk1 + sk2


def _wd_ranges(learn, max_lr, runs):
    """What report.md says of how wd is applied and where it can act, from a learner of the workflow and the wd
    grid's runs (their per-step lrs)."""
    opt = getattr(learn.opt_func, 'func', learn.opt_func)
    kind = f'{opt.__module__}.{opt.__qualname__}' if hasattr(opt, '__qualname__') else str(opt)
    lrs = next((r['steps']['lr'] for r in runs if r['steps']['lr']), [max_lr])
    med = float(np.median(lrs))
    half = least_acting_wd(med)
    grid = [10. ** k for k in range(math.ceil(math.log10(half)), 0)] if half < 0.1 else []
    return dict(kind=kind, true_wd=learn.true_wd, bn_wd=learn.bn_wd, peak=least_acting_wd(max_lr), half=half,
                median_lr=med, faithful=1e-6 / max_lr, grid=grid)


def _snapshot_epochs(epochs):
    """The two snapshots interpolated in step 7: as the seed's 5 and 7 of 8 epochs, three epochs from the end and
    the last."""
    return sorted({max(0, epochs - 3), epochs - 1})


def _newest_state(folder):
    file = find_checkpoint(folder)
    return (file, load_state(file)) if file is not None else (None, None)


def _final_plots(learn, out, config):
    fit = (f"fit_one_cycle({config['epochs']}, max_lr={config['max_lr']:.3g}, moms={tuple(config['moms'])}, "
           f"wd={config['wd']:g})")
    save_plot(learn.recorder.plot_losses(), out / 'final_losses.png', f'final fit: loss\n{fit}')
    save_plot(learn.recorder.plot_lr(show_moms=True), out / 'final_lr.png', f'final fit: schedule\n{fit}')
    save_plot(learn.recorder.plot_metrics(), out / 'final_metrics.png', f'final fit: validation metrics\n{fit}')


FINAL_PNGS = ('final_losses.png', 'final_lr.png', 'final_metrics.png')


def _final_dirs(out, key):
    """checkpoints/<id> and snapshots/<id> of the final fit `key`: a final fit with other data, model or settings
    gets folders of its own (the old ones stay), so it never resumes from, or reuses, another fit's files."""
    fid = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return out / 'checkpoints' / fid, out / 'snapshots' / fid


def step_final(make_learner, out, seed, epochs, max_lr, moms, wd, log, tracker=None):
    """Step 6: fit_one_cycle(epochs, max_lr, moms, wd) with WeightSnapshots and Checkpoint; resumes from the newest
    checkpoint, or is skipped when its record is in the log; with a `tracker`, the fit it trains is a child run of
    it. Returns (record, learn or None, what happened)."""
    config = {'final': True, 'policy': 'one_cycle', 'epochs': epochs, 'max_lr': max_lr, 'moms': moms, 'wd': wd}
    key = plain({'config': config, 'seed': seed, 'tag': TAG})
    snap_epochs = _snapshot_epochs(epochs)
    ck_dir, snap_dir = _final_dirs(out, key)
    for rec in run_records(log):  # a tampered record is ignored (with a warning): its fit counts as not done
        if rec.get('key') == key:
            learn = None
            if not all((out / p).exists() for p in FINAL_PNGS):  # plots deleted: redraw from the finished state
                learn = make_learner()
                file, state = _newest_state(ck_dir)
                if state is not None:
                    learn.recorder.load_state_dict(state['callbacks']['Recorder'])
                    _final_plots(learn, out, config)
            if tracker is not None:
                tracker.log_record(rec, name='final')
            secs = rec.get('seconds')
            earlier = f', where it took {secs:.1f} s' if _num(secs, none=False, finite=True) else ''
            return rec, learn, f'skipped (reused from runs.jsonl{earlier})'
    file, state = _newest_state(ck_dir)
    set_seed(seed)
    learn = make_learner()
    snaps = WeightSnapshots(learn, save_list=snap_epochs, path=snap_dir)
    ck = Checkpoint(learn, path=ck_dir)
    t0, status = time.perf_counter(), 'done'
    if state is not None and state.get('position') and is_finished(state['position']):
        # finished earlier, killed before its record was written: take its state instead of training again
        learn.model.load_state_dict(state['model'])
        learn.recorder.load_state_dict(state['callbacks']['Recorder'])
        what = f'already finished in {file.name}; nothing trained'
    else:
        resume = None
        if file is not None:
            resume = ck_dir
            _say(f'6/7 final fit: resuming from {file.name} ({checkpoint_info(file)})')
        else:
            _say(f'6/7 final fit: training {epochs} epochs (checkpoints in {ck_dir.relative_to(out)})')
        set_seed(seed)
        try:
            with tracked(tracker, 'final', {**plain(config), 'seed': seed}) as extra:
                learn.fit_one_cycle(epochs, max_lr, moms=moms, wd=wd, callbacks=[snaps, ck, *extra], resume=resume)
        except DivergenceError:
            status = 'diverged'
        except ValueError as e:
            if 'resume:' in str(e):
                raise SystemExit(f'smith: the checkpoints in {ck_dir} belong to a different final fit ({e}). Delete '
                                 f'that folder (and {snap_dir}), or choose another --out.') from e
            raise
        what = (f'resumed from {file.name} and finished' if resume else f'trained {epochs} epochs') + \
            f' in {time.perf_counter() - t0:.1f} s'
    _final_plots(learn, out, config)
    rec = run_record(learn, config, seed, status, time.perf_counter() - t0, name='final')
    rec['key'] = key
    append_record(log, rec)
    return rec, learn, what


def step_interpolation(make_learner, learn, out, epochs, points, n_batches, final_key):
    """Step 7: interpolate between the two snapshots of the final run -> interpolation.png, interpolation.json."""
    e1, e2 = _snapshot_epochs(epochs)
    file, png = out / 'interpolation.json', out / 'interpolation.png'
    key = {'final': final_key, 'w1': e1, 'w2': e2, 'points': points, 'n_batches': n_batches}
    cached = _cached(file, key, _interpolation_problem)
    if cached is not None and png.exists():
        res = InterpolationResult(np.array(cached['alphas']), cached['columns'],
                                  {k: np.array(v, dtype=float) for k, v in cached['values'].items()},
                                  cached['bn'], cached['n_batches'])
        return res, (e1, e2), True
    if learn is None:
        learn = make_learner()
    snap_dir = _final_dirs(out, final_key)[1]
    w1, w2 = (load_state(snap_dir / f'snapshot_{e}.pth') for e in (e1, e2))
    res = interpolate_losses(learn, w1, w2, alphas=np.linspace(-0.5, 1.5, points), n_batches=n_batches or None)
    fig = plot_interpolation(res)
    save_plot(fig, png, f'loss between two snapshots of the final fit\nw1 = after epoch {e1}, w2 = after epoch {e2}')
    vals = {k: np.where(np.isfinite(v), v, np.nan).tolist() for k, v in res.values.items()}
    _write_json(file, {'key': key, 'alphas': res.alphas.tolist(), 'columns': res.columns, 'values': vals,
                       'bn': res.bn, 'n_batches': res.n_batches})
    return res, (e1, e2), False


def _interpolation_problem(c):
    """Why a cached interpolation.json cannot be used (a value of the wrong type or shape), or None."""
    alphas, columns, values = c.get('alphas'), c.get('columns'), c.get('values')
    if not (isinstance(alphas, list) and alphas and all(_num(a, none=False, finite=True) for a in alphas)):
        return "'alphas' is not a non-empty list of finite numbers"
    if not (isinstance(columns, list) and columns and all(isinstance(x, str) for x in columns)):
        return "'columns' is not a non-empty list of names"
    if not (isinstance(values, dict) and values):
        return "'values' is not a non-empty object"
    for dl, rows in values.items():
        if not (isinstance(rows, list) and len(rows) == len(alphas) and
                all(isinstance(r, list) and len(r) == len(columns) and all(_num(v) for v in r) for r in rows)):
            return f"'values'[{dl!r}] is not {len(alphas)} rows of {len(columns)} numbers"
    if c.get('bn') not in BN_MODES:
        return f"'bn' is {c.get('bn')!r}, not one of {BN_MODES}"
    n = c.get('n_batches')
    if not (n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 1)):
        return f"'n_batches' is {n!r}, not a number of batches (or null)"
    return None


# ----------------------------------------------------------------------------------------------------- report
def _block(text):
    return '```\n' + text + '\n```\n'


def write_report(out, ctx):
    """report.md: every plot, every choice and its reason, the grid tables and verdicts."""
    md = _report_lr_find(ctx) + _report_grids(ctx) + _report_final(ctx)
    (out / 'report.md').write_text('\n'.join(md))


def _report_lr_find(ctx):
    """The lines of report.md's title, its section 1 (data) and section 2 (the LR range test)."""
    lf = ctx['lr']
    return [f"# minifast smith: {ctx['what']}", '',
            f"Model {ctx['arch']} ({ctx['n_params']:,} parameters), batch size {ctx['bs']}, seed {ctx['seed']}, "
            f"device {ctx['device']}; grid runs of {ctx['grid_epochs']} epochs, final fit of {ctx['epochs']} epochs. "
            f"Every run is a record of [runs.jsonl](runs.jsonl) (`pandas.read_json('runs.jsonl', lines=True)`).", '',
            '## 1. Data', '', 'A batch of augmented training images:', '', '![batch](batch.png)', '',
            '## 2. LR range test', '',
            f"`lr_find(num_it={ctx['num_it']})` ran {lf['n_steps']} steps"
            f"{' (stopped on divergence)' if lf['diverged'] else ''}; "
            f"suggestions: steep {_fmt_lr(lf['steep'])}, valley {_fmt_lr(lf['valley'])}, "
            f"minimum {_fmt_lr(lf['minimum'])}.", '',
            f"**max_lr = {lf['chosen']:.3g}**, from {lf['rule']}. "
            + (f"lr_find says: {lf['note']}. " if lf.get('note') else '')
            + "Rule (`LRFindResult.max_lr`): where the loss clearly falls, the lr at the bottom of the fall, Smith's "
            "\"maximum lr where the loss still decreases\", read from the raw losses with a centred smoothing (the "
            "smoothed curve that 'valley' and 'minimum' read lags the raw loss by about 50 steps); where it does "
            "not, a tenth of the lr from which the loss rises clearly (\"a value 10 times less\"). Measured by "
            "`benchmarks/lr_suggestions.py` (1cycle trained at each rule's pick, 3 seeds, on scikit-learn's digits, "
            "MNIST-1D and the built-in set), its worst-case regret against the best max_lr of a grid is 0.1 points; "
            "'steep' 6.1, 'minimum' 6.8, 'valley' (fastai v2's default) 19.6.", '', '![lr_find](lr_find.png)', '']


def _report_grids(ctx):
    """The lines of report.md's sections 3 to 5: the super-convergence check, momentum and weight decay grids."""
    lf, sc, mo, seeds = ctx['lr'], ctx['sc'], ctx['mom'], ctx.get('seeds', [ctx['seed']])
    one, const = sc.summary('valid_loss')
    mean = 'mean final valid loss' if len(seeds) > 1 else 'final valid loss'
    return ['## 3. Super-convergence check', '', _seeds_sentence(seeds, ctx['grid_epochs']), '',
            f"1cycle at max_lr {lf['chosen']:.3g} against a constant lr of max_lr/{CONST_DIV} = "
            f"{lf['chosen'] / CONST_DIV:.3g} (taken as the largest constant lr that stays stable for a whole run: a "
            f"constant lr never gets 1cycle's warm-up and annealing, so it goes a decade below the cyclic peak, the "
            f"seed notebook's 'a value 10 times less'), both {ctx['grid_epochs']} epochs, the Learner's default wd "
            f"({ctx['default_wd']:g}) in steps 3 and 4 as in the seed. {mean.capitalize()}: 1cycle "
            f"{_final_metric(one, 'valid_loss'):.4f}, constant {_final_metric(const, 'valid_loss'):.4f}: "
            f"**1cycle {ctx['sc_won']} the constant lr**"
            + (' (the difference is within the seed-to-seed spread)' if ctx['sc_won'] == 'tied with' else '') + '.',
            '', '![superconvergence](superconvergence.png)', '', _block(sc.table()), _block(sc.verdicts()),
            '## 4. Momentum', '',
            f"Cyclic momentum pairs {', '.join(str(m) for m in MOMS)} with 1cycle at max_lr; the {MOMS[0]} run is "
            f"step 3's 1cycle run (the same settings and seed: taken from runs.jsonl, not trained again). "
            + (f"**The pairs tie** (their difference is within the seed-to-seed spread), so **moms = "
               f"{tuple(ctx['moms'])}**, the default (fastai's and Smith's)." if ctx.get('mom_tie') else
               f"**Chosen moms = {tuple(ctx['moms'])}**: the lower {mean} (seed 004 compares losses, not "
               f"accuracy)."), '',
            '![momentum](momentum.png)', '', _block(mo.table()), _block(mo.verdicts()),
            '## 5. Weight decay', '', *_report_wd_how(ctx), '',
            f"Coarse grid wd in {', '.join(f'{w:g}' for w in WDS)} with moms {tuple(ctx['moms'])}; "
            + (f"the best non-zero value that acts was {ctx['best_nz']:g}, so its half-decade neighbours"
               if ctx['best_nz'] else
               f"no non-zero value acted, so the half-decade neighbours of the seed's {WDS[1]:g}")
            + f" (10^(log10 wd +- 0.5), one significant figure), {' and '.join(f'{w:g}' for w in ctx['fine_wds'])}, "
            f"were tried too. **Chosen wd = {ctx['wd']:g}** over all six configs: "
            f"{ctx.get('wd_why', 'the lowest final valid loss')}.", '',
            '![wd](wd.png)', '', _block(ctx['wd_coarse'].table()), _block(ctx['wd_coarse'].verdicts()),
            '![wd_fine](wd_fine.png)', '', _block(ctx['wd_fine'].table()), _block(ctx['wd_fine'].verdicts())]


def _seeds_sentence(seeds, epochs):
    if len(seeds) == 1:
        return (f'Each grid config below ran once (seed {seeds[0]}, {epochs} epochs): only identical results count '
                f'as a tie; `--seeds N` runs N seeds and compares their means.')
    return (f"Each grid config below ran with {len(seeds)} seeds ({', '.join(map(str, seeds))}; {epochs} epochs "
            f"each): a seed gives every config the same initial weights and data order, the tables give the mean "
            f"(and the sd of the valid loss), and a config is a **tie** with the best when a paired t-test over the "
            f"seeds cannot tell them apart at the 10% level (|mean d| <= t * sd(d) / sqrt(n), d the per-seed "
            f"differences): the step then does not pretend to pick. With {len(seeds)} seeds only large, consistent "
            f"differences count.")


def _report_wd_how(ctx):
    """report.md's paragraph on how minifast applies weight decay, the seed's SGD with L2, and where wd acts."""
    h, lr = ctx['wd_how'], ctx['lr']['chosen']
    how = (f"How minifast applies wd: the optimizer is {h['kind']} with `true_wd={h['true_wd']}`: "
           + ("**decoupled** decay (AdamW, Loshchilov & Hutter): every step multiplies the weights by 1 - lr*wd "
              "(in torch's AdamW step, apart from the Adam update of the gradient)" if h['true_wd'] else
              "**L2** decay: wd*w is added to the gradient before the optimizer step") +
           f"{', biases and BatchNorm parameters included (bn_wd=True)' if h['bn_wd'] else ''}. The seed's grid "
           f"(1e-3 ... 1e-5, 0) was designed for SGD with L2, where each step also shrinks the weights by lr*wd, but "
           f"at SGD's learning rates (0.1 to 3 in Smith's runs), 30 to 1000 times this max_lr of {lr:.3g}: the same "
           f"wd values decay far less here. In float32 the factor 1 - lr*wd is exactly 1.0 when lr*wd <= 2^-25 "
           f"(2.98e-8), and a multiple of 2^-24 (5.96e-8) above that: at max_lr {lr:.3g} decay acts at the peak "
           f"only for wd > {h['peak']:.2g}, on at least half of the 1cycle steps (median lr {h['median_lr']:.3g}) "
           f"for wd > {h['half']:.2g}, and is applied to within ~3% at the peak from wd ~ {h['faithful']:.1g}. "
           + (f"**A grid where wd acts at this max_lr: {', '.join(f'{w:g}' for w in h['grid'])} (and 0)** (the "
              f"Learner's default is {ctx['default_wd']:g})." if h['grid'] else
              "**At this max_lr no wd up to 0.1 acts on most steps**: raise max_lr or drop weight decay."))
    noop = [c['config']['wd'] for g in (ctx['wd_coarse'], ctx['wd_fine']) for c in g.summary() if c['noop']]
    if not noop:
        return [how]
    return [how, '', f"**No-op in this grid: wd = {', '.join(f'{w:g}' for w in noop)}**: their decay never changed "
                     f"the weights (lr*wd <= 2^-25 at every step), so their runs are bit-identical to wd=0's (the "
                     f"tables mark them 'wd no-op'; in the plots their dashed lines lie on wd=0's) and none of them "
                     f"is ever the choice."]


def _report_final(ctx):
    """The lines of report.md's section 6 (the final fit), section 7 (the interpolation) and its re-running note."""
    final = ctx['final']
    metrics = ', '.join(f'{k} {v:.4f}' for k, v in final['final'].items() if isinstance(v, float))
    e1, e2 = ctx['snap']
    b = None
    try:
        b = ctx['interp'].barrier('valid')
    except (ValueError, KeyError):
        pass
    return ['## 6. Final fit', '',
            f"`fit_one_cycle({ctx['epochs']}, max_lr={ctx['lr']['chosen']:.3g}, moms={tuple(ctx['moms'])}, "
            f"wd={ctx['wd']:g})` with WeightSnapshots (snapshots/) and Checkpoint (checkpoints/): "
            f"{ctx['final_what']}. Status {final['status']}; final {metrics}. Diagnosis: {final['verdict']} - "
            f"{final['diagnosis']}.", '',
            '![final_losses](final_losses.png)', '', '![final_lr](final_lr.png)', '',
            '![final_metrics](final_metrics.png)', '',
            '## 7. Interpolation between two snapshots', '',
            f"w1 = the weights after epoch {e1}, w2 = after epoch {e2} (the last); weights alpha*w1 + (1-alpha)*w2 "
            f"for alpha in [-0.5, 1.5], BatchNorm statistics recomputed at each alpha.", '',
            (f"Barrier (valid): height {b.height:.4g}, excess over the straight line {b.excess:.4g}: "
             f"**{'one basin' if b.same_basin else 'different basins'}**." if b is not None else ''), '',
            _block(ctx['interp'].summary()), '![interpolation](interpolation.png)', '',
            '## Re-running', '',
            'The same command again trains nothing that is done: grid runs come from runs.jsonl, the LR range test '
            'from lr_find.json, the final fit is skipped once its record is in runs.jsonl (or resumes from '
            'checkpoints/ when it was killed), and the interpolation comes from interpolation.json.', '']


# ----------------------------------------------------------------------------------------------------- run
def run(args):
    """The whole workflow; returns 0. Prints one line per step (and what it skipped)."""
    if launched():
        raise SystemExit('minifast smith runs as one process: its grids and report are not written for torchrun; '
                         'run it without torchrun (or with --nproc_per_node 1), or set MINIFAST_DISTRIBUTED=0')
    matplotlib.use('Agg')
    t_start = time.perf_counter()
    s = _sizes(args)
    out = Path(args.out).resolve()  # absolute: Checkpoint and WeightSnapshots resolve relative paths differently
    try:  # one smith per run folder (created here): two would both train everything and write each other's files
        acquire(out, 'minifast smith --out')
    except FolderLockedError as e:
        raise SystemExit(str(e)) from None
    storage = _storage(args, out)
    n = 1 if getattr(args, 'grid_worker', False) else getattr(args, 'workers', 1) or 1
    # grid workers exit once the grids are done; they wait for a max_lr a failing invocation never publishes
    with local_workers(getattr(args, 'argv', None), n, storage, out, extra=['--grid-worker']) as helpers:
        if helpers:
            _say(f'{n - 1} grid worker(s) started on {storage} (PIDs {[p.pid for p in helpers]}; logs in '
                 f'{out / "workers"})')
        try:
            return _run_steps(args, s, out, t_start, storage)
        finally:
            release(out)
    codes = [p.returncode for p in helpers]
    if any(codes):
        _say(f'warning: grid workers exited with {codes} (their logs: {out / "workers"})')


def _storage(args, out):
    """The Optuna storage the grids are shared through: --storage, or with --workers N > 1 sqlite:///OUT/study.db;
    None for a plain run. SystemExit for --grid-worker without a storage."""
    workers = getattr(args, 'workers', None)
    workers = 1 if workers is None else workers  # (not `or 1`: --workers 0 must be refused, not run as 1)
    refuse_small('smith', {'workers': workers}, workers=1)
    storage = getattr(args, 'storage', None) or (f"sqlite:///{out / 'study.db'}" if workers > 1 else None)
    if getattr(args, 'grid_worker', False) and storage is None:
        raise SystemExit('smith: --grid-worker helps a main invocation through its --storage: give the same '
                         '--storage URL')
    return storage


@contextmanager
def local_workers(argv, n, storage, out, extra=()):
    """--workers n: n - 1 more processes on this machine running this invocation's command line `argv` (default
    sys.argv[1:]) as workers of `storage` (see options.worker_argv, with the flags `extra`), each in its own folder
    OUT/workers/i with its output in OUT/workers/i.log, for the body of a with statement (which gets their Popen
    objects). An error or Ctrl-C in the body terminates them (they may wait for what it never finishes); the end of
    the with statement waits for them, so their returncode is set."""
    procs = []
    try:
        for i in range(1, n):
            folder = out / 'workers' / str(i)
            folder.mkdir(parents=True, exist_ok=True)
            with open(out / 'workers' / f'{i}.log', 'w') as f:
                procs.append(subprocess.Popen(worker_argv(argv or sys.argv[1:], storage, folder, extra=extra),
                                              stdout=f, stderr=subprocess.STDOUT))
        yield procs
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    finally:
        for p in procs:
            p.wait()


def _run_steps(args, s, out, t_start, storage=None):
    """run's steps 1 to 7 and the report, in the run folder `out` (which this process holds); with --tracker, every
    run mirrored to the tracker and the report and plots logged to it at the end."""
    _remove_stale_tmp(out)
    t = time.perf_counter()
    data, what = make_data(args, s)
    new_model = model_fn(s['arch'], data.c)
    make_learner = learner_factory(data, new_model, out, args.quiet, getattr(args, 'compile', False))
    n_params = sum(p.numel() for p in new_model().parameters())
    t_setup = time.perf_counter() - t
    _say(f"{what}; {s['arch']} ({n_params:,} parameters), bs {s['bs']}, {data.device}{_compiled(make_learner)}; run "
         f"folder {out} (data and model made in {t_setup:.1f} s)")
    tracker = make_tracker(getattr(args, 'tracker', None), out, 'minifast smith')
    try:
        return _steps(args, s, out, t_start, data, what, make_learner, n_params, tracker, storage, t_setup)
    finally:
        if tracker is not None:
            tracker.close()


def _steps(args, s, out, t_start, data, what, make_learner, n_params, tracker, storage, t_setup=0.):
    """_run_steps's steps (after `t_setup` seconds of making the data and model), reporting to `tracker` (or None),
    the grids shared through `storage` (or None)."""
    log = out / 'runs.jsonl'
    scale = {'tracker': tracker, 'storage': storage}
    if getattr(args, 'grid_worker', False):
        return _grid_worker(args, s, out, what, make_learner, log, scale)
    times = {'setup': t_setup}  # step -> seconds this invocation spent on it, or None where it reused a result

    t = time.perf_counter()
    step_data(data, out)
    times['data'] = time.perf_counter() - t
    _say(f"1/7 data: batch.png (took {times['data']:.1f} s)")

    t = time.perf_counter()
    lf, skipped = _lr_find_step(args, s, what, make_learner, out, tracker)
    max_lr = lf['chosen']
    times['LR range test'] = None if skipped else time.perf_counter() - t
    _say(f"2/7 LR range test {_took(times['LR range test'], 'lr_find.json')}: max_lr = {max_lr:.3g} from "
         f"{lf['rule']} (steep {_fmt_lr(lf['steep'])}, valley {_fmt_lr(lf['valley'])})"
         + (f"; {lf['note']}" if lf.get('note') and args.max_lr is None else ''))

    if storage is not None:  # the grid workers wait for it: the grids' configs depend on it
        publish(storage, f'smith setup {_digest(TAG)}', 'max_lr', max_lr)
    t = time.perf_counter()
    grids, trained, skipped_runs = _grid_steps(make_learner, out, list(range(args.seed, args.seed + s['seeds'])),
                                               s['grid_epochs'], max_lr, log, args.quiet, scale)
    times['grids'] = time.perf_counter() - t if trained else None
    _say(f"5/7 weight decay: best non-zero {_fmt_wd(grids['best_nz'])}, half-decade {grids['fine_wds']}; chose "
         f"wd={grids['wd']:g} (steps 3 to 5: {trained} run(s) trained, {skipped_runs} reused from runs.jsonl; "
         f"took {time.perf_counter() - t:.1f} s)")

    t = time.perf_counter()
    final, learn, final_what = step_final(make_learner, out, args.seed, s['epochs'], max_lr, grids['moms'],
                                          grids['wd'], log, tracker)
    times['final fit'] = None if final_what.startswith('skipped') else time.perf_counter() - t
    fin = final['final']
    _say(f"6/7 final fit {final_what}: " + ', '.join(f'{k} {v:.4f}' for k, v in fin.items() if isinstance(v, float)))

    t = time.perf_counter()
    interp, snap, cached = step_interpolation(make_learner, learn, out, s['epochs'], s['interp_points'],
                                              s['interp_batches'], final.get('key'))
    times['interpolation'] = None if cached else time.perf_counter() - t
    _say(f"7/7 interpolation {_took(times['interpolation'], 'interpolation.json')}: "
         + next((ln for ln in interp.summary().splitlines() if ln.startswith('valid:')), ''))

    t = time.perf_counter()
    write_report(out, dict(what=what, arch=s['arch'], n_params=n_params, bs=s['bs'], seed=args.seed, lr=lf,
                           device=f'{data.device}{_compiled(make_learner)}', grid_epochs=s['grid_epochs'], **grids,
                           default_wd=make_learner().wd, epochs=s['epochs'], num_it=s['num_it'], final=final,
                           final_what=final_what, interp=interp, snap=snap))
    times['report'] = time.perf_counter() - t
    _say(f'done in {time.perf_counter() - t_start:.1f} s (this invocation: '
         + ', '.join(f"{k} {'reused' if v is None else f'{v:.1f} s'}" for k, v in times.items())
         + f'); {trained} grid run(s) trained, {skipped_runs} skipped (reused from runs.jsonl)')
    if tracker is not None:
        for f in ['report.md', *sorted(p.name for p in out.glob('*.png'))]:
            tracker.log_artifact(out / f)
    _say(f'report: {out / "report.md"}' + (f' (and in the {args.tracker} tracker)' if tracker is not None else ''))
    return 0


def _took(seconds, cache):
    """A step's line: how long it took in this invocation, or which file it was reused from."""
    return f'skipped (reused from {cache})' if seconds is None else f'took {seconds:.1f} s'


def learner_factory(data, new_model, out, quiet, compile=False):
    """make_learner() for every step: a fresh Learner on `data` (or the `data=` given, e.g. a cross-validation fold)
    with a new new_model() and the workflow's metrics. `compile`: torch.compile, with CUDA graphs and bf16 on a GPU;
    the learners' models are new objects of one architecture, so dynamo compiles the first and reuses that code."""
    cpu = torch.device(data.device).type == 'cpu' if hasattr(data, 'device') else not torch.cuda.is_available()
    fast = {'compile': True if cpu else 'reduce-overhead', 'bf16': not cpu} if compile else {}

    def make_learner(data=data):  # channels_last: also on CPU (faster conv kernels there); on CUDA the default
        return Learner(data, new_model(), metrics=metrics_for(data.c), path=out, silent=quiet,
                       channels_last=True if cpu else None, **fast)
    make_learner.fast = fast
    return make_learner


def _compiled(make_learner):
    """', compiled (...)' when make_learner's learners compile, else ''."""
    fast = getattr(make_learner, 'fast', {})
    if not fast:
        return ''
    return ', compiled' + (' with CUDA graphs, bf16' if fast['compile'] == 'reduce-overhead' else '')


def _set_tag(args, s, what):
    """TAG: what make_learner builds (data, model, batch size, image size)."""
    TAG.clear()
    TAG.update({'data': what, 'arch': s['arch'], 'bs': s['bs'], 'size': getattr(args, 'size', None)})
    if getattr(args, 'compile', False):  # bf16 on a GPU trains other numbers: its runs are not the fp32 ones
        TAG['compile'] = True


def _grid_worker(args, s, out, what, make_learner, log, scale):
    """--grid-worker: steps 3 to 5 on the shared storage with the main invocation's max_lr (waited for in the
    storage unless --max-lr gives it), then exit 0."""
    _set_tag(args, s, what)
    max_lr = args.max_lr
    if max_lr is None:
        _say(f"grid worker: waiting for the main invocation's max_lr in {scale['storage']}")
        max_lr = wait_for(scale['storage'], f'smith setup {_digest(TAG)}', 'max_lr')
    _say(f'grid worker: max_lr = {max_lr:.3g}')
    t = time.perf_counter()
    _, trained, skipped = _grid_steps(make_learner, out, list(range(args.seed, args.seed + s['seeds'])),
                                      s['grid_epochs'], max_lr, log, args.quiet, scale)
    _say(f'grid worker: steps 3 to 5 done in {time.perf_counter() - t:.1f} s ({trained} run(s) trained here, '
         f'{skipped} by other workers or earlier); the main invocation does the final fit and the report')
    return 0


def _lr_find_step(args, s, what, make_learner, out, tracker=None):
    """Step 2 as run does it: sets TAG (what make_learner builds), then step_lr_find; returns (info, skipped)."""
    _set_tag(args, s, what)
    lr_key = plain({**TAG, 'seed': args.seed, 'num_it': s['num_it'], 'rule': LR_RULE})
    return step_lr_find(make_learner, out, args.seed, s['num_it'], lr_key, args.max_lr, tracker)


def _grid_steps(make_learner, out, seed, epochs, max_lr, log, quiet, scale=None):
    """Steps 3 to 5 with their lines (but step 5's, which run prints after timing them), over the seeds `seed` (a
    list, or one); returns (what write_report takes from them, grid runs trained, grid runs skipped)."""
    sc, won, tr1, sk1 = step_superconvergence(make_learner, out, seed, epochs, max_lr, log, quiet, scale)
    _say(f"3/7 super-convergence: 1cycle {won} constant lr {max_lr / CONST_DIV:.3g}")
    mo, moms, tr2, sk2 = step_momentum(make_learner, out, seed, epochs, max_lr, log, quiet, scale)
    tie = mo.best()['tie'] if any(r['status'] == 'done' for r in mo.runs) else []
    _say(f"4/7 momentum: chose moms={moms}" + (' (a tie: the default)' if tie else ''))
    wd_c, wd_f, best_nz, fine_wds, wd, why, tr3, sk3 = step_weight_decay(make_learner, out, seed, epochs, max_lr,
                                                                          moms, log, quiet, scale)
    grids = dict(sc=sc, sc_won=won, mom=mo, moms=moms, mom_tie=bool(tie), wd_coarse=wd_c, wd_fine=wd_f,
                 best_nz=best_nz, fine_wds=fine_wds, wd=wd, wd_why=why, seeds=_seed_list(seed),
                 wd_how=_wd_ranges(make_learner(), max_lr, wd_c.runs))
    return grids, tr1 + tr2 + tr3, sk1 + sk2 + sk3
