"""Hyper-parameter grids run fairly (same initial weights, same data order), with a record of every run, a table,
comparison plots and a one-line over/under-fitting verdict per run (seed 004's early diagnosis)."""
import contextlib
import itertools
import json
import math
import time
import warnings
from numbers import Number
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from .callbacks.recorder import new_figure
from .callbacks.snapshots import state_dict_copy
from .callbacks.tracking import monitor_mode
from .determinism import set_seed
from .core import DivergenceError
from .distributed import launched
from .lock import folder_lock

__all__ = ['grid_search', 'GridResult', 'diagnose', 'run_record', 'read_log', 'run_records', 'record_problem',
           'append_record', 'plain', 'FIT_KEYS']

# config keys that go to the fit call; every other key goes to make_learner(**keys)
FIT_KEYS = ('policy', 'epochs', 'max_lr', 'lr', 'moms', 'wd', 'div_factor', 'pct_start', 'final_div')
POLICIES = ('one_cycle', 'constant')


def plain(v):
    """JSON-friendly values: tuples become lists, numpy and torch scalars plain numbers, slices strings."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, slice):
        return f'slice({v.start}, {v.stop})'
    if isinstance(v, (bool, str)) or v is None:
        return v
    if isinstance(v, Number) or hasattr(v, 'item'):
        v = float(v) if not isinstance(v, int) else v
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return str(v)


def _fmt(v):
    if isinstance(v, float):
        return f'{v:g}'
    if isinstance(v, (list, tuple)):
        return '(' + ', '.join(_fmt(x) for x in v) + ')'
    return str(v)


def config_name(config):
    """'moms=(0.95, 0.85) wd=0.0001' for {'moms': (0.95, 0.85), 'wd': 1e-4}."""
    return ' '.join(f'{k}={_fmt(v)}' for k, v in config.items()) or 'default'


def diagnose(valid_losses, rtol=0.):
    """Seed 004's early diagnosis from the validation loss per epoch: 'underfitting' when it is still falling at
    the end (train longer or harder), 'overfitting' when it rose again after its minimum (more regularisation, or
    stop earlier), 'flat' otherwise; with fewer than two values, 'too short'. `rtol` ignores changes smaller than
    that fraction. Epochs without a finite value are skipped (the epoch numbers stay those of the fit).
    Returns (word, sentence)."""
    pts = [(e, x) for e, x in enumerate(valid_losses) if x is not None and math.isfinite(x)]
    if len(pts) < 2:
        return 'too short', 'fewer than two finite validation losses: train longer to tell'
    (_, prev), (e_last, last) = pts[-2], pts[-1]
    e_min, low = min(pts, key=lambda p: p[1])
    if e_min == e_last and last < prev * (1 - rtol):
        return 'underfitting', (f'valid loss still falling ({prev:.4f} -> {last:.4f} in the last epoch): train '
                                f'longer, or with a higher learning rate or less regularisation')
    if e_min != e_last and last > low * (1 + rtol):
        return 'overfitting', (f'valid loss rose from {low:.4f} (epoch {e_min}) to {last:.4f}: more regularisation '
                               f'(weight decay, augmentation) or fewer epochs')
    return 'flat', f'valid loss levelled off at {last:.4f}: about the right length for this setting'


def run_record(learn, config, seed, status, seconds, name=None):
    """One run as a JSON-friendly dict: config, seed, status, per-epoch rows, per-step lr/mom/loss, final values."""
    r = learn.recorder
    names = ['train_loss', 'valid_loss', *r.metrics_names]
    epochs = []
    for e in range(len(r.train_losses)):
        row = {'epoch': e, 'train_loss': r.train_losses[e], 'valid_loss': r.val_losses[e]}
        row.update({m: (r.metrics[e][i] if i < len(r.metrics[e]) else None) for i, m in enumerate(r.metrics_names)})
        row['time'] = r.times[e]
        epochs.append(row)
    final = {k: (epochs[-1][k] if epochs else None) for k in names}
    word, why = diagnose(r.val_losses)
    return plain({'name': name or config_name(config), 'config': config, 'seed': seed, 'status': status,
                   'seconds': seconds, 'final': final, 'verdict': word, 'diagnosis': why, 'epochs': epochs,
                   'steps': {'lr': r.lrs, 'mom': r.moms if r.group_moms else [], 'loss': r.raw_losses}})


def _numbered_records(file):
    """(line number, record) of each valid JSON line of a JSONL log; a line that is not valid JSON (a process killed
    while writing it) is skipped with a warning naming the file and line."""
    file = Path(file)
    if not file.exists():
        return []
    out, bad = [], []
    for i, line in enumerate(file.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            out.append((i + 1, json.loads(line)))
        except json.JSONDecodeError:
            bad.append(i + 1)
    if bad:
        warnings.warn(f'{file}: line(s) {bad} are not valid JSON (a write cut short?); skipped')
    return out


def read_log(file):
    """The records of a JSONL run log (one JSON object per line). A line that is not valid JSON (a process killed
    while writing it) is skipped with a warning naming the file and line; its run counts as not done."""
    return [rec for _, rec in _numbered_records(file)]


def _is_num(v, none=True):
    return (v is None and none) or (isinstance(v, Number) and not isinstance(v, bool))


def record_problem(rec):
    """Why `rec` is not a run record as `run_record` writes it (with the types GridResult and `minifast smith` rely
    on), or None when it is one."""
    if not isinstance(rec, dict):
        return f'a JSON {type(rec).__name__}, not an object'
    for k, kind in (('name', str), ('config', dict), ('status', str), ('final', dict), ('verdict', str),
                    ('diagnosis', str), ('epochs', list)):
        if not isinstance(rec.get(k), kind):
            return f'{k!r} is {"missing" if k not in rec else repr(rec[k])[:40]}, not a {kind.__name__}'
    if not _is_num(rec.get('seconds'), none=False):
        return f"'seconds' is {rec.get('seconds')!r}, not a number"
    bad = [k for k, v in rec['final'].items() if not _is_num(v)]
    if bad:
        return f"'final' values {bad} are not numbers"
    for row in rec['epochs']:
        if not isinstance(row, dict) or not isinstance(row.get('epoch'), int) or \
                not all(_is_num(v) for v in row.values()):
            return f"'epochs' holds a row that is not {{'epoch': int, name: number, ...}}: {str(row)[:60]}"
    key = rec.get('key')
    if key is not None:  # the run's identity: what it was looked up by must be what its config says it ran
        fixed = rec.get('fixed') or {}
        if not isinstance(key, dict) or not isinstance(fixed, dict) or key.get('config') != {**fixed, **rec['config']}:
            return "its 'config' (with 'fixed') is not the config of its 'key'"
    return None


def run_records(file):
    """The run records of the JSONL log `file`: like `read_log`, and a record that is not a run record (see
    `record_problem`: a tampered or garbled line) is skipped with a warning naming the file, the line and why; its run
    counts as not done."""
    out = []
    for line, rec in _numbered_records(file):
        why = record_problem(rec)
        if why is None:
            out.append(rec)
        else:
            warnings.warn(f'{file}: line {line} is not a run record ({why}); ignored, its run counts as not done')
    return out


def append_record(file, record):
    """Append `record` to the JSONL log `file` as one line (a line cut short by a kill is ended first)."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, 'a+b') as f:
        f.seek(0, 2)
        if f.tell():  # a record cut short by a kill has no newline: start on a line of our own
            f.seek(-1, 2)
            if f.read(1) != b'\n':
                f.write(b'\n')
        f.write((json.dumps(record) + '\n').encode())
        f.flush()


def _configs(grid):
    if isinstance(grid, dict):
        for k, vs in grid.items():
            if not isinstance(vs, (list, tuple)) or not len(vs):
                raise ValueError(f'grid_search: grid[{k!r}] must be a non-empty list of values, got {vs!r}')
        keys = list(grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    configs = [dict(c) for c in grid]
    if not configs:
        raise ValueError('grid_search: the grid is empty')
    return configs


class GridResult:
    """The runs of a grid (`runs`: records as written to the log) with a table, plots and verdicts."""

    def __init__(self, runs, monitor='valid_loss'):
        self.runs, self.monitor = list(runs), monitor

    def rows(self):
        """One flat dict per run: name, the config's values, final losses and metrics, time, status, verdict."""
        out = []
        for r in self.runs:
            row = {'name': r['name'], **{k: _fmt(v) for k, v in r['config'].items()}}
            row.update({k: v for k, v in r['final'].items()})
            row.update({'seconds': r['seconds'], 'status': r['status'], 'verdict': r['verdict']})
            out.append(row)
        return out

    def table(self):
        """The rows as an aligned text table."""
        rows = self.rows()
        if not rows:
            return '(no runs)'
        cols = list(dict.fromkeys(k for r in rows for k in r))
        cell = lambda v: '' if v is None else f'{v:.4f}' if isinstance(v, float) else str(v)  # noqa: E731
        width = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in cols}
        lines = ['  '.join(c.ljust(width[c]) for c in cols)]
        lines += ['  '.join(cell(r.get(c)).ljust(width[c]) for c in cols) for r in rows]
        return '\n'.join(lines)

    def __repr__(self):
        return self.table()

    def best(self, monitor=None, mode='auto'):
        """The record with the best final `monitor` among finished runs (min for losses/errors, max otherwise)."""
        monitor = monitor or self.monitor
        mode = monitor_mode(monitor, mode)
        ok = [r for r in self.runs if r['status'] == 'done' and r['final'].get(monitor) is not None]
        if not ok:
            raise ValueError(f'GridResult.best: no finished run has a final {monitor!r}')
        key = lambda r: r['final'][monitor]  # noqa: E731
        return min(ok, key=key) if mode == 'min' else max(ok, key=key)

    def verdicts(self):
        """One line per run: its name, verdict and why."""
        return '\n'.join(f"{r['name']}: {r['verdict']} - {r['diagnosis']}" for r in self.runs)

    def plot(self, metric='valid_loss', ax=None):
        """`metric` per epoch, one line per run, on one axes (the comparison plot). Returns the Figure."""
        fig, (ax,) = new_figure(ax, figsize=(7, 4.5))
        for r in self.runs:
            pts = [(e['epoch'], e.get(metric)) for e in r['epochs'] if e.get(metric) is not None]
            if pts:
                ax.plot(*zip(*pts), marker='o', label=r['name'] + (' (diverged)' if r['status'] != 'done' else ''))
        ax.set_xlabel('Epoch')
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
        return fig

    def plot_losses(self, ncols=3):
        """Train and validation loss per epoch for each run, one small axes per run, titled with its verdict."""
        n = len(self.runs)
        if not n:
            raise ValueError('GridResult.plot_losses: no runs')
        ncols = min(ncols, n)
        nrows = math.ceil(n / ncols)
        fig, axs = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
        if 'inline' in matplotlib.get_backend():
            plt.close(fig)
        for ax, r in zip(axs.flat, self.runs):
            ep = r['epochs']
            ax.plot([e['epoch'] for e in ep], [e['train_loss'] for e in ep], marker='o', label='train')
            val = [(e['epoch'], e['valid_loss']) for e in ep if e['valid_loss'] is not None]
            if val:
                ax.plot(*zip(*val), marker='o', label='valid')
            ax.set_title(f"{r['name']}\n{r['verdict']}", fontsize=8)
            ax.legend(fontsize=7)
        for ax in list(axs.flat)[n:]:
            ax.axis('off')
        fig.tight_layout()
        return fig


def grid_search(make_learner, grid, epochs=2, max_lr=1e-2, seed=0, policy='one_cycle', log=None, skip_done=True,
                silent=None, monitor='valid_loss', fixed=None, tag=None):
    """Train one learner per configuration of `grid` and compare them.

    Args:
        make_learner: a function returning a fresh Learner; config keys other than fit's (FIT_KEYS: policy,
            epochs, max_lr, lr, moms, wd, div_factor, pct_start, final_div) are passed to it as keyword arguments.
        grid: {name: [values]} (every combination is run, in order) or a list of config dicts.
        epochs, max_lr, policy: defaults for configs that do not set them; policy 'one_cycle'
            (fit_one_cycle(epochs, max_lr, ...) with max_lr = config's max_lr, else its lr, else max_lr) or
            'constant' (fit(epochs, lr) with lr = config's lr, else its max_lr, else max_lr).
        seed: every run starts from the same initial weights (those of the first learner made after set_seed(seed))
            and sees the same data order (set_seed(seed) before each fit), so the comparison is fair.
        log: a JSONL file: each finished run is appended as one JSON object (config, seed, status, per-epoch rows,
            per-step lr/mom/loss; pandas.read_json(log, lines=True) reads it). With skip_done, a run whose config,
            seed, epochs, max_lr and policy already have a record there is not trained again (its record is reused):
            re-running a grid after an interruption only trains what is missing.
        silent: passed to the learners (None keeps their setting).
        monitor: what GridResult.best compares by default.
        fixed: settings shared by every config (e.g. {'moms': (0.95, 0.85)} while searching wd); they are applied
            and logged (record['fixed']) but kept out of the run names.
        tag: anything JSON-able that identifies what make_learner builds (data, model, batch size...): part of
            a run's identity in the log, so a log shared by different setups never hands one setup's runs to
            another.

    A run that diverges (DivergenceError) is recorded with status 'diverged' and the grid goes on. It runs as one
    process: under torchrun it is an error (its log is not written for several ranks). With `log`, the log's folder
    is locked while the grid runs (see minifast.lock): another process's grid_search on it stops at once with a
    FolderLockedError naming the folder and this PID.
    """
    if launched():
        raise RuntimeError('grid_search runs as one process, not under torchrun (its log and skipping of finished '
                           'runs are not made for several ranks); run it without torchrun, or set '
                           'MINIFAST_DISTRIBUTED=0')
    if policy not in POLICIES:
        raise ValueError(f'grid_search: policy must be one of {POLICIES}, got {policy!r}')
    configs = _configs(grid)
    # the log's folder is written by this process alone while the grid runs: a second grid_search (or smith run)
    # on it would train the same runs again and append duplicates
    with folder_lock(Path(log).parent, 'grid_search(log=...)') if log is not None else contextlib.nullcontext():
        return _search(make_learner, configs, epochs, max_lr, seed, policy, log, skip_done, silent, monitor, fixed,
                       tag)


def _search(make_learner, configs, epochs, max_lr, seed, policy, log, skip_done, silent, monitor, fixed, tag):
    done = _logged_runs(log) if log is not None and skip_done else {}
    fixed = dict(fixed or {})
    runs, init = [], None
    for config in configs:
        shown, config = config, {**fixed, **config}
        pol, n_ep, fit, made = _split_config(config, policy, epochs)
        key = _run_key(config, seed, n_ep, max_lr, pol, tag)
        cached = done.get(json.dumps(key, sort_keys=True))
        if cached is not None:
            runs.append(cached)
            continue
        if init is None:
            # from the first config's learner, whichever runs are in the log, so a resumed grid starts where a
            # fresh one would
            init = _initial_weights(make_learner, {**fixed, **configs[0]}, seed)
        learn = _fresh_learner(make_learner, made, init, seed, silent)
        set_seed(seed)
        t0 = time.perf_counter()
        status = _fit_run(learn, pol, n_ep, fit, max_lr)
        rec = run_record(learn, shown, seed, status, time.perf_counter() - t0)
        rec['key'], rec['fixed'] = key, plain(fixed)
        if log is not None:
            append_record(log, rec)
        runs.append(rec)
    return GridResult(runs, monitor)


def _logged_runs(log):
    """The records of the log `log` by their key (as sorted JSON); a later record of a key replaces an earlier one."""
    return {json.dumps(rec.get('key'), sort_keys=True): rec for rec in run_records(log)}


def _run_key(config, seed, epochs, max_lr, policy, tag):
    """A run's identity in the log (JSON-friendly): its config, seed, epochs, max_lr and policy, and `tag` if given."""
    key = plain({'config': config, 'seed': seed, 'epochs': epochs, 'max_lr': max_lr, 'policy': policy})
    if tag is not None:
        key['tag'] = plain(tag)
    return key


def _split_config(config, policy, epochs):
    """(policy, epochs, fit's keyword arguments, make_learner's keyword arguments) of a config; `policy` and `epochs`
    when it sets neither. ValueError for an unknown policy, or for arguments the 'constant' policy does not take."""
    for k in config:
        if k == 'policy' and config[k] not in POLICIES:
            raise ValueError(f'grid_search: config {config_name(config)}: policy must be one of {POLICIES}')
    fit = {k: v for k, v in config.items() if k in FIT_KEYS}
    made = {k: v for k, v in config.items() if k not in FIT_KEYS}
    pol, n_ep = fit.pop('policy', policy), fit.pop('epochs', epochs)
    extra = sorted(set(fit) - {'lr', 'max_lr', 'wd'})
    if pol == 'constant' and extra:
        raise ValueError(f"grid_search: config {config_name(config)}: the 'constant' policy takes lr (or max_lr) "
                         f'and wd only, not {extra}')
    return pol, n_ep, fit, made


def _initial_weights(make_learner, config, seed):
    """A copy of the weights of the learner that `config`'s make_learner keys build after set_seed(seed)."""
    first = {k: v for k, v in config.items() if k not in FIT_KEYS}
    set_seed(seed)
    return state_dict_copy(make_learner(**first).model)


def _fresh_learner(make_learner, made, init, seed, silent):
    """make_learner(**made) after set_seed(seed), starting from the weights `init` when its model has their shapes."""
    set_seed(seed)
    learn = make_learner(**made)
    own = learn.model.state_dict()
    if own.keys() == init.keys() and all(own[k].shape == init[k].shape for k in own):
        learn.model.load_state_dict(init)  # the same starting point for every run
    # else: a config that changes the model's shape keeps its own weights (made after set_seed(seed))
    if silent is not None:
        learn.silent = silent
    return learn


def _fit_run(learn, pol, n_ep, fit, max_lr):
    """Train `learn` with the policy `pol` for `n_ep` epochs; 'done', or 'diverged' on a DivergenceError."""
    try:
        if pol == 'one_cycle':
            # a config's lr is the peak when it gives no max_lr (as max_lr is the constant policy's lr without
            # lr): dropping it would train every lr of a grid at the default max_lr under different names
            lr = fit.pop('max_lr', fit.pop('lr', max_lr))  # pops both
            learn.fit_one_cycle(n_ep, lr, **fit)
        else:
            lr = fit.pop('lr', fit.pop('max_lr', max_lr))
            learn.fit(n_ep, lr, wd=fit.pop('wd', None))
    except DivergenceError:
        return 'diverged'
    return 'done'
