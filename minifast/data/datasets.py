"""Datasets: CIFAR-10/100 read from their own pickle files, and a generated image set that needs no download."""
import math
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .images import ImageDataBunch, cifar_stats

__all__ = ['cifar10', 'cifar100', 'synthetic_cifar', 'load_cifar', 'write_cifar', 'synthetic_images',
           'write_image_folder', 'CIFAR_URL', 'SHAPES', 'HUES', 'DatasetNotFoundError']

CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar.html'

# Each entry is CIFAR's own layout: the folder the archive extracts to, its file names and the pickle keys.
_CIFAR = {
    'cifar10': dict(folder='cifar-10-batches-py', train=[f'data_batch_{i}' for i in range(1, 6)],
                    test=['test_batch'], meta='batches.meta', labels=b'labels', names=b'label_names',
                    title='CIFAR-10 python version', torchvision='CIFAR10'),
    'cifar100': dict(folder='cifar-100-python', train=['train'], test=['test'], meta='meta',
                     labels=b'fine_labels', names=b'fine_label_names',
                     title='CIFAR-100 python version', torchvision='CIFAR100'),
}

# The only globals a CIFAR pickle needs: numpy's array reconstruction, plus bytes as protocol 2 writes them.
_SAFE_GLOBALS = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
                 ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}


class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global outside `_SAFE_GLOBALS`, so a tampered file cannot call arbitrary code."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'refusing to load global {module}.{name}: not part of the CIFAR format')


def _cifar_spec(name):
    if name not in _CIFAR:
        raise ValueError(f'unknown CIFAR name {name!r}: expected one of {sorted(_CIFAR)}')
    return _CIFAR[name]


def _missing_files(folder, spec):
    return [f for f in spec['train'] + spec['test'] + [spec['meta']] if not (folder / f).is_file()]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not on disk (and were not downloaded): `folder`, the `missing` file names, where to get
    them (`title`, `url`) and the `download_error` when a download was tried and failed."""

    def __init__(self, message, folder, missing, title, url, download_error=None):
        super().__init__(message)
        self.folder, self.missing, self.title, self.url = folder, list(missing), title, url
        self.download_error = download_error


def _not_found(root, name, spec, missing, download_error=None, tried=False):
    """The error for missing CIFAR files; it offers download=True only when the call did not just try it."""
    folder = root / spec['folder']
    files = ', '.join(spec['train'] + spec['test'] + [spec['meta']])
    msg = (f'{name}: expected the folder {folder} with the files {files}; missing: {", ".join(missing)}. '
           f'Get the "{spec["title"]}" from {CIFAR_URL} and extract it into {root}'
           + ('.' if tried else f', or call load_cifar({str(root)!r}, {name!r}, download=True).'))
    if download_error is not None:
        msg += f' The download failed: {type(download_error).__name__}: {download_error}'
    return DatasetNotFoundError(msg, folder, missing, spec['title'], CIFAR_URL, download_error)


def _download(root, spec):
    # torchvision knows CIFAR's URLs and checksums; the test split keeps its post-download load small.
    import torchvision  # here, not at the top: about 1.5 s to import, and only a download needs it
    getattr(torchvision.datasets, spec['torchvision'])(str(root), train=False, download=True)


def _unpickle(path):
    try:
        with open(path, 'rb') as f:
            d = _CifarUnpickler(f, encoding='bytes').load()
    except Exception as e:
        raise ValueError(f'{path}: cannot read this CIFAR pickle ({type(e).__name__}: {e}); the file may be '
                         f'truncated or corrupt: delete it and extract the archive again') from e
    if not isinstance(d, dict):
        raise ValueError(f'{path}: expected a pickled dict, got {type(d).__name__}')
    return d


def _key(d, key, path):
    if key not in d:
        raise ValueError(f'{path}: no key {key!r} (keys: {sorted(d)})')
    return d[key]


def _read_batches(folder, files, label_key, n_classes):
    xs, ys = [], []
    for f in files:
        path = folder / f
        d = _unpickle(path)
        data, labels = _key(d, b'data', path), _key(d, label_key, path)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            desc = f'{data.dtype} {data.shape}' if isinstance(data, np.ndarray) else type(data).__name__
            raise ValueError(f'{path}: b"data" must be a uint8 array of shape (N, 3072), got {desc}')
        y = torch.tensor(list(labels), dtype=torch.int64)
        if len(y) != len(data):
            raise ValueError(f'{path}: {len(data)} images but {len(y)} labels')
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f'{path}: labels span {y.min()}..{y.max()} but there are {n_classes} classes')
        # A row is 1024 R, then 1024 G, then 1024 B values, each a 32x32 image in row-major order.
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def load_cifar(root, name='cifar100', download=True):
    """CIFAR-10 or -100 from its python-pickle files under `root`: dict(x_train, y_train, x_valid, y_valid, classes).

    CIFAR is distributed as pickle, which can run code when loaded: only the known CIFAR files are read, with an
    unpickler that refuses anything but numpy arrays, and they should still come from a trusted source.
    x is uint8 (N, 3, 32, 32), y int64; the test set is the validation set. Missing files are downloaded with
    torchvision when `download` is true; otherwise (or when that fails) a FileNotFoundError says what to get.
    """
    spec = _cifar_spec(name)
    root = Path(root).expanduser()
    folder = root / spec['folder']
    missing = _missing_files(folder, spec)
    if missing:
        if not download:
            raise _not_found(root, name, spec, missing)
        try:
            _download(root, spec)
        except Exception as e:
            raise _not_found(root, name, spec, _missing_files(folder, spec), e, tried=True) from e
        missing = _missing_files(folder, spec)
        if missing:
            raise _not_found(root, name, spec, missing, tried=True)
    meta_path = folder / spec['meta']
    names = _key(_unpickle(meta_path), spec['names'], meta_path)
    classes = [n.decode('utf-8') if isinstance(n, bytes) else str(n) for n in names]
    x_train, y_train = _read_batches(folder, spec['train'], spec['labels'], len(classes))
    x_valid, y_valid = _read_batches(folder, spec['test'], spec['labels'], len(classes))
    return dict(x_train=x_train, y_train=y_train, x_valid=x_valid, y_valid=y_valid, classes=classes)


def _as_uint8_images(x, what):
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (3, 32, 32):
        raise ValueError(f'{what} must be uint8 of shape (N, 3, 32, 32), got {x.dtype} {tuple(x.shape)}')
    return x


def _dump(obj, path):
    # Written beside the target and renamed, so an interrupted write never leaves a truncated CIFAR file.
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        pickle.dump(obj, f, protocol=2)
    os.replace(tmp, path)


def write_cifar(root, name, x_train, y_train, x_valid, y_valid, classes):
    """Write images in CIFAR's own on-disk format under `root` (a tiny CIFAR for tests); returns the folder."""
    spec = _cifar_spec(name)
    folder = Path(root).expanduser() / spec['folder']
    folder.mkdir(parents=True, exist_ok=True)
    classes = [str(c) for c in classes]
    splits = []
    for what, x, y in (('x_train', x_train, y_train), ('x_valid', x_valid, y_valid)):
        x = _as_uint8_images(x, what)
        y = torch.as_tensor(y).to(torch.int64).reshape(-1)
        if len(y) != len(x):
            raise ValueError(f'{what} has {len(x)} images but its labels have {len(y)}')
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(f'{what}: labels span {y.min()}..{y.max()} but there are {len(classes)} classes')
        splits.append((x.reshape(len(x), 3072).numpy(), y.tolist()))
    (x_tr, y_tr), (x_va, y_va) = splits
    # cifar10 spreads its training set over five batch files; cifar100 keeps one file per split.
    parts = np.array_split(np.arange(len(y_tr)), len(spec['train']))
    files = [(f, x_tr[p], [y_tr[i] for i in p], f'training batch {k + 1} of {len(parts)}')
             for k, (f, p) in enumerate(zip(spec['train'], parts))]
    files.append((spec['test'][0], x_va, y_va, 'testing batch 1 of 1'))
    for f, data, labels, title in files:
        names = [f'{classes[l]}_s_{i:06d}.png'.encode() for i, l in enumerate(labels)]
        _dump({b'batch_label': title.encode(), spec['labels']: labels, b'data': np.ascontiguousarray(data),
               b'filenames': names}, folder / f)
    meta = {spec['names']: [c.encode('utf-8') for c in classes]}
    if name == 'cifar10':
        meta.update({b'num_cases_per_batch': max(len(p) for p in parts), b'num_vis': 3072})
    _dump(meta, folder / spec['meta'])
    return folder


SHAPES = ('disc', 'ring', 'square', 'triangle', 'cross', 'stripes', 'checker', 'diagonals', 'flower', 'dots')
HUES = (('red', 0.), ('orange', 36.), ('yellow', 72.), ('lime', 108.), ('green', 144.), ('cyan', 180.),
        ('azure', 216.), ('blue', 252.), ('violet', 288.), ('magenta', 324.))


def _box(u, v, a, b):
    return torch.maximum(u.abs() - a, v.abs() - b)


def _bars(t, period):
    # Signed distance to bars half a period wide; the +1000 keeps frac's argument positive, where it is periodic.
    return ((torch.frac(t / period + 1000.) - 0.5).abs() - 0.25) * period


def _sdf(kind, u, v):
    """Signed distance (negative inside) of shape `kind` in its own frame, where it spans about [-1, 1]."""
    r = torch.sqrt(u * u + v * v)
    if kind == 0:    # disc
        return r - 0.9
    if kind == 1:    # ring
        return (r - 0.7).abs() - 0.22
    if kind == 2:    # square
        return _box(u, v, 0.75, 0.75)
    if kind == 3:    # triangle pointing up (image y grows downwards)
        return torch.maximum(v - 0.5, 0.866 * u.abs() - 0.5 * v - 0.5)
    if kind == 4:    # plus-shaped cross
        return torch.minimum(_box(u, v, 0.28, 0.9), _box(u, v, 0.9, 0.28))
    if kind == 5:    # three horizontal bars in a square
        return torch.maximum(_box(u, v, 0.85, 0.85), _bars(v + 0.85, 1.7 / 3))
    if kind == 6:    # 3x3 checkerboard; the smooth product keeps cell edges anti-aliased
        c = 1.7 / 3
        cells = -torch.sin(math.pi * (u + 0.85) / c) * torch.sin(math.pi * (v + 0.85) / c) * c / math.pi
        return torch.maximum(_box(u, v, 0.85, 0.85), cells)
    if kind == 7:    # 45-degree bars in a disc, so they differ from the stripes also by outline
        return torch.maximum(r - 0.9, _bars((u + v) * 0.7071 + 0.125, 0.5))
    if kind == 8:    # five-petal flower
        return r - (0.62 + 0.3 * torch.cos(5 * torch.atan2(v, u)))
    return torch.minimum(torch.sqrt((u + 0.5) ** 2 + v * v), torch.sqrt((u - 0.5) ** 2 + v * v)) - 0.38  # dots


def _hsv_to_rgb(h, s, v):
    """Hue in degrees, saturation and value in [0, 1] (equal shapes) -> RGB in [0, 1] on a new last axis."""
    n = torch.tensor([5., 3., 1.])
    k = (n + (h / 60.).unsqueeze(-1)) % 6
    return v.unsqueeze(-1) - (v * s).unsqueeze(-1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _masks(kinds, cx, cy, scale, aspect, angle, grid, size):
    """Anti-aliased coverage (M, H, W) of shapes placed at (cx, cy) with half-size `scale`, in image units."""
    gx, gy = grid
    dx, dy = gx - cx[:, None, None], gy - cy[:, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    sx, sy = (scale * aspect)[:, None, None], (scale / aspect)[:, None, None]
    u, v = (dx * cos + dy * sin) / sx, (-dx * sin + dy * cos) / sy
    d = torch.empty_like(u)
    for k in range(len(SHAPES)):
        sel = (kinds == k).nonzero().squeeze(1)
        if len(sel):
            d[sel] = _sdf(k, u[sel], v[sel])
    # Distance times pixels per shape unit gives about one pixel of soft edge at any scale.
    return torch.clamp(0.5 - d * (scale * size / 2)[:, None, None], 0, 1)


def _class_table(n_classes):
    """(shape index, palette hue index or -1 for any hue, name) for each class."""
    if n_classes <= len(SHAPES):
        return [(k, -1, SHAPES[k]) for k in range(n_classes)]
    n_hues = math.ceil(n_classes / len(SHAPES))
    # With fewer than ten hues in play, spread them round the colour wheel so they stay far apart.
    hues = [i * len(HUES) // n_hues for i in range(n_hues)]
    table = []
    for k in range(n_classes):
        shape, hue = k % len(SHAPES), hues[k // len(SHAPES)]
        table.append((shape, hue, f'{SHAPES[shape]}_{HUES[hue][0]}'))
    return table


def _balanced_labels(n, n_classes, g):
    return (torch.arange(n) % n_classes)[torch.randperm(n, generator=g)]


def synthetic_images(n_classes=10, n_train=5000, n_valid=1000, size=32, seed=0):
    """Generated shape-and-colour images, no download: dict(x_train, y_train, x_valid, y_valid, classes).

    With up to 10 classes a class is a shape (`SHAPES`) in any colour; with more, a shape in one of the hues
    of `HUES` (100 classes: every pair, named like 'disc_red'). Position, size, aspect, rotation, colour, a
    gradient-and-noise background, lighting, pixel noise and a small distractor shape (in a third of the images)
    vary per image. Same arguments and seed give bit-identical uint8 tensors of shape (N, 3, size, size).
    """
    if not 2 <= n_classes <= len(SHAPES) * len(HUES):
        raise ValueError(f'n_classes must be between 2 and {len(SHAPES) * len(HUES)}, got {n_classes}')
    if n_train < 0 or n_valid < 0 or size < 8:
        raise ValueError(f'need n_train, n_valid >= 0 and size >= 8, got {n_train}, {n_valid}, {size}')
    g = torch.Generator().manual_seed(seed)
    table = _class_table(n_classes)
    y = torch.cat([_balanced_labels(n_train, n_classes, g), _balanced_labels(n_valid, n_classes, g)])
    n = len(y)
    p = _image_params(y, table, g)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    grid = (coords[None, :].expand(size, size), coords[:, None].expand(size, size))  # x across, y down
    # Bilinear upsampling of a 4x4 noise grid as two small matrix products (much cheaper than F.interpolate).
    up = torch.clamp(1 - ((coords + 1) * 2 - 0.5).clamp(0, 3)[:, None].sub(torch.arange(4.)).abs(), min=0)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    chunk = 1024
    for s in range(0, n, chunk):                             # chunks bound the float32 memory for large sets
        i = slice(s, min(s + chunk, n))
        out[i] = _render(p, i, grid, up, size, g)
    classes = [t[2] for t in table]
    return dict(x_train=out[:n_train], y_train=y[:n_train], x_valid=out[n_train:], y_valid=y[n_train:],
                classes=classes)


def _image_params(y, table, g):
    """synthetic_images' per-image parameters for the labels `y` (colours as RGB), drawn from `g` in a fixed order
    that is part of the data set; only pixel-level noise is drawn later, while rendering, chunk by chunk."""
    n = len(y)

    def uni(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    shape_of = torch.tensor([t[0] for t in table])[y]
    hue_idx = torch.tensor([t[1] for t in table])[y]
    palette = torch.tensor([h for _, h in HUES])
    obj_hue = torch.where(hue_idx >= 0, palette[hue_idx.clamp(min=0)] + 7. * torch.randn(n, generator=g),
                          uni(0., 360.))
    obj_hsv = (obj_hue, uni(0.55, 1.), uni(0.5, 1.))
    scale = uni(0.35, 0.65)
    centre = (torch.rand(n, 2, generator=g) * 2 - 1) * (1 - 0.8 * scale[:, None])
    aspect, angle = uni(0.85, 1.18), uni(-0.35, 0.35)      # at most 20 degrees: stripes stay apart from diagonals
    shade, light = uni(0., 0.5), uni(0., 2 * math.pi)       # a brightness ramp across the object
    bg_hsv = (uni(0., 360., 2), uni(0., 0.45, 2), uni(0.05, 0.95, 2))  # two background colours ...
    bg_dir, bg_noise = uni(0., 2 * math.pi), uni(0., 0.15)  # ... blended along a direction, with blotchy noise
    has_d = torch.rand(n, generator=g) < 1 / 3
    d_kind = torch.randint(0, len(SHAPES), (n,), generator=g)
    d_hsv = (uni(0., 360.), uni(0.3, 1.), uni(0.3, 1.))
    d_scale = uni(0.12, 0.22)
    d_centre = torch.rand(n, 2, generator=g) * 2 - 1
    d_angle = uni(-math.pi, math.pi)
    gain, noise = uni(0.85, 1.15, 3), uni(0.01, 0.06)        # a colour cast and sensor noise
    return SimpleNamespace(shape_of=shape_of, obj_rgb=_hsv_to_rgb(*obj_hsv), scale=scale, centre=centre,
                           aspect=aspect, angle=angle, shade=shade, light=light,
                           bg_rgb=_hsv_to_rgb(*bg_hsv), bg_dir=bg_dir, bg_noise=bg_noise,  # bg_rgb: (n, 2, 3)
                           has_d=has_d, d_kind=d_kind, d_rgb=_hsv_to_rgb(*d_hsv), d_scale=d_scale, d_centre=d_centre,
                           d_angle=d_angle, gain=gain, noise=noise)


def _render(p, i, grid, up, size, g):
    """The uint8 images (m, 3, size, size) of the parameters `p` at the slice `i`; their pixel noise is drawn from
    `g`."""
    s, m = i.start, i.stop - i.start
    t = (torch.cos(p.bg_dir[i])[:, None, None] * grid[0] + torch.sin(p.bg_dir[i])[:, None, None] * grid[1]) / 2 + 0.5
    a = p.bg_rgb[i, 0][:, :, None, None]
    img = (p.bg_rgb[i, 1][:, :, None, None] - a) * t[:, None] + a
    blotch = torch.randn(m, 3, 4, 4, generator=g) * p.bg_noise[i][:, None, None, None]
    img += up @ blotch @ up.T
    k = p.has_d[i].nonzero().squeeze(1)
    if len(k):                                               # the distractor goes under the object
        j = k + s
        md = _masks(p.d_kind[j], p.d_centre[j, 0], p.d_centre[j, 1], p.d_scale[j], torch.ones(len(j)), p.d_angle[j],
                    grid, size)[:, None]
        img[k] = img[k].lerp_(p.d_rgb[j][:, :, None, None].expand(-1, -1, size, size), md)
    mo = _masks(p.shape_of[i], p.centre[i, 0], p.centre[i, 1], p.scale[i], p.aspect[i], p.angle[i], grid, size)[:, None]
    ramp = (torch.cos(p.light[i])[:, None, None] * (grid[0] - p.centre[i, 0, None, None])
            + torch.sin(p.light[i])[:, None, None] * (grid[1] - p.centre[i, 1, None, None]))
    ramp = ramp.mul_((p.shade[i] / p.scale[i])[:, None, None]).add_(1)
    img.lerp_(p.obj_rgb[i][:, :, None, None] * ramp[:, None], mo)
    img.mul_(p.gain[i][:, :, None, None]).addcmul_(torch.randn(m, 3, size, size, generator=g),
                                                   p.noise[i][:, None, None, None])
    return img.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8)   # +0.5 then truncation rounds


def _check_folder_name(c):
    if not c or c in ('.', '..') or '/' in c or '\\' in c or '\0' in c:
        raise ValueError(f'class name {c!r} cannot be a folder name')


def write_image_folder(path, x, y, classes, split='train', ext='png'):
    """Write uint8 images (N, C, H, W) as `path/split/<class name>/<index>.<ext>` with PIL; returns that folder."""
    from PIL import Image
    x, y = torch.as_tensor(x), torch.as_tensor(y).reshape(-1)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f'x must be uint8 of shape (N, 1 or 3, H, W), got {x.dtype} {tuple(x.shape)}')
    if len(y) != len(x):
        raise ValueError(f'x has {len(x)} images but y has {len(y)} labels')
    if len(y) and (y.min() < 0 or y.max() >= len(classes)):
        raise ValueError(f'labels span {y.min()}..{y.max()} but there are {len(classes)} classes')
    classes = [str(c) for c in classes]
    for c in classes:
        _check_folder_name(c)
    folder = Path(path).expanduser() / split
    for c in sorted(set(classes[l] for l in y.unique().tolist())):
        (folder / c).mkdir(parents=True, exist_ok=True)
    arr = x.permute(0, 2, 3, 1).contiguous().numpy()
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    # Zero-padded indices keep a sorted directory listing in the order of x.
    width = len(str(max(len(x) - 1, 0)))
    for i, label in enumerate(y.tolist()):
        Image.fromarray(arr[i]).save(folder / classes[label] / f'{i:0{width}d}.{ext}')
    return folder


def _bunch(d, tfms, bs, val_bs, device, normalize, path):
    data = ImageDataBunch.from_tensors(d['x_train'], d['y_train'], d['x_valid'], d['y_valid'], classes=d['classes'],
                                       tfms=tfms, bs=bs, val_bs=val_bs, device=device, path=path)
    return data.normalize(cifar_stats) if normalize else data


def cifar10(root='data', download=True, tfms=None, bs=64, val_bs=None, device=None, normalize=True):
    """CIFAR-10 as an ImageDataBunch (test set as validation), normalised with cifar_stats; see load_cifar."""
    return _bunch(load_cifar(root, 'cifar10', download), tfms, bs, val_bs, device, normalize, root)


def cifar100(root='data', download=True, tfms=None, bs=64, val_bs=None, device=None, normalize=True):
    """CIFAR-100 (fine labels) as an ImageDataBunch (test set as validation), normalised; see load_cifar."""
    return _bunch(load_cifar(root, 'cifar100', download), tfms, bs, val_bs, device, normalize, root)


def synthetic_cifar(n_classes=10, n_train=5000, n_valid=1000, seed=0, tfms=None, bs=64, val_bs=None, device=None,
                    normalize=True):
    """The built-in dataset (synthetic_images: 32x32 shapes, no download) as an ImageDataBunch, normalised with
    its own statistics."""
    d = synthetic_images(n_classes=n_classes, n_train=n_train, n_valid=n_valid, seed=seed)
    data = ImageDataBunch.from_tensors(d['x_train'], d['y_train'], d['x_valid'], d['y_valid'], classes=d['classes'],
                                       tfms=tfms, bs=bs, val_bs=val_bs, device=device)
    return data.normalize() if normalize else data
