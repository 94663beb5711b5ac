"""The `minifast` command: `minifast demo` trains a small model on generated data and writes its plots."""
import argparse
import sys
import time
from pathlib import Path

__all__ = ['main']


def demo(args):
    """Fit an MLP on a generated 10-class problem; print the epoch table and save loss/lr/metric plots."""
    import matplotlib
    matplotlib.use('Agg')
    import torch
    from torch import nn
    from . import DataBunch, Learner, accuracy, synthetic_classification, top_k_accuracy
    torch.manual_seed(args.seed)
    data = DataBunch.from_tensors(*synthetic_classification(n_train=4096, n_valid=1024, seed=args.seed), bs=64,
                                  val_bs=256)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    out = Path(args.out)
    learn = Learner(data, model, metrics=[accuracy, top_k_accuracy], path=out, silent=args.quiet)
    t0 = time.perf_counter()
    learn.fit(args.epochs, lr=args.lr)
    dt = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    learn.recorder.plot_losses().savefig(out / 'losses.png')
    learn.recorder.plot_lr(show_moms=True).savefig(out / 'lr.png')
    learn.recorder.plot_metrics().savefig(out / 'metrics.png')
    file = learn.save('demo')
    loss, acc, top5 = learn.validate()
    print(f'demo: {args.epochs} epochs in {dt:.1f}s; valid loss {loss:.4f}, accuracy {acc:.4f}, top-5 {top5:.4f}')
    print(f'demo: plots in {out}/ (losses.png, lr.png, metrics.png), weights in {file}')
    return 0


def main(argv=None):
    """Entry point of the `minifast` console script."""
    p = argparse.ArgumentParser(prog='minifast', description=__doc__)
    sub = p.add_subparsers(dest='cmd', required=True)
    d = sub.add_parser('demo', help='short fit on generated data (the main job until `minifast smith` lands)')
    d.add_argument('--epochs', type=int, default=5)
    d.add_argument('--lr', type=float, default=3e-3)
    d.add_argument('--seed', type=int, default=0)
    d.add_argument('--out', default='runs/demo', help='folder for plots and weights (default: runs/demo)')
    d.add_argument('--quiet', action='store_true', help='no progress bars or epoch table')
    args = p.parse_args(argv)
    return {'demo': demo}[args.cmd](args)


if __name__ == '__main__':
    sys.exit(main())
