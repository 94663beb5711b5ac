"""Training steps/s of Learner.fit against a hand-written PyTorch loop doing the same work (issue 2's target).

Tiny MLP 32->64->10, batch 64, 200 steps per epoch, CPU, AdamW; the runners are timed alternately in one run
(this machine is shared and noisy, so only side-by-side ratios mean anything). Two ratios are printed: best time
against best time (noise only ever adds time, so the minimum is the cleanest estimate of what each costs), and
the median of per-round paired ratios.
fastai v2 and PyTorch Lightning are timed on the same work when they are installed.

    python benchmarks/overhead.py                # default: 25 rounds of 1 epoch (200 steps) each
    python benchmarks/overhead.py --rounds 1 --epochs 1 --steps 5   # smoke run
"""
import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from minifast import AdamW, DataBunch, Learner  # noqa: E402


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def make_data(steps, bs=64, device='cpu'):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * bs, 32, generator=g).to(device)
    y = torch.randint(0, 10, (steps * bs,), generator=g).to(device)
    return DataBunch.from_tensors(x, y, bs=bs)  # no validation set: training steps only


def _sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def raw_runner(data, device):
    model = make_model(0).to(device)
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)

    def run(epochs):
        model.train()
        for _ in range(epochs):
            for xb, yb in data.train_dl:
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                opt.zero_grad()
        _sync(device)
    return run


def minifast_runner(data, silent, device, check_finite=True):
    learn = Learner(data, make_model(0), wd=1e-2, silent=silent, device=device, check_finite=check_finite)

    def run(epochs):
        with contextlib.redirect_stdout(io.StringIO()):  # the epoch table is printed, just not shown here
            learn.fit(epochs, lr=1e-3)
        _sync(device)
    return run


def fastai_runner(data):
    try:
        from fastai.callback.core import Callback
        from fastai.data.core import DataLoaders
        from fastai.learner import CancelValidException, Learner as FLearner
        from fastai.optimizer import OptimWrapper
    except ImportError:
        return None

    class NoValidation(Callback):
        def before_validate(self):
            raise CancelValidException()

    # valid is never run (NoValidation); no progress bar: fastai.callback.progress is not imported, so it is not
    # one of the default callbacks
    dls = DataLoaders(data.train_dl, data.train_dl, device='cpu')
    learn = FLearner(dls, make_model(0), loss_func=F.cross_entropy, cbs=NoValidation(),
                     opt_func=lambda p, lr: OptimWrapper(opt=AdamW(p, lr=lr, weight_decay=1e-2)))

    def run(epochs):
        with learn.no_logging():
            learn.fit(epochs, lr=1e-3)
    return run


def lightning_runner(data):
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            return None
    logging.getLogger(pl.__name__).setLevel(logging.WARNING)  # the info lines every Trainer prints

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_model(0)

        def training_step(self, batch, i):
            xb, yb = batch
            return F.cross_entropy(self.model(xb), yb)

        def configure_optimizers(self):
            return AdamW(self.parameters(), lr=1e-3, weight_decay=1e-2)

    module = Module()

    def run(epochs):
        trainer = pl.Trainer(max_epochs=epochs, accelerator='cpu', devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, data.train_dl)
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=25)
    p.add_argument('--epochs', type=int, default=1, help='epochs per timed round')
    p.add_argument('--steps', type=int, default=200, help='steps per epoch')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch decides)')
    p.add_argument('--device', default='cpu', help="'cpu' (the target's setting) or 'cuda' (data on the GPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_data(args.steps, device=args.device)
    runners = {'raw loop': raw_runner(data, args.device),
               'minifast (defaults)': minifast_runner(data, silent=False, device=args.device),
               'minifast (silent)': minifast_runner(data, silent=True, device=args.device),
               'minifast (no NaN check)': minifast_runner(data, silent=True, device=args.device, check_finite=False)}
    for name, make in (('fastai v2', fastai_runner), ('lightning', lightning_runner)):
        if args.device != 'cpu':
            continue
        r = make(data)
        if r is not None:
            runners[name] = r
        else:
            print(f'{name}: not installed, skipped')
    for run in runners.values():  # warm-up
        run(1)
    times = {k: [] for k in runners}
    names = list(runners)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # alternate, rotating who goes first
            run = runners[name]
            t0 = time.perf_counter()
            run(args.epochs)
            times[name].append(time.perf_counter() - t0)
    steps = args.epochs * args.steps
    raw = times['raw loop']
    where = torch.cuda.get_device_name() if args.device != 'cpu' else f'CPU, {torch.get_num_threads()} threads'
    print(f'torch {torch.__version__}, {where}, {args.rounds} rounds x {steps} steps')
    print(f'{"":22s} {"best steps/s":>12s}  {"best/best":>9s}   median of per-round ratios [min, max]')
    for name, ts in times.items():
        ratios = [r / t for r, t in zip(raw, ts)]  # paired within a round: drift of the machine cancels
        print(f'{name:22s} {steps / min(ts):12.0f}  {min(raw) / min(ts):8.3f}x   {statistics.median(ratios):.3f}x '
              f'[{min(ratios):.3f}, {max(ratios):.3f}]')
    mf = times['minifast (defaults)']
    best, paired = min(raw) / min(mf), statistics.median(r / t for r, t in zip(raw, mf))
    print(f'RESULT minifast/raw = {best:.3f}x best-of-{args.rounds}, {paired:.3f}x median paired (target >= 0.95x)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
