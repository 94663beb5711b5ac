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
import numpy as np
from matplotlib.ticker import MaxNLocator

from .callbacks.recorder import new_figure
from .callbacks.snapshots import state_dict_copy
from .callbacks.tracking import monitor_mode
from .determinism import set_seed
from .core import DivergenceError
from .distributed import launched
from .lock import appending, folder_lock
from .optim import decay_acts

__all__ = ['grid_search', 'GridResult', 'diagnose', 'run_record', 'read_log', 'run_records', 'record_problem',
           'append_record', 'plain', 'FIT_KEYS', 'paired_tie', 'decay_record', 'decay_noop', 'config_name',
           'initial_weights', 'fresh_learner', 'fit_run', 'tracked', 'split_config', 'run_key', 'as_shown',
           'logged_runs', 'mean_sd']

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
                   'steps': {'lr': r.lrs, 'mom': r.moms if r.group_moms else [], 'loss': r.raw_losses},
                   'decay': decay_record(learn)})


def decay_record(learn):
    """How the weight decay of learn's last fit acted: {'wd', 'true_wd', 'steps', 'acting_steps'}: the steps at
    which decoupled decay changed the weights of some decaying parameter group (1 - lr*wd below 1 in float32, at the
    lrs the Recorder saw); 'acting_steps' is None for L2 decay (true_wd=False), which lr does not shrink. None
    before any fit."""
    opt, lrs = learn.opt, learn.recorder.group_lrs
    if opt is None or not getattr(learn, 'fit_args', None):
        return None
    wd = learn.fit_args.get('wd')
    out = {'wd': wd, 'true_wd': bool(learn.true_wd), 'steps': len(lrs), 'acting_steps': None if lrs or not
           learn.true_wd else 0}
    if learn.true_wd and lrs:
        acting = np.zeros(len(lrs), dtype=bool)
        arr = np.asarray(lrs, dtype=float).reshape(len(lrs), -1)
        for i, g in enumerate(opt.param_groups):
            if g.get('wd') and g['params'] and i < arr.shape[1]:
                acting |= decay_acts(arr[:, i], g['wd'], g['params'][0].dtype)
        out['acting_steps'] = int(acting.sum())
    return out


def decay_noop(rec):
    """Whether run record `rec` had a weight decay that never acted (wd > 0, decoupled, and 1 - lr*wd rounded to 1
    in float32 at every step): it trained exactly as with wd=0."""
    d = rec.get('decay')
    return isinstance(d, dict) and bool(d.get('wd')) and d.get('acting_steps') == 0 and bool(d.get('steps'))


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
    """Append `record` to the JSONL log `file` as one line (a line cut short by a kill is ended first), under the
    file's lock (see lock.appending): processes sharing one log never interleave their lines."""
    with appending(file) as f:
        f.seek(0, 2)
        if f.tell():  # a record cut short by a kill has no newline: start on a line of our own
            f.seek(-1, 2)
            if f.read(1) != b'\n':
                f.write(b'\n')
        f.write((json.dumps(record) + '\n').encode())


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


def _diff(d):
    """A difference for the table: 4 decimals, or 2 significant figures when that would show +0.0000."""
    return f'{d:+.4f}' if abs(d) >= 5e-5 or d == 0 else f'{d:+.1e}'


def mean_sd(xs):
    """(mean, sample sd) of the numbers `xs`; sd None for fewer than two, mean None for none."""
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


def _ok(rec, monitor):
    v = rec['final'].get(monitor)
    return rec['status'] == 'done' and v is not None and math.isfinite(v)


# the 95th percentile of Student's t by degrees of freedom (a two-sided test at the 10% level); between two listed
# values the smaller df's (larger, so more ties); past 30, the normal's 1.645
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
       12: 1.782, 15: 1.753, 20: 1.725, 30: 1.697}


def _t95(df):
    return 1.645 if df > 30 else T95[max(k for k in T95 if k <= df)]


def paired_tie(a, b, monitor):
    """Whether the runs `a` and `b` (records of two configs, one per seed) cannot be told apart by `monitor`: over
    the n seeds both finished, the per-seed differences d = b - a are all 0 (identical runs; with one seed only that
    is a tie), or their mean is within its seed-to-seed spread: |mean d| <= t * sd(d) / sqrt(n), t the 95th
    percentile of Student's t with n - 1 degrees of freedom (a paired t-test that cannot reject 'no difference' at
    the 10% level). Paired, because a seed gives every config the same initial weights and data order, so what the
    seed adds to both cancels in d. None when no seed has both finished."""
    va = {r['seed']: r['final'][monitor] for r in a if _ok(r, monitor)}
    vb = {r['seed']: r['final'][monitor] for r in b if _ok(r, monitor)}
    d = [vb[k] - va[k] for k in va if k in vb]
    if not d:
        return None
    if all(x == 0 for x in d):
        return True
    m, sd = mean_sd(d)
    return sd is not None and abs(m) <= _t95(len(d) - 1) * sd / math.sqrt(len(d))


class GridResult:
    """The runs of a grid (`runs`: records as written to the log) with a table, plots and verdicts.

    With several seeds per config (grid_search(seeds=...)), a config is summarised by the mean and sd of its runs,
    and configs the seeds cannot tell apart from the best are marked as a tie (see `paired_tie`)."""

    def __init__(self, runs, monitor='valid_loss'):
        self.runs, self.monitor = list(runs), monitor

    def rows(self):
        """One flat dict per run: name, the config's values, seed, final losses and metrics, time, status, verdict."""
        out = []
        for r in self.runs:
            row = {'name': r['name'], **{k: _fmt(v) for k, v in r['config'].items()}, 'seed': r.get('seed')}
            row.update({k: v for k, v in r['final'].items()})
            row.update({'seconds': r['seconds'], 'status': r['status'], 'verdict': r['verdict']})
            out.append(row)
        return out

    def groups(self):
        """The runs by config (their config, fixed settings, epochs, max_lr, policy and tag), in order of first
        appearance: one list of runs (one per seed) per config."""
        out, index = [], {}
        for r in self.runs:
            key = r.get('key')
            ident = json.dumps({k: v for k, v in key.items() if k != 'seed'} if isinstance(key, dict) else
                               {'config': r['config'], 'fixed': r.get('fixed') or {}}, sort_keys=True)
            i = index.get(ident)
            if i is None or any(x.get('seed') == r.get('seed') for x in out[i]):  # a config listed twice: its own
                index[ident] = i = len(out)
                out.append([])
            out[i].append(r)
        return out

    def summary(self, monitor=None, mode='auto'):
        """One dict per config: name, config, seeds, n (finished runs), final (mean of each final value), sd, seconds
        (total), status, verdict and diagnosis (of the mean valid loss per epoch), noop (its weight decay never
        acted), and against the best config by `monitor`: 'rank' ('best', 'tie', 'worse', or None when no seed
        finished in both) and 'tie' (the names of the configs tied with it). A config of one run also has every
        field of its record."""
        monitor = monitor or self.monitor
        sign = 1 if monitor_mode(monitor, mode) == 'min' else -1
        out = []
        for runs in self.groups():
            ok = [r for r in runs if _ok(r, monitor)]
            done = [r for r in runs if r['status'] == 'done']
            keys = list(dict.fromkeys(k for r in runs for k in r['final']))
            # a config none of whose runs finished still shows what its runs ended at
            stats = {k: mean_sd([r['final'][k] for r in done or runs if _is_num(r['final'].get(k), none=False)])
                     for k in keys}
            n_ep = max(len(r['epochs']) for r in runs)
            curve = [mean_sd([r['epochs'][e]['valid_loss'] for r in done if e < len(r['epochs']) and
                              _is_num(r['epochs'][e].get('valid_loss'), none=False)])[0] for e in range(n_ep)]
            word, why = diagnose(curve) if len(runs) > 1 else (runs[0]['verdict'], runs[0]['diagnosis'])
            words = [r['verdict'] for r in runs]
            if len(set(words)) > 1:
                word, why = f'{word} (mixed)', f"{why}; per seed: {', '.join(words)}"
            bad = len(runs) - len(done)
            out.append({**(runs[0] if len(runs) == 1 else {}),
                        'name': runs[0]['name'], 'config': runs[0]['config'], 'fixed': runs[0].get('fixed') or {},
                        'seeds': [r.get('seed') for r in runs], 'runs': runs, 'n': len(done),
                        'final': {k: m for k, (m, _) in stats.items()}, 'sd': {k: sd for k, (_, sd) in stats.items()},
                        'seconds': sum(r['seconds'] for r in runs),
                        'status': 'done' if not bad else runs[0]['status'] if len(runs) == 1 else
                        f'diverged {bad}/{len(runs)}',
                        'verdict': word, 'diagnosis': why, 'noop': all(decay_noop(r) for r in runs),
                        'complete': len(ok) == len(runs), 'rank': None, 'tie': []})
        cands = [c for c in out if c['complete']] or [c for c in out if c['n'] and c['final'].get(monitor) is not None]
        if cands:
            # the lowest mean (highest for a score); among equal means a config whose decay acted before a no-op
            best = min(cands, key=lambda c: (sign * c['final'][monitor], c['noop']))
            for c in out:
                tie = paired_tie(best['runs'], c['runs'], monitor) if c is not best else None
                c['rank'] = 'best' if c is best else 'tie' if tie else 'worse' if tie is False else None
            tied = [c['name'] for c in out if c['rank'] == 'tie']
            for c in out:
                if c['rank'] in ('best', 'tie'):
                    c['tie'] = [n for n in [best['name'], *tied] if n != c['name']]
        return out

    def table(self, monitor=None):
        """One row per config as an aligned text table: its values, the seeds, the mean final values (and the
        sd of `monitor` with several seeds), time, status, verdict, and 'vs best' (best, tie, or how much worse)."""
        monitor = monitor or self.monitor
        summ = self.summary(monitor)
        if not summ:
            return '(no runs)'
        several = any(len(c['runs']) > 1 for c in summ)
        best = next((c for c in summ if c['rank'] == 'best'), None)
        keys = list(dict.fromkeys(k for c in summ for k in c['config']))  # every config's columns, before the rest
        rows = []
        for c in summ:
            row = {'name': c['name'], **{k: _fmt(c['config'][k]) if k in c['config'] else None for k in keys}}
            row['seed' + ('s' if several else '')] = ','.join(str(x) for x in c['seeds'])
            for k, v in c['final'].items():
                row[k] = v
                if several and k == monitor:
                    row[f'{k} sd'] = c['sd'].get(k)
            # the time of the runs, as recorded when they trained (a reused run keeps its first invocation's time)
            row.update({'seconds': c['seconds'], 'status': c['status'], 'verdict': c['verdict']})
            if best is not None and c['rank'] is not None:
                row['vs best'] = (c['rank'] if c['rank'] != 'worse' or c['final'].get(monitor) is None else
                                  _diff(c['final'][monitor] - best['final'][monitor]))
            if c['noop']:
                row['vs best'] = row.get('vs best', '') + ' (wd no-op)'
            rows.append(row)
        cols = list(dict.fromkeys(k for r in rows for k in r))
        def cell(v, c):
            if v is None:
                return ''
            return f'{v:.1f}' if c == 'seconds' else f'{v:.4f}' if isinstance(v, float) else str(v)
        width = {c: max(len(c), *(len(cell(r.get(c), c)) for r in rows)) for c in cols}
        lines = ['  '.join(c.ljust(width[c]) for c in cols)]
        lines += ['  '.join(cell(r.get(c), c).ljust(width[c]) for c in cols) for r in rows]
        return '\n'.join(line.rstrip() for line in lines)

    def __repr__(self):
        return self.table()

    def best(self, monitor=None, mode='auto'):
        """The config with the best mean final `monitor` among finished configs (min for losses/errors, max
        otherwise), as a `summary` dict (for a config of one run: its record with the summary's fields).

        Its 'tie' lists the configs the seeds cannot tell apart from it (see `paired_tie`; with one seed, only
        identical results): when it is not empty the grid did not pick, and the name is only the lowest mean."""
        monitor = monitor or self.monitor
        best = next((c for c in self.summary(monitor, mode) if c['rank'] == 'best'), None)
        if best is None:
            raise ValueError(f'GridResult.best: no finished run has a final {monitor!r}')
        return best

    def verdicts(self, monitor=None):
        """One line per config: its name, verdict and why; then how it compares with the best: best, a tie (the
        seeds cannot tell it from the best), or how much worse; a weight decay that never acted is said."""
        monitor = monitor or self.monitor
        lines = []
        for c in self.summary(monitor):
            line = f"{c['name']}: {c['verdict']} - {c['diagnosis']}"
            m, sd = c['final'].get(monitor), c['sd'].get(monitor)
            val = '' if m is None else f'{monitor} {m:.4f}' + (f' +- {sd:.4f} ({c["n"]} seeds)' if sd else '')
            if c['rank'] == 'best':
                line += f"; {val}: {'TIE with ' + ', '.join(c['tie']) if c['tie'] else 'best'}"
            elif c['rank'] == 'tie':
                line += f"; {val}: TIE with the best ({c['tie'][0]})"
            elif val:
                line += f'; {val}'
            if c['noop']:
                line += '; its weight decay never acted (lr*wd <= 2**-25 at every step): the same run as wd=0'
            lines.append(line)
        return '\n'.join(lines)

    def plot(self, metric='valid_loss', ax=None, title=None):
        """`metric` per epoch, one line per config (the mean of its seeds, with their range shaded) on one axes (the
        comparison plot). Returns the Figure."""
        fig, (ax,) = new_figure(ax, figsize=(7, 4.5))
        summ = self.summary()
        for i, c in sorted(enumerate(summ), key=lambda ic: ic[1]['noop']):  # a no-op's dashed line on top of the
            # run it repeats; colours in the table's order
            per_epoch = {}
            for r in c['runs']:
                for e in r['epochs']:
                    if _is_num(e.get(metric), none=False) and math.isfinite(e[metric]):
                        per_epoch.setdefault(e['epoch'], []).append(e[metric])
            if not per_epoch:
                continue
            ep = sorted(per_epoch)
            label = c['name'] + (f" ({c['status']})" if c['status'] != 'done' else '') + \
                (' (wd no-op: = wd 0)' if c['noop'] else '')
            line, = ax.plot(ep, [np.mean(per_epoch[e]) for e in ep], marker='o', label=label, color=f'C{i % 10}',
                            linestyle='--' if c['noop'] else '-')
            if len(c['runs']) > 1:
                ax.fill_between(ep, [min(per_epoch[e]) for e in ep], [max(per_epoch[e]) for e in ep],
                                color=line.get_color(), alpha=0.15)
        n = max((len(c['runs']) for c in summ), default=1)
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        if ys and min(ys) > 0 and max(ys) / min(ys) > 20:  # a diverging run would flatten every other line
            ax.set_yscale('log')
        ax.set_xlabel('Epoch')
        ax.set_ylabel(metric + (' (log scale)' if ax.get_yscale() == 'log' else ''))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title or f'{metric} per epoch' + (f' (mean of {n} seeds, range shaded)' if n > 1 else ''))
        handles = ax.get_legend_handles_labels()[0]
        if len(handles) > 6:  # many configs (a search): the legend beside the axes, not over the lines
            ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0))
        elif handles:  # every run diverged: nothing to name
            ax.legend(fontsize=8)
        return fig

    def plot_losses(self, ncols=3):
        """Train and validation loss per epoch, one small axes per config (a line per seed), titled with its name
        and verdict."""
        summ = self.summary()
        n = len(summ)
        if not n:
            raise ValueError('GridResult.plot_losses: no runs')
        ncols = min(ncols, n)
        nrows = math.ceil(n / ncols)
        fig, axs = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.4 * nrows + 0.4), squeeze=False)
        if 'inline' in matplotlib.get_backend():
            plt.close(fig)
        for ax, c in zip(axs.flat, summ):
            for j, r in enumerate(c['runs']):
                ep = r['epochs']
                tr = [(e['epoch'], e['train_loss']) for e in ep if _is_num(e.get('train_loss'), none=False)]
                val = [(e['epoch'], e['valid_loss']) for e in ep if _is_num(e.get('valid_loss'), none=False)]
                alpha = 1 if len(c['runs']) == 1 else 0.7
                if tr:
                    ax.plot(*zip(*tr), marker='o', color='C0', alpha=alpha, label='train' if not j else None)
                if val:
                    ax.plot(*zip(*val), marker='o', color='C1', alpha=alpha, label='valid' if not j else None)
            seeds = f" ({len(c['runs'])} seeds)" if len(c['runs']) > 1 else ''
            ax.set_title(f"{c['name']}{seeds}\n{c['verdict']}" + (' - wd no-op' if c['noop'] else ''), fontsize=8)
            ax.set_xlabel('Epoch', fontsize=8)
            ax.set_ylabel('Loss', fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=7)
        for ax in list(axs.flat)[n:]:
            ax.axis('off')
        fig.suptitle('Train and validation loss per epoch, one panel per config', fontsize=10)
        fig.tight_layout()
        return fig


def grid_search(make_learner, grid, epochs=2, max_lr=1e-2, seed=0, policy='one_cycle', log=None, skip_done=True,
                silent=None, monitor='valid_loss', fixed=None, tag=None, seeds=None, tracker=None):
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
        seeds: a list of seeds instead of `seed`: every config runs once per seed (seed by seed; within a seed as
            above), each record keeps its seed, and GridResult reports each config's mean and sd and marks as a
            tie the configs the seeds cannot tell apart from the best (see paired_tie). seeds=[s] is seed=s.
        log: a JSONL file: each finished run is appended as one JSON object (config, seed, status, per-epoch rows,
            per-step lr/mom/loss; pandas.read_json(log, lines=True) reads it). With skip_done, a run whose config,
            seed, epochs, max_lr and policy already have a record there is not trained again (its record is reused,
            also one another grid wrote, under this grid's name): re-running a grid after an interruption only trains
            the (config, seed) pairs that are missing.
        silent: passed to the learners (None keeps their setting). A learner that is not silent prints a line
            naming the run (config and seed) before its epoch table.
        monitor: what GridResult.best compares by default.
        fixed: settings shared by every config (e.g. {'moms': (0.95, 0.85)} while searching wd); they are applied
            and logged (record['fixed']) but kept out of the run names.
        tag: anything JSON-able that identifies what make_learner builds (data, model, batch size...): part of
            a run's identity in the log, so a log shared by different setups never hands one setup's runs to
            another.
        tracker: a tracker (minifast.callbacks.trackers: TensorBoardLogger, MLflowLogger, WandbLogger): every run
            this call trains is logged live as one child run of it (named as in the table, with the seed), with its
            config and seed as parameters; a run reused from `log` is replayed into it from its record
            (Tracker.log_record), so each tracker run shows the whole grid.

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
    configs, seeds = _configs(grid), _seeds(seed, seeds)
    # the log's folder is written by this process alone while the grid runs: a second grid_search (or smith run)
    # on it would train the same runs again and append duplicates
    with folder_lock(Path(log).parent, 'grid_search(log=...)') if log is not None else contextlib.nullcontext():
        return _search(make_learner, configs, epochs, max_lr, seeds, policy, log, skip_done, silent, monitor, fixed,
                       tag, tracker)


def _seeds(seed, seeds):
    """The list of seeds of a grid: [seed], or `seeds` (distinct integers) when given."""
    if seeds is None:
        return [seed]
    if seed != 0:
        raise ValueError(f'grid_search: give seed= or seeds=, not both (got seed={seed!r}, seeds={seeds!r})')
    seeds = list(seeds) if isinstance(seeds, (list, tuple, range)) else None
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) or \
            len(set(seeds)) != len(seeds):
        raise ValueError(f'grid_search: seeds must be a non-empty list of distinct integers, got {seeds!r}')
    return seeds


def _search(make_learner, configs, epochs, max_lr, seeds, policy, log, skip_done, silent, monitor, fixed, tag,
            tracker):
    done = logged_runs(log) if log is not None and skip_done else {}
    fixed = dict(fixed or {})
    runs, total = [], len(configs) * len(seeds)
    for seed in seeds:  # seed by seed: an interrupted grid has compared every config on its first seeds
        init = None
        for config in configs:
            shown, config = config, {**fixed, **config}
            pol, n_ep, fit, made = split_config(config, policy, epochs)
            key = run_key(config, seed, n_ep, max_lr, pol, tag)
            cached = done.get(json.dumps(key, sort_keys=True))
            if cached is not None:
                runs.append(as_shown(cached, shown, fixed))
                if tracker is not None:  # the tracker shows every run of the grid, reused ones replayed from the log
                    tracker.log_record(runs[-1], name=f'{config_name(shown)} seed {seed}')
                continue
            if init is None:
                # from the first config's learner, whichever runs are in the log, so a resumed grid starts where a
                # fresh one would
                init = initial_weights(make_learner, {**fixed, **configs[0]}, seed)
            learn = fresh_learner(make_learner, made, init, seed, silent)
            if not learn.silent:  # the epoch table that follows belongs to this run
                print(f'grid run {len(runs) + 1}/{total}: {config_name(shown)}, seed {seed}', flush=True)
            set_seed(seed)
            t0 = time.perf_counter()
            with tracked(tracker, f'{config_name(shown)} seed {seed}', {**plain(config), 'seed': seed}) as cbs:
                status = fit_run(learn, pol, n_ep, fit, max_lr, callbacks=cbs)
            rec = run_record(learn, shown, seed, status, time.perf_counter() - t0)
            rec['key'], rec['fixed'] = key, plain(fixed)
            if log is not None:
                append_record(log, rec)
            runs.append(rec)
    return GridResult(runs, monitor)


@contextlib.contextmanager
def tracked(tracker, name, params):
    """The callbacks that log one run to `tracker` (a child run named `name` with `params`), for the body of a with
    statement; [] without a tracker."""
    if tracker is None:
        yield []
        return
    with tracker.child(name, params) as child:
        yield [child]


def as_shown(rec, shown, fixed):
    """A logged record under this grid's name: the same run (same key) may have been logged by another grid that
    split its settings between config and fixed differently."""
    if rec['config'] == plain(shown) and (rec.get('fixed') or {}) == plain(fixed):
        return rec
    return {**rec, 'name': config_name(shown), 'config': plain(shown), 'fixed': plain(fixed)}


def logged_runs(log):
    """The records of the log `log` by their key (as sorted JSON); a later record of a key replaces an earlier one."""
    return {json.dumps(rec.get('key'), sort_keys=True): rec for rec in run_records(log)}


def run_key(config, seed, epochs, max_lr, policy, tag):
    """A run's identity in the log (JSON-friendly): its config, seed, epochs, max_lr and policy, and `tag` if given."""
    key = plain({'config': config, 'seed': seed, 'epochs': epochs, 'max_lr': max_lr, 'policy': policy})
    if tag is not None:
        key['tag'] = plain(tag)
    return key


def split_config(config, policy, epochs):
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


def initial_weights(make_learner, config, seed):
    """A copy of the weights of the learner that `config`'s make_learner keys build after set_seed(seed)."""
    first = {k: v for k, v in config.items() if k not in FIT_KEYS}
    set_seed(seed)
    return state_dict_copy(make_learner(**first).model)


def fresh_learner(make_learner, made, init, seed, silent):
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


def fit_run(learn, pol, n_ep, fit, max_lr, callbacks=None, resume=None):
    """Train `learn` with the policy `pol` for `n_ep` epochs (with this fit's extra `callbacks`, e.g. a tracker's or
    a pruner's, and fit's `resume`); 'done', or 'diverged' on a DivergenceError."""
    fit = dict(fit, callbacks=callbacks, resume=resume)
    try:
        if pol == 'one_cycle':
            # a config's lr is the peak when it gives no max_lr (as max_lr is the constant policy's lr without
            # lr): dropping it would train every lr of a grid at the default max_lr under different names
            lr = fit.pop('max_lr', fit.pop('lr', max_lr))  # pops both
            learn.fit_one_cycle(n_ep, lr, **fit)
        else:
            lr = fit.pop('lr', fit.pop('max_lr', max_lr))
            learn.fit(n_ep, lr, **fit)
    except DivergenceError:
        return 'diverged'
    return 'done'
