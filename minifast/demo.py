"""`minifast demo`: one short fit of a small CNN on the built-in image set (or CIFAR-10 on disk), with its plots."""
import time
from pathlib import Path

import matplotlib
import torch
from torch import nn

from .data import cifar10, cifar_transforms, synthetic_cifar
from .learner import Learner
from .options import refuse_small
from .smith import data_error, metrics_for, refuse_no_batch, save_plot

__all__ = ['run']


def _data(args):
    """The demo's DataBunch and the words for it; a data problem is one line naming it (or, with --debug, raised)."""
    if not args.data:
        data = synthetic_cifar(n_classes=10, n_train=args.n_train, n_valid=args.n_train // 5, seed=args.seed,
                               tfms=cifar_transforms(), bs=args.bs)
        return data, f'the built-in 32x32 shapes set ({args.n_train} training images, 10 classes)'
    try:
        data = cifar10(args.data, download=False, tfms=cifar_transforms(), bs=args.bs)
    except (OSError, ValueError) as e:
        if args.debug:
            raise
        raise SystemExit(data_error('demo', '--data', args.data, e, downloads=False)) from None
    return data, f'CIFAR-10 from {args.data}'


def run(args):
    """Fit a small CNN on the built-in image set (or CIFAR-10 when it is on disk under --data); save the plots."""
    matplotlib.use('Agg')
    refuse_small('demo', vars(args), epochs=1, bs=1, n_train=1)  # `--epochs 0` trained nothing, then drew empty plots
    torch.manual_seed(args.seed)
    data, what = _data(args)
    refuse_no_batch('demo', data, what, args.bs, builtin=not args.data)

    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                             nn.MaxPool2d(2))
    model = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, data.c))
    out = Path(args.out)
    print(f'demo: {what}, {data.device}')
    learn = Learner(data, model, metrics=metrics_for(data.c), path=out, silent=args.quiet)
    t0 = time.perf_counter()
    learn.fit(args.epochs, lr=args.lr)
    dt = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    save_plot(data.show_batch(rows=3, figsize=(5, 5)), out / 'batch.png', 'demo: augmented training images')
    save_plot(learn.recorder.plot_losses(), out / 'losses.png', f'demo: loss, fit({args.epochs}, lr={args.lr:g})')
    save_plot(learn.recorder.plot_lr(show_moms=True), out / 'lr.png', 'demo: learning rate and momentum per step')
    save_plot(learn.recorder.plot_metrics(), out / 'metrics.png', 'demo: validation metrics per epoch')
    file = learn.save('demo')
    loss, *mets = learn.validate()
    shown = ', '.join(f'{name} {v:.4f}' for name, v in zip(learn.recorder.metrics_names, mets))
    print(f'demo: {args.epochs} epochs in {dt:.1f} s; valid loss {loss:.4f}, {shown}')
    print(f'demo: plots in {out}/ (batch.png, losses.png, lr.png, metrics.png), weights in {file}')
    return 0
