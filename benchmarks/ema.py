"""EMA's per-step cost (issue 19's target: EMA(every=1) adds <= 5% to a ResNet-8 training step on CPU).

Two learners train the same ResNet-8 (minifast.cifar_resnet(8, 10)) on the same synthetic 32x32 data, one with
EMA(every=1) and one without, timed alternately in one run (the machine is shared and noisy: only side-by-side
figures mean anything), rotating which goes first. Printed: steps/s of each, the best-vs-best ratio (noise only ever
adds time), the median of per-round paired ratios, and the EMA update alone timed over the same model (its cost as
a fraction of the best plain step: the least noisy estimate).

    python benchmarks/ema.py                  # default: 10 rounds of 30 steps (batch 64)
    python benchmarks/ema.py --rounds 1 --steps 2 --bs 8    # smoke run
"""
import argparse
import contextlib
import io
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from minifast import EMA, DataBunch, Learner, cifar_resnet  # noqa: E402


def make_data(steps, bs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * bs, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (steps * bs,), generator=g)
    return DataBunch.from_tensors(x, y, bs=bs)  # no validation set: training steps only


def runner(data, ema):
    torch.manual_seed(0)
    learn = Learner(data, cifar_resnet(8, 10), silent=True)
    cbs = [EMA(every=1)] if ema else []

    def run():
        with contextlib.redirect_stdout(io.StringIO()):
            learn.fit(1, 1e-3, callbacks=cbs)
    return run, learn


def update_cost(learn, n):
    """Seconds per EMA update of `learn`'s model (the update alone, best of 3 batches of n)."""
    ema = EMA(every=1)
    ema._track(learn.model)
    ema.update()  # the first update is a copy: time the lerps
    best = float('inf')
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            ema.update()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=10)
    p.add_argument('--steps', type=int, default=30, help='steps per timed round (one epoch)')
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch decides)')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_data(args.steps, args.bs)
    runners = {'no EMA': runner(data, False), 'EMA(every=1)': runner(data, True)}
    for run, _ in runners.values():  # warm-up
        run()
    times = {k: [] for k in runners}
    names = list(runners)
    for r in range(args.rounds):
        for name in names[r % 2:] + names[:r % 2]:  # alternate, rotating who goes first
            t0 = time.perf_counter()
            runners[name][0]()
            times[name].append(time.perf_counter() - t0)
    plain, ema = times['no EMA'], times['EMA(every=1)']
    n_params = sum(p.numel() for p in runners['no EMA'][1].model.parameters())
    print(f'torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; ResNet-8 ({n_params:,} parameters), '
          f'batch {args.bs}, {args.rounds} rounds x {args.steps} steps')
    print(f'{"":14s} {"best steps/s":>12s} {"median steps/s":>15s}')
    for name, ts in times.items():
        print(f'{name:14s} {args.steps / min(ts):12.1f} {args.steps / statistics.median(ts):15.1f}')
    best = min(ema) / min(plain)
    paired = statistics.median(e / t for e, t in zip(ema, plain))
    step = min(plain) / args.steps
    upd = update_cost(runners['no EMA'][1], max(10, 5 * args.steps))
    print(f'EMA update alone: {upd * 1e3:.3f} ms = {100 * upd / step:.2f}% of the best plain step '
          f'({step * 1e3:.1f} ms)')
    print(f'RESULT EMA/plain step time = {best:.3f}x best-of-{args.rounds}, {paired:.3f}x median paired '
          f'(target <= 1.05x)')
    return {'best_ratio': best, 'paired_ratio': paired, 'update_fraction': upd / step}


if __name__ == '__main__':
    main()
