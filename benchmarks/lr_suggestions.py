"""Which lr_find suggestion gives the best 1cycle max_lr? Regret of each rule on three real data sets, measured.

For each data set a grid of max_lr (9 values, 1e-4 to 1, half a decade apart) x 3 seeds of
`learn.fit_one_cycle(epochs, max_lr)` (the Learner's defaults: AdamW, wd 1e-2, moms (0.95, 0.85)) gives the best
max_lr by mean final valid accuracy. For each seed `learn.lr_find()` (defaults: 1e-7 to 10, 100 steps) runs on a
fresh model of that seed, every rule picks an lr from that curve, and fit_one_cycle is trained at each pick with that
seed. A rule's regret is the best grid accuracy minus the mean accuracy at its picks (percentage points).

Data sets (all offline), model, and the epochs of every fit on that data set:
  digits     scikit-learn's bundled 8x8 digits, fixed split 1437 train / 360 valid; MLP 64-128-10; bs 64; 12 epochs
  mnist1d    MNIST-1D (the `mnist1d` package's generator, default args: 4000 train / 1000 test); the paper's 1-D CNN
             (3 conv layers of 25 channels, a linear head); bs 100; 50 epochs
  synthetic  minifast's built-in shapes (synthetic_cifar's images and normalisation at 16x16 pixels, 10 classes,
             3000 train / 1000 valid); the CIFAR resnet8; bs 32; 10 epochs
Rules: max_lr, valley, steep and minimum (minifast's LRFindResult, on minifast's sweep), and peers' documented
rules, implemented here from their documentation (fastai itself is not installed) and applied to the sweep their
own finder would record (minifast's sweep with stop_div=False, 1e-7 to 10 in 100 steps, cut where that finder
stops: fastai and Lightning once the 0.98 EMA passes 4x its best, torch-lr-finder at 5x its own smoothing's best):
fastai v2's 'slide' (interval slide rule), Lightning's `suggestion()` and torch-lr-finder's `suggest_lr` (both the
steepest descent, with their own skips and smoothing). A rule that picks nothing (None) is trained at smith's
fallback lr, 1e-2.

Finished fits and every lr_find curve are cached in a JSON file (--cache), so a re-run trains only what is missing
and rules can be redesigned on stored sweeps (a sweep is redone only when the LRFinder's code changes).

    python benchmarks/lr_suggestions.py                        # the full run (~18 min from scratch, 1 thread)
    python benchmarks/lr_suggestions.py --sensitivity          # + max_lr's regret with its constants changed
    python benchmarks/lr_suggestions.py --datasets digits      # one data set
    python benchmarks/lr_suggestions.py --quick                # smoke run (seconds), its cache in the temp folder
"""
import argparse
import contextlib
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from minifast import (DataBunch, ImageDataBunch, Learner, accuracy, cifar_resnet, set_seed,  # noqa: E402
                      synthetic_images)
from minifast.callbacks import lr_finder  # noqa: E402
from minifast.callbacks.lr_finder import suggest_max_lr, suggestions  # noqa: E402

FALLBACK_LR = 1e-2  # what minifast smith trains at when lr_find suggests nothing
GRID = [10 ** e for e in np.arange(-4, 0.01, 0.5)]  # 1e-4 .. 1: 9 log-spaced values, half a decade apart
SEEDS = [0, 1, 2]
HERE = os.path.dirname(os.path.abspath(__file__))


# ---- data and models -------------------------------------------------------------------------------------------
def digits_data(bs, n_train=None, n_valid=None):
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    idx = np.random.RandomState(0).permutation(len(y))  # one fixed split for every seed
    tr, va = idx[:1437], idx[1437:]
    if n_train:
        tr, va = tr[:n_train], va[:n_valid]
    x = torch.tensor(x, dtype=torch.float32)
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    y = torch.tensor(y, dtype=torch.long)
    return DataBunch.from_tensors(x[tr], y[tr], x[va], y[va], bs=bs)


def digits_model():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def mnist1d_data(bs, n_train=None, n_valid=None):
    from mnist1d.data import get_dataset_args, make_dataset
    state = np.random.get_state()  # make_dataset seeds numpy's global RNG: leave it as it was
    try:
        d = make_dataset(get_dataset_args())  # 5000 samples, 80/20 split: 4000 train, 1000 test
    finally:
        np.random.set_state(state)
    xt, yt, xv, yv = d['x'], d['y'], d['x_test'], d['y_test']
    if n_train:
        xt, yt, xv, yv = xt[:n_train], yt[:n_train], xv[:n_valid], yv[:n_valid]
    f = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731 (N, 1, 40)
    return DataBunch.from_tensors(f(xt), torch.tensor(yt), f(xv), torch.tensor(yv), bs=bs)


class MNIST1DConv(nn.Module):
    """The MNIST-1D paper's CNN: three 1-D convolutions (25 channels, stride 2) with ReLUs, then a linear layer."""

    def __init__(self, channels=25):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)  # 40 -> 19
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)  # -> 10
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)  # -> 5
        self.linear = nn.Linear(channels * 5, 10)

    def forward(self, x):
        h = self.conv3(self.conv2(self.conv1(x).relu()).relu()).relu()
        return self.linear(h.flatten(1))


def synthetic_data(bs, n_train=3000, n_valid=1000, size=16):
    """synthetic_cifar's set and normalisation, at 16x16 pixels (a quarter of the compute of 32x32)."""
    d = synthetic_images(n_classes=10, n_train=n_train, n_valid=n_valid, seed=0, size=size)
    return ImageDataBunch.from_tensors(d['x_train'], d['y_train'], d['x_valid'], d['y_valid'], classes=d['classes'],
                                       bs=bs, device='cpu').normalize()


DATASETS = {
    'digits': dict(data=digits_data, model=digits_model, bs=64, epochs=12, sizes={}),
    'mnist1d': dict(data=mnist1d_data, model=MNIST1DConv, bs=100, epochs=50, sizes={}),
    'synthetic': dict(data=synthetic_data, model=lambda: cifar_resnet(8, num_classes=10), bs=32, epochs=10,
                      sizes=dict(n_train=3000, n_valid=1000)),
}
QUICK = dict(epochs=1, sizes=dict(n_train=128, n_valid=64), grid=[1e-3, 1e-2], seeds=[0], num_it=20)


# ---- peers' rules, from their documentation ---------------------------------------------------------------------
def fastai_slide(lrs, losses, lr_diff=15, thresh=0.005):
    """fastai v2 'slide' (its docs: an interval slide rule): on the curve without its first tenth and last 5 points,
    a window of lr_diff points slides leftwards from the right end until the loss gradients (per step) at its two
    ends differ by at most thresh; the lr at the window's left end."""
    n = len(lrs)
    lrs, losses = np.asarray(lrs[n // 10:n - 5]), np.asarray(losses[n // 10:n - 5])
    if len(losses) < lr_diff + 2:
        return None
    grad = np.gradient(losses)
    right, left = len(losses) - 1, len(losses) - 1 - lr_diff
    pick = lrs[left]
    while left >= 0 and abs(grad[right] - grad[left]) > thresh:
        pick = lrs[left]
        right, left = right - 1, left - 1
    return float(pick)


def lightning(lrs, losses):
    """PyTorch Lightning's `_LRFinder.suggestion()`: the steepest descent (argmin of the per-step gradient) of the
    smoothed loss after skipping the first 10 points and the last one."""
    lrs, losses = np.asarray(lrs[10:-1]), np.asarray(losses[10:-1])
    keep = np.isfinite(losses)
    if keep.sum() < 2:
        return None
    lrs, losses = lrs[keep], losses[keep]
    return float(lrs[int(np.argmin(np.gradient(losses)))])


def torch_lr_finder_smooth(raw_losses):
    """torch-lr-finder's smoothing: an EMA without debiasing, 0.05 on the new loss, started at the first loss."""
    sm, prev = [], None
    for v in raw_losses:
        prev = v if prev is None else 0.05 * v + 0.95 * prev
        sm.append(prev)
    return sm


def torch_lr_finder(lrs, raw_losses):
    """torch-lr-finder's `plot(suggest_lr=True)`: its own smoothing of the raw losses, skip the first 10 and last 5
    points, the lr of the steepest descent (per step)."""
    lrs, sm = np.asarray(lrs[10:-5]), np.asarray(torch_lr_finder_smooth(raw_losses)[10:-5])
    if len(sm) < 2:
        return None
    return float(lrs[int(np.argmin(np.gradient(sm)))])


def cut(lrs, smooth, factor):
    """The sweep as a finder that stops once `smooth` exceeds factor x its best would have recorded it."""
    best = math.inf
    for i, v in enumerate(smooth):
        if v > factor * best:
            return lrs[:i + 1], smooth[:i + 1]
        best = min(best, v)
    return lrs, smooth


def rule_picks(curve, full):
    """{rule: lr or None}: minifast's on its own sweep `curve`; each peer's on the sweep its own finder would have
    recorded (the stop_div=False sweep `full`, cut where that finder stops: fastai and Lightning at 4x the best of
    the 0.98 EMA, torch-lr-finder at 5x the best of its own smoothing)."""
    lrs, losses, raw = curve['lrs'], curve['losses'], curve['raw_losses']
    picks = dict(suggestions(lrs, losses, raw_losses=raw))  # minifast's own, recomputed with the current code
    f_lrs, f_sm = cut(full['lrs'], full['losses'], 4)
    t_lrs, t_sm = cut(full['lrs'], torch_lr_finder_smooth(full['raw_losses']), 5)
    picks.update({'fastai slide': fastai_slide(f_lrs, f_sm), 'lightning': lightning(f_lrs, f_sm),
                  'torch-lr-finder': torch_lr_finder(t_lrs, full['raw_losses'][:len(t_lrs)])})
    return picks


# ---- running and caching --------------------------------------------------------------------------------------------
class Cache:
    """A JSON file of finished fits and sweeps, rewritten atomically after each one (an interrupt loses at most the
    running fit)."""

    def __init__(self, path):
        self.path = path
        self.data = {}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        tmp = f'{self.path}.tmp{os.getpid()}'
        with open(tmp, 'w') as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


def finder_version():
    """A hash of the LRFinder's code: a stored sweep is redone when the sweep itself (not a rule) changes."""
    return hashlib.sha1(inspect.getsource(lr_finder.LRFinder).encode()).hexdigest()[:10]


class Bench:
    def __init__(self, name, spec, quick, cache):
        self.name, self.spec, self.cache = name, spec, cache
        self.epochs = QUICK['epochs'] if quick else spec['epochs']
        self.sizes = QUICK['sizes'] if quick else spec['sizes']
        self.num_it = QUICK['num_it'] if quick else 100
        self.tag = json.dumps([name, self.epochs, self.sizes, spec['bs'], torch.get_num_threads()])
        self._data = None
        self.trained, self.used = 0, {}  # fits trained by this run; {key: seconds it took} of every fit used

    @property
    def data(self):
        if self._data is None:
            self._data = self.spec['data'](self.spec['bs'], **self.sizes)
        return self._data

    def learner(self, seed):
        set_seed(seed)
        return Learner(self.data, self.spec['model'](), metrics=[accuracy], silent=True, device='cpu')

    def fit(self, lr, seed):
        """Final valid accuracy (%) of fit_one_cycle(epochs, lr) from seed's initialisation and shuffling."""
        key = f'fit {self.tag} lr={lr:.4e} seed={seed}'
        hit = self.cache.get(key)
        if hit is None:
            t = time.perf_counter()
            learn = self.learner(seed)
            learn.fit_one_cycle(self.epochs, max_lr=float(f'{lr:.4e}'))
            acc = learn.validate()[1]
            hit = {'acc': 100 * float(acc), 'secs': time.perf_counter() - t}
            self.cache.put(key, hit)
            self.trained += 1
        self.used[key] = hit['secs']
        return hit['acc']

    def stored_or_interpolated(self, lr, seed, grid):
        """The stored accuracy of fit(lr, seed), else the seed's grid accuracies interpolated in log lr."""
        hit = self.cache.get(f'fit {self.tag} lr={lr:.4e} seed={seed}')
        if hit is not None:
            return hit['acc']
        lrs = sorted(grid, key=float)
        i = SEEDS.index(seed) if seed in SEEDS else 0
        return float(np.interp(np.log10(lr), [np.log10(float(g)) for g in lrs], [grid[g][i] for g in lrs]))

    def sweep(self, seed, stop_div=True):
        """lr_find's curve (lrs, smoothed and raw losses, its suggestions) on a fresh model of `seed`."""
        key = f'sweep {self.tag} finder={finder_version()} num_it={self.num_it} stop_div={stop_div} seed={seed}'
        hit = self.cache.get(key)
        if hit is None:
            t = time.perf_counter()
            learn = self.learner(seed)
            with contextlib.redirect_stdout(io.StringIO()):
                res = learn.lr_find(num_it=self.num_it, stop_div=stop_div)
            hit = {'secs': time.perf_counter() - t, 'lrs': [float(v) for v in res.lrs],
                   'losses': [float(v) for v in res.losses],
                   'raw_losses': [float(v) for v in learn.recorder.raw_losses], 'diverged': res.diverged,
                   'max_lr': getattr(res, 'max_lr', None), 'note': getattr(res, 'note', None)}
            self.cache.put(key, hit)
        self.used[key] = hit.get('secs', 0.)
        return hit


def run_dataset(bench, grid, seeds, out):
    t0 = time.perf_counter()
    accs = {lr: [bench.fit(lr, s) for s in seeds] for lr in grid}
    means = {lr: float(np.mean(a)) for lr, a in accs.items()}
    best_lr = max(means, key=means.get)
    best = means[best_lr]
    curves = {s: bench.sweep(s) for s in seeds}
    picks = {s: rule_picks(curves[s], bench.sweep(s, stop_div=False)) for s in seeds}
    rules = ['max_lr', 'valley', 'steep', 'minimum', 'fastai slide', 'lightning', 'torch-lr-finder']
    rows = {}
    for r in rules:
        lrs = [picks[s].get(r) for s in seeds]
        got = [bench.fit(FALLBACK_LR if lr is None else lr, s) for lr, s in zip(lrs, seeds)]
        rows[r] = dict(picks=lrs, accs=got, mean=float(np.mean(got)), regret=best - float(np.mean(got)))
    secs = time.perf_counter() - t0
    print(f'\n== {bench.name}: fit_one_cycle({bench.epochs} epochs), seeds {seeds}; {bench.trained} fits trained '
          f'now ({secs:.0f} s), the rest cached; from scratch: {len(bench.used)} fits and sweeps, '
          f'{sum(bench.used.values()):.0f} s as timed when each ran')
    print('grid  max_lr   ' + '  '.join(f'{lr:8.1e}' for lr in grid))
    print('      acc %    ' + '  '.join(f'{means[lr]:8.2f}' for lr in grid))
    print('      sd       ' + '  '.join(f'{np.std(accs[lr], ddof=1) if len(seeds) > 1 else 0:8.2f}' for lr in grid))
    print(f'best max_lr {best_lr:.1e}: {best:.2f}%')
    notes = {s: suggest_max_lr(curves[s]['lrs'], curves[s]['raw_losses'])[1] for s in seeds}
    notes = {s: n for s, n in notes.items() if n}
    if notes:
        print('lr_find notes: ' + '; '.join(f'seed {s}: {n}' for s, n in notes.items()))
    print(f"{'rule':16s} {'picks (one per seed)':32s} {'acc %':>7s} {'regret':>7s}")
    for r in rules:
        p = '  '.join('None' if v is None else f'{v:.2e}' for v in rows[r]['picks'])
        print(f"{r:16s} {p:32s} {rows[r]['mean']:7.2f} {rows[r]['regret']:7.2f}")
    out[bench.name] = dict(grid={f'{lr:.2e}': accs[lr] for lr in grid}, best_lr=best_lr, best=best, rules=rows,
                           curves={str(s): curves[s] for s in seeds})
    return rows


def sensitivity(out, cache_fits):
    """max_lr's worst-case regret when each of its constants changes, from the stored sweeps, without training: the
    accuracy at a pick is the stored fit at that lr and seed if there is one, else the seed's grid accuracies
    interpolated in log lr (an estimate: the grid is half a decade coarse)."""
    variants = [('as shipped', {})] + [(f'{k}={v:g}', {k: v}) for k, vs in
                                       (('NOISE_K', (2, 4)), ('HALF_WINDOW', (0.15, 0.4)), ('RISE_DIV', (5, 20)))
                                       for v in vs]
    saved = {k: getattr(lr_finder, k) for k in ('NOISE_K', 'HALF_WINDOW', 'RISE_DIV')}
    print('\nsensitivity of max_lr (estimated from stored sweeps and fits; regret per data set, then the worst)')
    try:
        for label, change in variants:
            for k, v in {**saved, **change}.items():
                setattr(lr_finder, k, v)
            regrets = {}
            for name, res in out.items():
                got = []
                for seed, curve in res['curves'].items():
                    lr = suggest_max_lr(curve['lrs'], curve['raw_losses'])[0] or FALLBACK_LR
                    got.append(cache_fits(name, lr, int(seed)))
                regrets[name] = res['best'] - float(np.mean(got))
            print(f'  {label:18s} ' + '  '.join(f'{n} {r:5.2f}' for n, r in regrets.items())
                  + f'   worst {max(regrets.values()):5.2f}')
    finally:
        for k, v in saved.items():
            setattr(lr_finder, k, v)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--datasets', default=','.join(DATASETS), help=f'comma-separated, of {", ".join(DATASETS)}')
    p.add_argument('--quick', action='store_true', help='tiny sizes, 2 lrs, 1 seed, 1 epoch: a smoke run')
    p.add_argument('--cache', default=None, help='JSON file of finished fits and sweeps (default: '
                                                 'benchmarks/lr_suggestions.json; with --quick, one in the '
                                                 'temp folder)')
    p.add_argument('--threads', type=int, default=1, help='torch threads (default 1: shared machines)')
    p.add_argument('--sensitivity', action='store_true',
                   help="also estimate max_lr's regret with each of its constants changed (no training)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(',') if n.strip()]
    bad = [n for n in names if n not in DATASETS]
    if bad or not names:
        p.error(f'--datasets: unknown {bad}; choose from {", ".join(DATASETS)}')
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:  # restored: a caller (the test suite) keeps its own thread count, on which its bit-identity tests rest
        return _main(args, names)
    finally:
        torch.set_num_threads(threads)


def _main(args, names):
    cache = Cache(args.cache or (os.path.join(tempfile.gettempdir(), 'minifast_lr_suggestions_quick.json')
                                 if args.quick else os.path.join(HERE, 'lr_suggestions.json')))
    if importlib.util.find_spec('fastai') is not None:
        print('fastai is installed, but its rules are re-implemented here from their documentation')
    else:
        print("fastai is not installed: its 'slide' rule (and Lightning's, torch-lr-finder's) are implemented here "
              "from their documented behaviour and applied to the sweep each one's finder would record")
    grid, seeds = (QUICK['grid'], QUICK['seeds']) if args.quick else (GRID, SEEDS)
    t0, out, worst, scratch = time.perf_counter(), {}, {}, 0.
    for n in names:
        bench = Bench(n, DATASETS[n], args.quick, cache)
        rows = run_dataset(bench, grid, seeds, out)
        scratch += sum(bench.used.values())
        for r, row in rows.items():
            worst[r] = max(worst.get(r, -math.inf), row['regret'])
    if args.sensitivity:
        benches = {n: Bench(n, DATASETS[n], args.quick, cache) for n in names}
        sensitivity(out, lambda name, lr, seed: benches[name].stored_or_interpolated(lr, seed, out[name]['grid']))
    print(f'\ntotal {time.perf_counter() - t0:.0f} s (from scratch: {scratch / 60:.1f} min of fits and sweeps, as '
          f'timed when each ran; {torch.get_num_threads()} thread(s))')
    print('RESULT worst-case regret (points) over ' + ','.join(names) + ': '
          + ', '.join(f'{r} {v:.2f}' for r, v in sorted(worst.items(), key=lambda kv: kv[1])))
    return out


if __name__ == '__main__':
    main()
