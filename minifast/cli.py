"""The `minifast` command: `minifast smith` runs Leslie Smith's hyper-parameter workflow (LR range test, 1cycle vs
constant lr, momentum, weight decay, final fit, interpolation) and writes a report; `minifast demo` is one short fit."""
import argparse
import sys
import time
from pathlib import Path

# No lazy imports here: `minifast` (and so `python -m minifast --help`) already imports torch, matplotlib and the
# whole package through minifast/__init__.py before this module runs, so importing them in functions saves nothing.
import matplotlib
import torch
from torch import nn

from .data import cifar10, cifar_transforms, synthetic_cifar
from .learner import Learner
from .metrics import accuracy, top_k_accuracy
from .smith import add_arguments, refuse_small, run as run_smith

__all__ = ['main']


def demo(args):
    """Fit a small CNN on the built-in image set (or CIFAR-10 when it is on disk under --data); save the plots."""
    matplotlib.use('Agg')
    refuse_small('demo', vars(args), epochs=1, bs=1, n_train=1)  # `--epochs 0` trained nothing, then drew empty plots
    torch.manual_seed(args.seed)
    if args.data:
        data = cifar10(args.data, download=False, tfms=cifar_transforms(), bs=args.bs)
        what = f'CIFAR-10 from {args.data}'
    else:
        data = synthetic_cifar(n_classes=10, n_train=args.n_train, n_valid=args.n_train // 5, seed=args.seed,
                               tfms=cifar_transforms(), bs=args.bs)
        what = f'the built-in 32x32 shapes set ({args.n_train} training images, 10 classes)'

    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                             nn.MaxPool2d(2))
    model = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, data.c))
    out = Path(args.out)
    print(f'demo: {what}, {data.device}')
    learn = Learner(data, model, metrics=[accuracy, top_k_accuracy], path=out, silent=args.quiet)
    t0 = time.perf_counter()
    learn.fit(args.epochs, lr=args.lr)
    dt = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    data.show_batch(rows=3, figsize=(5, 5)).savefig(out / 'batch.png')
    learn.recorder.plot_losses().savefig(out / 'losses.png')
    learn.recorder.plot_lr(show_moms=True).savefig(out / 'lr.png')
    learn.recorder.plot_metrics().savefig(out / 'metrics.png')
    file = learn.save('demo')
    loss, acc, top5 = learn.validate()
    print(f'demo: {args.epochs} epochs in {dt:.1f}s; valid loss {loss:.4f}, accuracy {acc:.4f}, top-5 {top5:.4f}')
    print(f'demo: plots in {out}/ (batch.png, losses.png, lr.png, metrics.png), weights in {file}')
    return 0


def smith_doc():
    return ("Leslie Smith's hyper-parameter workflow (seed 004): data -> LR range test -> 1cycle vs constant lr -> "
            "momentum -> weight decay (coarse, then half-decade) -> final fit_one_cycle (checkpointed) -> "
            "interpolation between two snapshots. Writes PNGs, runs.jsonl and report.md to --out; running it again "
            "skips what is done. Default: the built-in set and a ResNet-8, a few minutes on a CPU.")


def smith(args):
    """`minifast smith`: see minifast/smith.py."""
    return run_smith(args)


def main(argv=None):
    """Entry point of the `minifast` console script."""
    p = argparse.ArgumentParser(prog='minifast', description=__doc__)
    sub = p.add_subparsers(dest='cmd', required=True)
    sm = sub.add_parser('smith', help="Leslie Smith's workflow end to end, with plots and report.md (the main job)",
                        description=smith_doc())
    add_arguments(sm)
    d = sub.add_parser('demo', help='one short fit on the built-in image set')
    d.add_argument('--epochs', type=int, default=3)
    d.add_argument('--lr', type=float, default=3e-3)
    d.add_argument('--bs', type=int, default=64)
    d.add_argument('--n-train', type=int, default=5000, help='images in the built-in training set')
    d.add_argument('--data', default=None, help='a folder holding cifar-10-batches-py (default: the built-in set)')
    d.add_argument('--seed', type=int, default=0)
    d.add_argument('--out', default='runs/demo', help='folder for plots and weights (default: runs/demo)')
    d.add_argument('--quiet', action='store_true', help='no progress bars or epoch table')
    args = p.parse_args(argv)
    return {'demo': demo, 'smith': smith}[args.cmd](args)


if __name__ == '__main__':
    sys.exit(main())
