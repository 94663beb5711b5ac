"""Cost of the checksum minifast writes into (and verifies in) every state file, on a ~50 MB model state (issue 16,
target: save + load with the check <= 1.1x without it).

Three ways to save and load the same state, timed alternately in one run (this machine is shared and noisy, so only
side-by-side ratios mean anything; the order rotates every round):
  torch       torch.save(sd, file) + torch.load(file, weights_only=True): no fsync, no temp file, no check
  unchecked   what minifast did before the check: torch.save to a temp file, fsync, os.replace; torch.load
  minifast    atomic_save (the same, plus the checksum appended) + load_state (the checksum verified; for a file
              of 8 MB or more in a thread, on its own descriptor, while torch.load reads the file)
Two ratios per pair: best time against best time (noise only ever adds time, but a lucky allocation can take some
off one load) and the median of per-round ratios (each round runs all three back to back). With one core
(`taskset -c 0 python benchmarks/checkpoint_io.py`) the threaded check costs what the check in line would.

    python benchmarks/checkpoint_io.py                  # default: 15 rounds, 50 MB
    python benchmarks/checkpoint_io.py --rounds 1 --mb 1  # smoke run
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from minifast.checkpoint import atomic_save, load_state  # noqa: E402


def make_state(mb):
    """A model's state dict of about `mb` MB: a stack of square Linear layers (float32)."""
    torch.manual_seed(0)
    width = 1024 if mb >= 8 else 128
    layers = max(1, round(mb * 2 ** 20 / 4 / (width * width + width)))
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).state_dict()


def _timed(save, load):
    """(seconds of save(), seconds of load()), one after the other."""
    t0 = time.perf_counter()
    save()
    t1 = time.perf_counter()
    load()
    return t1 - t0, time.perf_counter() - t1


def torch_io(sd, file):
    return _timed(lambda: torch.save(sd, file), lambda: torch.load(file, weights_only=True))


def _fsynced_replace(sd, file):
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(file)}.', suffix='.tmp', dir=os.path.dirname(file))
    with os.fdopen(fd, 'wb') as f:
        torch.save(sd, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def unchecked_io(sd, file):
    return _timed(lambda: _fsynced_replace(sd, file), lambda: torch.load(file, weights_only=True))


def minifast_io(sd, file):
    return _timed(lambda: atomic_save(sd, file), lambda: load_state(file))


RUNNERS = {'torch': torch_io, 'unchecked': unchecked_io, 'minifast': minifast_io}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--mb', type=float, default=50)
    ap.add_argument('--rounds', type=int, default=15)
    ap.add_argument('--dir', default=None, help='folder to write in (default: a temporary folder)')
    args = ap.parse_args(argv)
    sd = make_state(args.mb)
    size = sum(t.numel() * t.element_size() for t in sd.values())
    times = {k: [] for k in RUNNERS}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for r in range(args.rounds):
            names = list(RUNNERS)
            names = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
            for k in names:
                times[k].append(RUNNERS[k](sd, os.path.join(d, f'{k}.pth')))
        check = {k: os.path.getsize(os.path.join(d, f'{k}.pth')) for k in RUNNERS}
    print(f'state: {len(sd)} tensors, {size / 2 ** 20:.1f} MiB; files: ' +
          ', '.join(f'{k} {v} bytes' for k, v in check.items()) + f'; {args.rounds} rounds, torch {torch.__version__}')
    print(f'{"":12s}{"best save ms":>13s}{"best load ms":>13s}{"best total":>11s}')
    best = {}
    for k, ts in times.items():
        best[k] = (min(s for s, _ in ts), min(lo for _, lo in ts), min(s + lo for s, lo in ts))
        print(f'{k:12s}{best[k][0] * 1e3:13.1f}{best[k][1] * 1e3:13.1f}{best[k][2] * 1e3:11.1f}')
    out = {}
    for a, b in (('minifast', 'unchecked'), ('minifast', 'torch'), ('unchecked', 'torch')):
        cols = []
        for i, part in enumerate(('save', 'load', 'save+load')):
            paired = [(x[0] + x[1] if i == 2 else x[i]) / (y[0] + y[1] if i == 2 else y[i])
                      for x, y in zip(times[a], times[b])]
            bb = best[a][i] / best[b][i]
            out[f'{a}/{b} {part}'] = bb
            cols.append(f'{part} {bb:.3f}x best, {statistics.median(paired):.3f}x median')
        print(f'{a}/{b}: ' + '; '.join(cols))
    paired = statistics.median((m[0] + m[1]) / (u[0] + u[1]) for m, u in zip(times['minifast'], times['unchecked']))
    print(f"RESULT checksum cost: minifast/unchecked save+load = {out['minifast/unchecked save+load']:.3f}x best, "
          f"{paired:.3f}x median (target <= 1.1x); minifast/torch save+load = {out['minifast/torch save+load']:.3f}x")
    return out


if __name__ == '__main__':
    main()
