"""Do MixUp, CutMix (a segment of the signal), label smoothing and EMA help on real data? MNIST-1D (the `mnist1d` package's generator: 4000 training
and 1000 test signals of length 40, 10 classes) with the paper's 1-D CNN, trained by fit_one_cycle from the same
initialisation per seed, with and without each tool; the final validation accuracy (for EMA: of the averaged
weights) over 3 seeds, as mean +- sd and per seed, side by side in one run.

    python benchmarks/regularisation.py            # 3 seeds, 40 epochs per fit (21 fits)
    python benchmarks/regularisation.py --only 'EMA(decay=0.99)'   # one variant next to plain
    python benchmarks/regularisation.py --quick    # smoke run: 1 seed, 1 epoch, a subset
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.dirname(__file__))
from lr_suggestions import MNIST1DConv, mnist1d_data  # noqa: E402  (the same data and model as the lr benchmark)
from minifast import EMA, CutMix, LabelSmoothingCrossEntropy, Learner, MixUp, accuracy, set_seed  # noqa: E402

VARIANTS = {  # name -> (Learner kwargs, fit callbacks)
    'plain': lambda: ({}, []),
    'MixUp(alpha=0.4)': lambda: ({}, [MixUp(alpha=0.4)]),
    'CutMix(alpha=1.0)': lambda: ({}, [CutMix(alpha=1.)]),
    'label smoothing 0.1': lambda: ({'loss_func': LabelSmoothingCrossEntropy(eps=0.1)}, []),
    'EMA(decay=0.999)': lambda: ({}, [EMA(decay=0.999, replace_at_end=True)]),
    'EMA(decay=0.99)': lambda: ({}, [EMA(decay=0.99, replace_at_end=True)]),
    'MixUp + EMA': lambda: ({}, [MixUp(alpha=0.4), EMA(decay=0.999, replace_at_end=True)]),
}


def run(variant, seed, epochs, data, lr):
    """Final validation accuracy of one fit_one_cycle from seed's initialisation and shuffling."""
    kwargs, cbs = VARIANTS[variant]()
    set_seed(seed)
    learn = Learner(data, MNIST1DConv(), metrics=[accuracy], silent=True, **kwargs)
    learn.fit_one_cycle(epochs, max_lr=lr, callbacks=cbs)
    learn.loss_func = torch.nn.functional.cross_entropy  # accuracy only: the metric is the same for every variant
    return learn.validate()[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='smoke run: 1 seed, 1 epoch, 512 signals')
    ap.add_argument('--epochs', type=int, default=40)
    ap.add_argument('--seeds', type=int, default=3)
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--only', nargs='+', metavar='VARIANT', help='these variants (and plain) only')
    args = ap.parse_args(argv)
    epochs, seeds = (1, 1) if args.quick else (args.epochs, args.seeds)
    data = mnist1d_data(bs=100, n_train=512 if args.quick else None, n_valid=256 if args.quick else None)
    print(f'MNIST-1D: train {len(data.train_ds)}, valid {len(data.valid_ds)}; the paper\'s CNN; fit_one_cycle('
          f'{epochs}, {args.lr}) (AdamW, wd 1e-2); seeds 0..{seeds - 1}; {torch.get_num_threads()} threads')
    t0 = time.time()
    names = [v for v in VARIANTS if not args.only or v == 'plain' or v in args.only]
    acc = {v: [run(v, s, epochs, data, args.lr) for s in range(seeds)] for v in names}
    base = acc['plain']
    print(f"\n{'variant':22} {'mean':>7} {'sd':>6} {'vs plain':>9}   per seed")
    for v, a in acc.items():
        sd = statistics.stdev(a) if len(a) > 1 else 0.
        diff = statistics.mean(a) - statistics.mean(base)
        print(f'{v:22} {statistics.mean(a):7.4f} {sd:6.4f} {diff:+9.4f}   ' + ' '.join(f'{x:.4f}' for x in a))
    print(f'RESULT regularisation_mnist1d seconds={time.time() - t0:.1f}')


if __name__ == '__main__':
    main()
