"""Does test-time augmentation help on real data? scikit-learn's digits (1797 8x8 grayscale images, 10 classes),
upscaled to 16x16, a small CNN trained by fit_one_cycle with digit-safe augmentation (small rotation and zoom, a
little lighting, no flips), several seeds; for each, the plain validation accuracy next to learn.TTA's with and
without flipped views, at beta 0.4 (fastai v1's default) and 0 (views only), at each TTA zoom scale.

    python benchmarks/tta.py                  # 5 seeds, scales 1.35 (fastai v1's) and 1.1 (the training zoom)
    python benchmarks/tta.py --quick          # smoke run (a subset, 1 epoch, 1 seed)
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from minifast import ImageDataBunch, Learner, accuracy, get_transforms  # noqa: E402


def digits_bunch(size=16, n=None, bs=64):
    """Digits as uint8 images (0..16 scaled to 0..255), a fixed 70/30 split (seed 0), normalised by their stats."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8))
    y = torch.from_numpy(d.target).long()
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
    cut = int(0.7 * len(idx))
    tr, va = idx[:cut], idx[cut:]
    tfms = get_transforms(do_flip=False, max_rotate=10., max_zoom=1.1, max_lighting=0.1, max_warp=0.)
    data = ImageDataBunch.from_tensors(x[tr], y[tr], x[va], y[va], classes=[str(i) for i in range(10)], tfms=tfms,
                                       size=size, bs=bs, val_bs=256, device='cpu', device_data=False)
    return data.normalize()


def small_cnn(c=10):
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, c))


def acc(p, y):
    return float((p.argmax(1) == y).float().mean())


def run_seed(data, seed, epochs, lr, scales):
    """{column: accuracy} for one trained model."""
    torch.manual_seed(seed)
    learn = Learner(data, small_cnn(), metrics=[accuracy], silent=True)
    learn.fit_one_cycle(epochs, lr)
    p, y = learn.get_preds()
    row = {'plain': acc(p, y)}
    for s in scales:
        # one pass over the 8 views: the first 4 (unflipped) are exactly learn.TTA(flip=False)'s views, since TTA
        # keeps the global RNG (tests/test_tta.py checks it), so a = learn.TTA(beta=None, scale=s, flip=...)[1]
        views = torch.stack(list(learn.tta_only(scale=s, flip=True)))
        for flip in (False, True):
            a = views.mean(0) if flip else views[:4].mean(0)
            tag = f's{s} {"8 flip" if flip else "4 noflip"}'
            row[f'{tag} b.4'] = acc(0.4 * p + 0.6 * a, y)
            row[f'{tag} b0'] = acc(a, y)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--seeds', type=int, default=5)
    ap.add_argument('--epochs', type=int, default=6)
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--size', type=int, default=16)
    ap.add_argument('--scales', type=float, nargs='+', default=[1.35, 1.1])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--quick', action='store_true', help='smoke run: 300 images, 1 epoch, 1 seed')
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds, a.epochs, a.scales = 1, 1, a.scales[:1]
    torch.set_num_threads(a.threads)
    data = digits_bunch(a.size, n=300 if a.quick else None)
    print(f'digits {a.size}x{a.size}: train {len(data.train_ds)}, valid {len(data.valid_ds)}; {a.epochs} epochs of '
          f'fit_one_cycle(lr={a.lr}); train tfms {data.train_tfms}; {a.threads} threads')
    t0, rows = time.time(), []
    for seed in range(a.seeds):
        rows.append(run_seed(data, seed, a.epochs, a.lr, a.scales))
        print(f'seed {seed}: ' + '  '.join(f'{k} {v:.4f}' for k, v in rows[-1].items()), flush=True)
    n_valid = len(data.valid_ds)
    print(f'\nmean accuracy over {a.seeds} seeds (valid {n_valid} images; one image = {1 / n_valid:.4f}):')
    print(f'{"":22s} {"mean":>7s} {"diff vs plain":>14s} {"per seed diffs":s}')
    for k in rows[0]:
        vals = [r[k] for r in rows]
        diffs = [r[k] - r['plain'] for r in rows]
        print(f'{k:22s} {statistics.mean(vals):7.4f} {statistics.mean(diffs):+14.4f}  '
              + ' '.join(f'{d:+.4f}' for d in diffs))
    print(f'RESULT tta_digits seconds={time.time() - t0:.1f}')
    return rows


if __name__ == '__main__':
    main()
