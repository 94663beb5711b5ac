"""Augmented, normalised training batches per second: minifast's decoded-tensor loader against torchvision.

A folder of 32x32 PNGs (default 10,000 images, 100 classes, generated once under --root) is read by
- torchvision: ImageFolder + DataLoader(bs 256, shuffle, num_workers=2) with per-item RandomCrop(32, padding=4),
  RandomHorizontalFlip, ToTensor, Normalize;
- minifast: ImageList.from_folder(...).databunch(bs=256).normalize(cifar_stats) with cifar_transforms() (the same
  augmentation, batched) and with get_transforms() (fastai v1's default: flip, rotate, zoom, warp, lighting);
- fastai v2 (when importable): DataBlock with the same folder, aug_transforms() and Normalize, bs 256, 2 workers.
The first minifast pass (decoding the PNGs and writing the cache) is timed on its own; the steady epochs of all
loaders then alternate in one run, rotating who goes first, and images/s and ratios to torchvision are printed.

    python benchmarks/data.py                      # targets: >= 20x torchvision (cifar), >= 5x (get_transforms)
    python benchmarks/data.py --n 512 --rounds 1   # smoke run
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from minifast import ImageList, cifar_stats, cifar_transforms, get_transforms  # noqa: E402
from minifast.data.datasets import synthetic_images, write_image_folder  # noqa: E402


def make_folder(root, n, n_classes):
    """root/train/<class>/*.png (n images) and root/valid (n // 10), written once and reused."""
    marker = root / f'.complete-{n}-{n_classes}'
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    d = synthetic_images(n_classes=n_classes, n_train=n, n_valid=max(n // 10, n_classes), seed=0)
    write_image_folder(root, d['x_train'], d['y_train'], d['classes'], split='train')
    write_image_folder(root, d['x_valid'], d['y_valid'], d['classes'], split='valid')
    marker.touch()


def minifast_bunch(root, tfms, bs, device='cpu'):
    return (ImageList.from_folder(root).split_by_folder(train='train', valid='valid').label_from_folder()
            .transform(tfms, size=(32, 32)).databunch(bs=bs, device=device).normalize(cifar_stats))


def torchvision_loader(root, bs, workers):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(*cifar_stats)])
    ds = ImageFolder(str(root / 'train'), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def fastai_loader(root, bs, workers):
    try:
        from fastai.vision.all import (CategoryBlock, DataBlock, GrandparentSplitter, ImageBlock, Normalize,
                                       aug_transforms, get_image_files, parent_label)
    except ImportError:
        return None
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                      splitter=GrandparentSplitter(train_name='train', valid_name='valid'),
                      batch_tfms=[*aug_transforms(), Normalize.from_stats(*cifar_stats)])
    return block.dataloaders(root, bs=bs, num_workers=workers, device='cpu').train


def epoch(dl):
    n = 0
    for xb, _ in dl:
        n += len(xb)
    if xb.is_cuda:
        torch.cuda.synchronize()
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', default='/tmp/minifast_bench_png', help='where the PNG folder is generated and kept')
    p.add_argument('--n', type=int, default=10_000, help='training images')
    p.add_argument('--classes', type=int, default=100)
    p.add_argument('--bs', type=int, default=256)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--workers', type=int, default=2, help='DataLoader workers for torchvision and fastai')
    p.add_argument('--device', default='cpu', help="where minifast's batches are augmented: 'cpu' (the targets' "
                   "setting) or 'cuda' (torchvision's loader still works on the CPU, as it would in training)")
    args = p.parse_args(argv)
    root = Path(args.root)
    gen = []
    for _ in range(3):  # the built-in set of `minifast smith` (6,000 images): generated at each start
        t0 = time.perf_counter()
        synthetic_images()
        gen.append(time.perf_counter() - t0)
    print(f'built-in set: 6000 32x32 images generated in {min(gen):.2f}s (best of 3)')
    t0 = time.perf_counter()
    make_folder(root, args.n, args.classes)
    print(f'folder: {args.n} training PNGs, {args.classes} classes in {root} ({time.perf_counter() - t0:.1f}s)')

    cache, old_cache = tempfile.mkdtemp(prefix='minifast_bench_cache_'), os.environ.get('MINIFAST_CACHE')
    os.environ['MINIFAST_CACHE'] = cache  # a cold cache for this run, removed at its end (it holds every image)
    try:
        return _run(args, root)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if old_cache is None:
            os.environ.pop('MINIFAST_CACHE', None)
        else:
            os.environ['MINIFAST_CACHE'] = old_cache


def _run(args, root):
    t0 = time.perf_counter()
    data = minifast_bunch(root, cifar_transforms(), args.bs, args.device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    minifast_bunch(root, cifar_transforms(), args.bs, args.device)
    cached = time.perf_counter() - t0
    n_files = len(data.train_ds) + len(data.valid_ds)
    print(f'minifast first pass: decode {n_files} PNGs + write cache {first:.2f}s ({n_files / first:.0f} images/s); '
          f'next start from the cache {cached:.2f}s')

    loaders = {'torchvision (per-item)': torchvision_loader(root, args.bs, args.workers),
               'minifast cifar_transforms': data.train_dl,
               'minifast get_transforms': minifast_bunch(root, get_transforms(), args.bs, args.device).train_dl}
    fa = fastai_loader(root, args.bs, args.workers)
    if fa is not None:
        loaders['fastai v2 aug_transforms'] = fa
    else:
        print('fastai v2: not installed, skipped')
    for dl in loaders.values():  # warm-up: worker start, first-call costs
        epoch(dl)
    rates = {k: [] for k in loaders}
    names = list(loaders)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            n = epoch(loaders[name])
            rates[name].append(n / (time.perf_counter() - t0))
    where = torch.cuda.get_device_name() if args.device != 'cpu' else 'CPU'
    print(f'torch {torch.__version__}, minifast on {where}, {torch.get_num_threads()} CPU threads, bs {args.bs}, '
          f'{args.rounds} rounds')
    base = statistics.median(rates['torchvision (per-item)'])
    for name, rs in rates.items():
        med = statistics.median(rs)
        print(f'{name:28s} {med:10.0f} images/s   {med / base:6.1f}x torchvision')
    cif = statistics.median(rates['minifast cifar_transforms']) / base
    gt = statistics.median(rates['minifast get_transforms']) / base
    print(f'RESULT cifar_transforms {cif:.1f}x (target >= 20x), get_transforms {gt:.1f}x (target >= 5x)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
