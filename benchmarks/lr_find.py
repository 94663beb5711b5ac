"""Wall time of learn.lr_find(num_it=100) against 100 hand-written training steps of the same model and data.

Tiny MLP 32->64->10, batch 64, AdamW, CPU; the two alternate in one run (rotating who goes first) and the ratio of
best times and the median of per-round ratios are printed. lr_find's time includes its snapshot and its full
restore (weights, buffers, optimizer, RNG states). fastai v2's lr_find is timed too when fastai is importable.

    python benchmarks/lr_find.py               # target <= 1.15x
    python benchmarks/lr_find.py --rounds 1    # smoke run
"""
import argparse
import contextlib
import io
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))
from minifast import AdamW, Learner  # noqa: E402
from overhead import make_data, make_model  # noqa: E402


def raw_runner(data, n):
    model = make_model(0)
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    lrs = [1e-7 * (10 / 1e-7) ** (i / (n - 1)) for i in range(n)]

    def run():
        model.train()
        it = iter(data.train_dl)
        for i in range(n):
            xb, yb = next(it)
            for g in opt.param_groups:
                g['lr'] = lrs[i]
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return run


def minifast_runner(data, n):
    learn = Learner(data, make_model(0), wd=1e-2, silent=True, device='cpu')

    def run():
        with contextlib.redirect_stdout(io.StringIO()):
            learn.lr_find(num_it=n, stop_div=False)
    return run


def fastai_runner(data, n):
    try:
        from fastai.callback.schedule import LRFinder  # noqa: F401 (patches Learner.lr_find)
        from fastai.data.core import DataLoaders
        from fastai.learner import Learner as FLearner
        from fastai.optimizer import OptimWrapper
    except ImportError:
        return None
    dls = DataLoaders(data.train_dl, data.train_dl, device='cpu')
    learn = FLearner(dls, make_model(0), loss_func=F.cross_entropy,
                     opt_func=lambda p, lr: OptimWrapper(opt=AdamW(p, lr=lr, weight_decay=1e-2)))

    def run():
        with learn.no_logging(), contextlib.redirect_stdout(io.StringIO()):
            learn.lr_find(num_it=n, stop_div=False, show_plot=False)
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=15)
    p.add_argument('--num-it', type=int, default=100)
    args = p.parse_args(argv)
    data = make_data(200)
    runners = {'100 raw steps': raw_runner(data, args.num_it), 'minifast lr_find': minifast_runner(data, args.num_it)}
    fa = fastai_runner(data, args.num_it)
    if fa is not None:
        runners['fastai v2 lr_find'] = fa
    else:
        print('fastai v2: not installed, skipped')
    for run in runners.values():
        run()
    times = {k: [] for k in runners}
    names = list(runners)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
    raw = times['100 raw steps']
    print(f'torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, {args.rounds} rounds, '
          f'num_it={args.num_it}')
    print(f'{"":20s} {"best ms":>8s}  {"best/raw":>8s}   median of per-round ratios [min, max]')
    for name, ts in times.items():
        ratios = [t / r for r, t in zip(raw, ts)]
        print(f'{name:20s} {1e3 * min(ts):8.1f}  {min(ts) / min(raw):7.3f}x   {statistics.median(ratios):.3f}x '
              f'[{min(ratios):.3f}, {max(ratios):.3f}]')
    mf = times['minifast lr_find']
    print(f'RESULT lr_find/raw = {min(mf) / min(raw):.3f}x best-of-{args.rounds}, '
          f'{statistics.median(t / r for r, t in zip(raw, mf)):.3f}x median paired (target <= 1.15x)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
