"""The ImageList chain (fastai v1's spelling) and ImageDataBunch: images decoded once, augmented batch-wise on device.

    data = (ImageList.from_folder(path).split_by_folder(train='train', valid='test').label_from_folder()
            .transform(get_transforms(), size=(32, 32)).databunch(bs=256, val_bs=512).normalize(cifar_stats))
"""
import csv
import math
import re
import warnings
from collections import Counter, namedtuple
from pathlib import Path

import numpy as np
import torch

from ..callbacks.recorder import new_figure
from ..device import resolve_device
from .augment import apply_tfms, split_index_only
from .cache import ImageDecodeError, cached_decode, decode_images
from .core import DataBunch, TensorDataLoader
from .items import image_uint8, resize_uint8

__all__ = ['ImageList', 'ItemLists', 'LabelLists', 'ImageDataBunch', 'ImageDataset', 'BatchPipeline', 'IMG_EXTENSIONS',
           'cifar_stats', 'imagenet_stats', 'get_image_files']

IMG_EXTENSIONS = frozenset({'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm'})
cifar_stats = ([0.491, 0.482, 0.447], [0.247, 0.243, 0.261])
imagenet_stats = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _size2(size):
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else size
    return int(h), int(w)


def _split_tfms(tfms, where):
    """(train list, valid list) from what fastai accepts: None, a (train, valid) pair of lists, one list, or one
    transform; every element must be callable."""
    if tfms is None:
        return [], []
    if isinstance(tfms, (list, tuple)) and len(tfms) == 2 and all(t is None or isinstance(t, (list, tuple))
                                                                  for t in tfms):
        tr, va = (list(t or []) for t in tfms)
    elif isinstance(tfms, (list, tuple)):
        tr, va = list(tfms), []
    else:
        tr, va = [tfms], []
    for name, ts in (('train', tr), ('valid', va)):
        for i, t in enumerate(ts):
            if not callable(t):
                raise TypeError(f'{where}: {name} transform {i} is {t!r} ({type(t).__name__}), which is not '
                                f'callable; use get_transforms(), cifar_transforms() or BatchTransform objects')
    return tr, va


def _hidden(rel):
    return any(part.startswith('.') or part == '__pycache__' for part in rel.parts)


def get_image_files(c, check_ext=True, recurse=False):
    """fastai v1's: the image files in folder `c` (below it too with `recurse`), sorted; hidden entries skipped,
    and, unless check_ext=False, files without an image extension."""
    c = Path(c)
    if not c.is_dir():
        raise NotADirectoryError(f'get_image_files: {c} is not a folder')
    found = c.rglob('*') if recurse else c.iterdir()
    return sorted(p for p in found if p.is_file() and not _hidden(p.relative_to(c))
                  and (not check_ext or p.suffix.lower() in IMG_EXTENSIONS))


class ImageList:
    """A list of image files under `path`: the start of the chain."""

    def __init__(self, items, path='.', ignore_errors=False, rows=None, columns=None):
        self.items, self.path, self.ignore_errors = [Path(i) for i in items], Path(path), ignore_errors
        # from_csv: each item's csv row (and the header's column names), for label_from_df
        self.rows, self.columns = rows, columns

    @classmethod
    def from_folder(cls, path='.', extensions=None, recurse=True, ignore_errors=False):
        """Every image file below `path`; hidden entries (.ipynb_checkpoints, .DS_Store) and other files are skipped."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f'ImageList.from_folder: {path} does not exist')
        if not path.is_dir():
            raise NotADirectoryError(f'ImageList.from_folder: {path} is not a folder')
        exts = IMG_EXTENSIONS if extensions is None else {e.lower() if e.startswith('.') else f'.{e.lower()}'
                                                          for e in extensions}
        found = path.rglob('*') if recurse else path.iterdir()
        items = sorted(p for p in found if p.suffix.lower() in exts and p.is_file()
                       and not _hidden(p.relative_to(path)))
        if not items:
            raise ValueError(f'ImageList.from_folder: no image files ({", ".join(sorted(exts))}) found in {path}')
        return cls(items, path, ignore_errors)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def __repr__(self):
        return f'{type(self).__name__} ({len(self)} items) in {self.path}'

    @classmethod
    def from_csv(cls, path, csv_name, cols=0, folder=None, suffix='', delimiter=None, header='infer',
                 ignore_errors=False):
        """The files named in column `cols` (an index, or a name from the header) of path/csv_name, under
        path/folder with `suffix` appended; `header` 'infer' (a first row naming no existing file is the header),
        None (no header) or 0 (the first row is the header). label_from_df then reads labels from the same rows."""
        path = Path(path)
        table = _read_csv(path / csv_name, delimiter, header, cols, path if folder is None else path / folder, suffix,
                          ignore_errors)
        return cls(table.files, path, ignore_errors, rows=table.rows, columns=table.columns)

    def _sub(self, idx):
        rows = None if self.rows is None else [self.rows[i] for i in idx]
        return ImageList([self.items[i] for i in idx], self.path, self.ignore_errors, rows, self.columns)

    def split_by_folder(self, train='train', valid='valid'):
        """Items under path/train and path/valid (the first folder below `path` decides)."""
        tops = [i.relative_to(self.path).parts[0] for i in self.items]
        tr = [i for i, t in enumerate(tops) if t == train]
        va = [i for i, t in enumerate(tops) if t == valid]
        have = sorted({t for t, i in zip(tops, self.items) if i.parent != self.path})
        for name, idx in ((train, tr), (valid, va)):
            if not idx:
                raise ValueError(f"split_by_folder: no images in {self.path / name}; the folders of {self.path} "
                                 f"holding images are {have}")
        return ItemLists(self.path, self._sub(tr), self._sub(va), split_dirs=(train, valid))

    def split_by_rand_pct(self, valid_pct=0.2, seed=None):
        """A random `valid_pct` of the items for validation (seeded by `seed` when given)."""
        if not 0 < valid_pct < 1:
            raise ValueError(f'split_by_rand_pct: valid_pct must be between 0 and 1, got {valid_pct}')
        # torch's global RNG unless seeded, so torch.manual_seed fixes the split too
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        idx = torch.randperm(len(self), generator=g).tolist()
        cut = int(round(valid_pct * len(idx)))
        if cut == 0 or cut == len(idx):
            raise ValueError(f'split_by_rand_pct: {len(idx)} items with valid_pct={valid_pct} leave an empty split')
        return ItemLists(self.path, self._sub(sorted(idx[cut:])), self._sub(sorted(idx[:cut])))

    def split_by_idx(self, valid_idx):
        """The items at `valid_idx` for validation, the rest for training."""
        v = set(int(i) for i in valid_idx)
        bad = [i for i in v if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f'split_by_idx: indices {sorted(bad)[:5]} are outside 0..{len(self) - 1} '
                             f'({len(self)} items)')
        return ItemLists(self.path, self._sub([i for i in range(len(self)) if i not in v]), self._sub(sorted(v)))


class ItemLists:
    """A training and a validation ImageList."""

    def __init__(self, path, train, valid, split_dirs=None):
        self.path, self.train, self.valid, self.split_dirs = Path(path), train, valid, split_dirs

    def __repr__(self):
        return f'ItemLists(train: {len(self.train)} items, valid: {len(self.valid)} items) in {self.path}'

    def _class_roots(self):
        if self.split_dirs is None:
            return [self.path]
        return [self.path / d for d in self.split_dirs]

    def label_from_folder(self, classes=None):
        """Label each image by the name of its folder; see `label_from_lists` for `classes` and for validation
        classes unknown to training."""
        items = (*self.train.items, *self.valid.items)
        parents = Counter(i.parent for i in items)
        holding = {a for d in parents for a in (d, *d.parents)}  # folders with an image somewhere below
        for root in self._class_roots():
            if parents[root]:
                flat = next(i for i in items if i.parent == root)
                raise ValueError(f'label_from_folder: {parents[root]} image(s) lie directly in {root} (e.g. '
                                 f'{flat.name}); put each class in its own subfolder of {root}')
            for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.')):
                if d not in holding:
                    warnings.warn(f'class folder {d} has no images; it is not a class')
        return self._label([i.parent.name for i in self.train.items], [i.parent.name for i in self.valid.items],
                           'label_from_folder', classes)

    def label_from_func(self, func, classes=None):
        """Label each image by `func(file path)` (a string, or anything str() makes one)."""
        if not callable(func):
            raise TypeError(f'label_from_func: func must be a function file path -> label, got {func!r}')

        def label(f):
            y = func(f)
            if y is None:
                raise ValueError(f'label_from_func: {getattr(func, "__name__", func)} returned None for {f}')
            return str(y)
        return self._label([label(f) for f in self.train.items], [label(f) for f in self.valid.items],
                           'label_from_func', classes)

    def label_from_re(self, pat, full_path=False, classes=None):
        """Label each image by the first group of the regular expression `pat` searched in its path (as fastai v1:
        the item's path as given, or joined to `path` with full_path), e.g. r'/([^/]+)_\\d+.png$'."""
        rx = re.compile(pat)
        if rx.groups < 1:
            raise ValueError(f'label_from_re: the pattern {pat!r} has no group; the label is its first (...) group')

        def label(f):
            s = (self.path / f if full_path else f).as_posix()
            m = rx.search(s)
            if m is None or m.group(1) is None:
                raise ValueError(f'label_from_re: the pattern {pat!r} does not match {s} (nor gives a first group); '
                                 f'every file needs a label')
            return m.group(1)
        return self._label([label(f) for f in self.train.items], [label(f) for f in self.valid.items],
                           'label_from_re', classes)

    def label_from_lists(self, train_labels, valid_labels, classes=None):
        """Labels given as lists, one per training and one per validation item (as strings).

        Classes are the sorted training labels, or `classes` in its order (items of other classes are then dropped,
        with a warning); validation items of classes unknown to training are dropped with a warning (a ValueError
        when none is left)."""
        ytr, yva = list(train_labels), list(valid_labels)
        for name, ys, il in (('train', ytr, self.train), ('valid', yva, self.valid)):
            if len(ys) != len(il):
                raise ValueError(f'label_from_lists: {len(ys)} {name} labels for {len(il)} {name} items')
        return self._label([str(y) for y in ytr], [str(y) for y in yva], 'label_from_lists', classes)

    def label_from_df(self, cols=1, classes=None):
        """Label each image by column `cols` (an index or a header name) of its row of the csv file that
        ImageList.from_csv read (one label per image)."""
        rows = self.train.rows
        if rows is None or self.valid.rows is None:
            raise ValueError('label_from_df: these items do not come from a csv file (ImageList.from_csv); use '
                             'label_from_func, label_from_re or label_from_lists')
        if not isinstance(cols, (int, str)):
            raise ValueError(f'label_from_df: cols={cols!r}: one label column (an index or a name) is supported; '
                             f'multi-label data is not')
        ys = []
        for il in (self.train, self.valid):
            ys.append([_cell(r, cols, self.train.columns, 'label_from_df: the label') for r in il.rows])
        return self._label(*ys, 'label_from_df', classes)

    def _label(self, ytr, yva, who, classes=None):
        """The one way labels become a LabelLists: classes (sorted training labels, or `classes` as given), items
        whose label is not a class dropped with a warning (a ValueError when a split would be left empty)."""
        given = classes is not None
        if given:
            classes = [str(c) for c in classes]
            if len(set(classes)) != len(classes):
                raise ValueError(f'{who}: classes= names a class twice: {classes}')
        else:
            classes = sorted(set(ytr))
        known, source = set(classes), 'the classes given' if given else 'training'
        train, ytr = _drop_unknown(self.train, ytr, known, who, 'training', source, classes)
        valid, yva = _drop_unknown(self.valid, yva, known, who, 'validation', source, classes,
                                   self.path / self.split_dirs[1] if self.split_dirs else None)
        return LabelLists(self.path, train, ytr, valid, yva, classes)


def _drop_unknown(il, ys, known, who, split, absent_from, classes, where=None):
    """(items, labels) without those whose label is not in `known`, with a warning naming them; a ValueError when
    every item would go."""
    unknown = Counter(y for y in ys if y not in known)
    if not unknown:
        return il, ys
    what = ', '.join(f"'{c}' ({n} images)" for c, n in sorted(unknown.items()))
    if sum(unknown.values()) == len(ys):  # nothing left: fit would refuse it later, with less to go on
        raise ValueError(f'{who}: every {split} image ({where or f"the {split} split"}) is of a class absent from '
                         f'{absent_from}: {what}; the {"training " if absent_from == "training" else ""}classes are '
                         f'{classes}')
    warnings.warn(f'{split} classes absent from {absent_from}, their images are dropped: {what}')
    keep = [k for k, y in enumerate(ys) if y in known]
    return il._sub(keep), [ys[k] for k in keep]


class LabelLists:
    """Labelled training and validation lists; `.transform(...)` then `.databunch(...)` finish the chain."""

    def __init__(self, path, train, y_train, valid, y_valid, classes):
        self.path, self.train, self.valid, self.classes = Path(path), train, valid, classes
        self.y_train, self.y_valid = y_train, y_valid
        self.tfms, self.size, self.crop = ([], []), None, False

    def __repr__(self):
        return (f'LabelLists(train: {len(self.train)} items, valid: {len(self.valid)} items, '
                f'{len(self.classes)} classes) in {self.path}')

    def transform(self, tfms=None, size=None):
        """Augmentations for training (and validation): a (train, valid) pair as get_transforms() returns, or one
        list for training; `size` (an int or (H, W)) is what every image is resized to when decoded."""
        self.tfms, self.size = _split_tfms(tfms, 'transform'), _size2(size)
        self.crop = isinstance(size, int)  # fastai: an int size keeps the aspect ratio (centre crop), a pair squishes
        return self

    def databunch(self, bs=64, val_bs=None, num_workers=None, device=None, ignore_errors=None, cache=True,
                  device_data='auto'):
        """Decode every image once (cached on disk) and build an ImageDataBunch.

        num_workers sets the decoding processes (used for large folders only); batches are made by indexing.
        """
        ignore = self.train.ignore_errors if ignore_errors is None else ignore_errors
        size = self.size if self.size is not None else _first_size(self.train.items, ignore)
        # one decode (and one cache entry) for the files of both splits, in a fixed order: every way of splitting
        # the same folder reuses it
        files = sorted(set(self.train.items) | set(self.valid.items))
        x, keep, _ = cached_decode(files, self.path, size, num_workers, ignore, cache, self.crop)
        row = {files[k]: r for r, k in enumerate(keep)}
        cls = {c: i for i, c in enumerate(self.classes)}
        parts = []
        for items, labels in ((self.train.items, self.y_train), (self.valid.items, self.y_valid)):
            ok = [k for k, f in enumerate(items) if f in row]
            parts += [x[[row[items[k]] for k in ok]], torch.tensor([cls[labels[k]] for k in ok], dtype=torch.long),
                      [items[k] for k in ok]]
        xt, yt, it, xv, yv, iv = parts
        return ImageDataBunch(xt, yt, xv, yv, self.classes, bs=bs, val_bs=val_bs, train_tfms=self.tfms[0],
                              valid_tfms=self.tfms[1], device=device, path=self.path, train_items=it, valid_items=iv,
                              device_data=device_data, crop=self.crop)


def _first_size(files, ignore_errors):
    """(H, W) of the first readable file, the size of every image when transform() gives none; an unreadable file is
    skipped with ignore_errors (decoding then skips and reports it), else named."""
    from PIL import Image
    for f in files:
        try:
            with Image.open(f) as im:
                return im.height, im.width
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for bad files
            if not ignore_errors:
                why = f'{type(e).__name__}: {e}'
                raise ImageDecodeError(f'cannot read image {f}: {why}; pass ignore_errors=True to skip such files',
                                       [(f, why)]) from e
    raise ImageDecodeError(f'none of the {len(files)} training images can be read (the first is {files[0]})')


# one csv row: its file and line number come along so that an error about it can say where it is
_Row = namedtuple('_Row', 'file line values')
_CsvTable = namedtuple('_CsvTable', 'files rows columns')


def _col(cols, columns, file, what):
    """The index of column `cols` (an int, or a name from the header `columns`)."""
    if isinstance(cols, str):
        if columns is None:
            raise ValueError(f'{what} column {cols!r}: {file} is read without a header (header=None), so columns '
                             f'are given by index')
        if cols not in columns:
            raise ValueError(f'{what} column {cols!r} is not in the header of {file}: {columns}')
        return columns.index(cols)
    if isinstance(cols, bool) or not isinstance(cols, int):
        raise TypeError(f'{what} column must be an index or a header name, got {cols!r}')
    return cols


def _cell(row, cols, columns, what):
    """The value of column `cols` in `row` (a _Row), with an error naming the file and line when it has none."""
    i = _col(cols, columns, row.file, what)
    if not -len(row.values) <= i < len(row.values):
        raise ValueError(f'{what} column {cols!r}: line {row.line} of {row.file} has {len(row.values)} column(s): '
                         f'{row.values}')
    return row.values[i].strip()


def _read_csv(file, delimiter, header, cols, folder, suffix, ignore_errors=False):
    """The image files a csv file names (column `cols`, under `folder`, + `suffix`), with their rows and header.
    header='infer': a first row whose file column does not name an existing file is the header (pandas-free)."""
    file = Path(file)
    if not file.is_file():
        near = sorted(p.name for p in file.parent.glob('*.csv')) if file.parent.is_dir() else []
        raise FileNotFoundError(f'from_csv: no csv file {file}' + (f' (csv files there: {near})' if near else ''))
    if header not in ('infer', None, 0):
        raise ValueError(f"from_csv: header must be 'infer', None (no header) or 0 (the first row), got {header!r}")
    with open(file, newline='', encoding='utf-8-sig') as fh:  # utf-8-sig: a BOM from Excel is not part of a name
        rows = [_Row(file, n, r) for n, r in enumerate(csv.reader(fh, delimiter=delimiter or ','), 1)
                if any(v.strip() for v in r)]  # blank lines are skipped, as pandas does
    if not rows:
        raise ValueError(f'from_csv: {file} has no rows')
    columns = None
    if header == 0 or (header == 'infer' and not isinstance(cols, int)):
        columns = [v.strip() for v in rows.pop(0).values]
    elif header == 'infer':
        first = rows[0]
        name = first.values[cols].strip() if -len(first.values) <= cols < len(first.values) else ''
        if not (folder / f'{name}{suffix}').is_file():
            columns = [v.strip() for v in rows.pop(0).values]
    files = [folder / f'{_cell(r, cols, columns, "from_csv: the file name")}{suffix}' for r in rows]
    missing = [k for k, f in enumerate(files) if not f.is_file()]
    if missing:
        r = rows[missing[0]]
        msg = (f'{len(missing)} of the {len(files)} images named in {file} do not exist; the first, on line {r.line}, '
               f'is {files[missing[0]]}')
        if not ignore_errors:
            raise FileNotFoundError(f'from_csv: {msg} (check folder= and suffix=, or pass ignore_errors=True to skip '
                                    f'them)')
        warnings.warn(f'from_csv: {msg}; those rows are skipped')
        keep = sorted(set(range(len(files))) - set(missing))
        files, rows = [files[k] for k in keep], [rows[k] for k in keep]
    if not files:
        raise ValueError(f'from_csv: {file} names no images')
    return _CsvTable(files, rows, columns)


def _files(path, fnames, who):
    """`fnames` as paths; a relative one that does not exist as given is taken under `path`; every one must exist."""
    path, out = Path(path), []
    for f in fnames:
        f = Path(f)
        out.append(path / f if not f.is_absolute() and not f.exists() and (path / f).exists() else f)
    if not out:
        raise ValueError(f'{who}: fnames is empty')
    missing = [f for f in out if not f.is_file()]
    if missing:
        raise FileNotFoundError(f'{who}: {len(missing)} of the {len(out)} files do not exist (the first: '
                                f'{missing[0]}; relative names are looked up in the current folder, then in {path})')
    return out


class ImageDataset:
    """Decoded images `x` (uint8, N×3×H×W), labels `y`, `classes` and the source files `items` (None for arrays)."""

    def __init__(self, x, y, classes, items=None):
        self.x, self.y, self.classes, self.items = x, y, classes, items

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __repr__(self):
        return f'ImageDataset({len(self)} images of {tuple(self.x.shape[1:])}, {len(self.classes)} classes)'


class BatchPipeline:
    """What a loader of `bunch` does to each batch, on the batch's device: the index-only transforms of `tfms` on
    uint8, to float in [0, 1], the other transforms, then the bunch's normalisation (TTA builds its views with it)."""

    def __init__(self, tfms, bunch):
        self.pre, self.post = split_index_only(list(tfms))
        self.bunch = bunch

    def __call__(self, batch):
        x, y = batch
        x = apply_tfms(self.pre, x)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        x = apply_tfms(self.post, x)
        return self.bunch._normalize(x), y


def _to_uint8_images(x, name):
    """Tensors or numpy arrays, NCHW or NHWC, integers in 0..255 or floats in [0, 1] -> a uint8 NCHW tensor."""
    x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if x.ndim == 3:
        x = x[:, None]  # grayscale N×H×W
    if x.ndim != 4:
        raise ValueError(f'{name}: expected images as N×C×H×W or N×H×W×C, got shape {tuple(x.shape)}')
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f'{name}: expected 1 or 3 channels, got shape {tuple(x.shape)}')
    if x.dtype not in (torch.uint8, torch.bool) and not x.is_floating_point():  # int64 (np.array of lists),
        # int16...: 0..255 values (bool masks stay 0 or 255, below)
        lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
        if lo < 0 or hi > 255:
            raise ValueError(f'{name}: integer images must be in 0..255 (they span {lo}..{hi})')
        x = x.to(torch.uint8)
    if x.dtype != torch.uint8:
        # both ends: clamping would silently zero the negative half of already-normalised ([-1, 1]) images
        lo, hi = (float(x.min()), float(x.max())) if x.is_floating_point() and x.numel() else (0., 0.)
        if math.isnan(lo) or math.isnan(hi):  # min and max propagate NaN, so the count costs nothing on clean data
            nan = torch.isnan(x).flatten(1).any(1)
            raise ValueError(f'{name}: float images hold {int(torch.isnan(x).sum())} NaN of {x.numel()} values, in '
                             f'{int(nan.sum())} of {len(x)} images (the first is image {int(nan.float().argmax())}); '
                             f'NaN would become 0: clean the data (torch.nan_to_num, or drop those images) first')
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(f'{name}: float images must be in [0, 1] (they span [{lo:.3g}, {hi:.3g}]); '
                             f'pass uint8 for 0..255 values, and un-normalised images (normalize() comes later)')
        x = (x.float() * 255).round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def _on_device(device_data, device, tensors):
    """Whether the dataset's tensors go to `device` once, up front: device_data True/False, or 'auto' (CUDA, and
    they take at most a quarter of the free GPU memory)."""
    if device_data not in (True, False, 'auto'):
        raise ValueError(f"ImageDataBunch: device_data must be True, False or 'auto', got {device_data!r}")
    if device_data is True or device_data is False:
        return device_data
    if device.type != 'cuda':
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(t.numel() * t.element_size() for t in tensors) <= free // 4


class ImageDataBunch(DataBunch):
    """Training and validation images held as uint8 tensors; batches are made by indexing and augmented, converted
    and normalised on the batch's device (the GPU when there is one). With `device_data` ('auto': on CUDA when the
    images take at most a quarter of the free GPU memory) the uint8 images and labels live on the GPU, so no batch
    crosses the host-device link."""

    def __init__(self, x_train, y_train, x_valid, y_valid, classes, bs=64, val_bs=None, train_tfms=(), valid_tfms=(),
                 device=None, path='.', train_items=None, valid_items=None, drop_last=True, device_data='auto',
                 crop=False, resize='pil'):
        if len(x_train) != len(y_train) or len(x_valid) != len(y_valid):
            raise ValueError(f'ImageDataBunch: {len(x_train)} training images but {len(y_train)} labels, '
                             f'{len(x_valid)} validation images but {len(y_valid)} labels')
        for split, y in (('training', y_train), ('validation', y_valid)):
            if len(y):
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= len(classes):
                    raise ValueError(f'ImageDataBunch: {split} label {lo if lo < 0 else hi} is outside 0..'
                                     f'{len(classes) - 1} ({len(classes)} classes)')
        self.device, self.path, self.stats, self._stats_on = resolve_device(device), Path(path), None, {}
        self.train_tfms, self.valid_tfms = list(train_tfms), list(valid_tfms)
        # how a new image file becomes one of these: decoded, then resized to size (crop: short side, centre crop)
        self.size, self.crop = tuple(int(s) for s in x_train.shape[-2:]), bool(crop)
        if resize not in ('pil', 'torch'):
            raise ValueError(f"ImageDataBunch: resize must be 'pil' (files) or 'torch' (from_tensors), got {resize!r}")
        self.resize = resize  # PIL's bilinear for decoded files, torch's antialiased interpolate for tensors
        if _on_device(device_data, self.device, (x_train, y_train, x_valid, y_valid)):
            x_train, y_train, x_valid, y_valid = (t.to(self.device) for t in (x_train, y_train, x_valid, y_valid))
        train = TensorDataLoader(x_train, y_train, batch_size=bs, shuffle=True, drop_last=drop_last,
                                 device=self.device, after_batch=BatchPipeline(self.train_tfms, self))
        valid = TensorDataLoader(x_valid, y_valid, batch_size=val_bs or bs, device=self.device,
                                 after_batch=BatchPipeline(self.valid_tfms, self))
        train.dataset = ImageDataset(x_train, y_train, classes, train_items)
        valid.dataset = ImageDataset(x_valid, y_valid, classes, valid_items)
        super().__init__(train, valid, classes=list(classes))

    @classmethod
    def from_tensors(cls, x_train, y_train, x_valid, y_valid, classes=None, tfms=None, size=None, bs=64,
                     val_bs=None, device=None, path='.', device_data='auto'):
        """From tensors or numpy arrays (NCHW or NHWC; 0..255 integers or [0, 1] floats), resized to `size`."""
        size = _size2(size)
        xt = resize_uint8(_to_uint8_images(x_train, 'x_train'), size)
        xv = resize_uint8(_to_uint8_images(x_valid, 'x_valid'), size)
        as_long = lambda y: (y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))).long()  # noqa: E731
        yt, yv = as_long(y_train), as_long(y_valid)
        if classes is None:
            classes = [str(i) for i in range(int(max(yt.max(), yv.max() if len(yv) else 0)) + 1)]
        tr, va = _split_tfms(tfms, 'ImageDataBunch.from_tensors')
        return cls(xt, yt, xv, yv, classes, bs=bs, val_bs=val_bs, train_tfms=tr, valid_tfms=va, device=device,
                   path=path, device_data=device_data, resize='torch')

    # ---- fastai v1's constructors: each one is an ImageList chain, finished by create_from_ll ----------------
    @classmethod
    def create_from_ll(cls, lls, bs=64, val_bs=None, ds_tfms=None, num_workers=None, device=None, size=None,
                       **kwargs):
        """A LabelLists transformed (`ds_tfms`, `size`) and decoded into a bunch; other kwargs go to databunch()."""
        return lls.transform(ds_tfms, size=size).databunch(bs=bs, val_bs=val_bs, num_workers=num_workers,
                                                           device=device, **kwargs)

    @classmethod
    def from_folder(cls, path='.', train='train', valid='valid', valid_pct=None, seed=None, classes=None, **kwargs):
        """Images in path/train/<class>/ and path/valid/<class>/; with `valid_pct`, a random split of every image
        below `path` (labelled by its folder) instead. kwargs: create_from_ll's (ds_tfms, size, bs...)."""
        il = ImageList.from_folder(path, ignore_errors=kwargs.get('ignore_errors') or False)
        src = il.split_by_folder(train, valid) if valid_pct is None else il.split_by_rand_pct(valid_pct, seed)
        return cls.create_from_ll(src.label_from_folder(classes=classes), **kwargs)

    @classmethod
    def from_csv(cls, path, folder='.', label_delim=None, csv_labels='labels.csv', valid_pct=0.2, seed=None,
                 fn_col=0, label_col=1, suffix='', delimiter=None, header='infer', **kwargs):
        """Images path/folder/<name><suffix> labelled by path/csv_labels (columns fn_col and label_col, indices or
        header names), split at random; read with the csv module (see ImageList.from_csv for `header`)."""
        if label_delim is not None:
            raise ValueError(f'from_csv: label_delim={label_delim!r} asks for multi-label data, which minifast does '
                             f'not support; give one label per image')
        il = ImageList.from_csv(path, csv_labels, cols=fn_col, folder=folder, suffix=suffix, delimiter=delimiter,
                                header=header, ignore_errors=kwargs.get('ignore_errors') or False)
        return cls.create_from_ll(il.split_by_rand_pct(valid_pct, seed).label_from_df(cols=label_col), **kwargs)

    @classmethod
    def from_name_re(cls, path, fnames, pat, valid_pct=0.2, seed=None, classes=None, **kwargs):
        """Files `fnames` labelled by the first group of `pat` searched in each path (r'/([^/]+)_\\d+.png$'),
        split at random."""
        il = ImageList(_files(path, fnames, 'from_name_re'), path)
        return cls.create_from_ll(il.split_by_rand_pct(valid_pct, seed).label_from_re(pat, classes=classes),
                                  **kwargs)

    @classmethod
    def from_name_func(cls, path, fnames, label_func, valid_pct=0.2, seed=None, classes=None, **kwargs):
        """Files `fnames` labelled by `label_func(file path)`, split at random."""
        il = ImageList(_files(path, fnames, 'from_name_func'), path)
        return cls.create_from_ll(il.split_by_rand_pct(valid_pct, seed).label_from_func(label_func, classes=classes),
                                  **kwargs)

    @classmethod
    def from_lists(cls, path, fnames, labels, valid_pct=0.2, seed=None, classes=None, **kwargs):
        """Files `fnames` with their `labels` (one each, in the same order), split at random."""
        files, labels = _files(path, fnames, 'from_lists'), list(labels)
        if len(files) != len(labels):
            raise ValueError(f'from_lists: {len(files)} files but {len(labels)} labels')
        of = {}
        for f, y in zip(files, labels):
            if of.setdefault(f, y) != y:
                raise ValueError(f'from_lists: {f} is listed twice, as {of[f]!r} and as {y!r}')
        src = ImageList(list(of), path).split_by_rand_pct(valid_pct, seed)
        lls = src.label_from_lists([of[f] for f in src.train.items], [of[f] for f in src.valid.items], classes)
        return cls.create_from_ll(lls, **kwargs)

    def input_spec(self):
        """What turns a new image into a model input here, as JSON-ready values: size [H, W], crop (short side to
        size then centre crop, else squish), resize ('pil' or 'torch': how images of another size were resized), stats [[means], [stds]] or None, classes, valid_tfms (their reprs)."""
        return {'kind': 'image', 'size': list(self.size), 'crop': self.crop, 'resize': self.resize,
                'stats': None if self.stats is None else [s.tolist() for s in self.stats],
                'classes': [str(c) for c in self.classes], 'valid_tfms': [repr(t) for t in self.valid_tfms]}

    @classmethod
    def from_spec(cls, spec, device=None, bs=64):
        """An image bunch with no images that turns new ones into model inputs as the bunch `spec` came from did
        (see input_spec): what load_learner gives its Learner. Its valid transforms must be empty."""
        h, w = spec['size']
        if spec.get('valid_tfms'):
            raise ValueError(f"from_spec: validation transforms {spec['valid_tfms']} cannot be rebuilt from names")
        empty = torch.zeros(0, 3, h, w, dtype=torch.uint8)
        no_y = torch.zeros(0, dtype=torch.long)
        data = cls(empty, no_y, empty, no_y, spec['classes'], bs=bs, device=device, device_data=False,
                   crop=spec.get('crop', False), resize=spec.get('resize', 'pil'))
        return data.normalize(spec['stats']) if spec.get('stats') is not None else data

    def add_test(self, items, ignore_errors=False, num_workers=None):
        """fastai v1's add_test: `items` (a folder, a list of image files, or of images in any form predict takes)
        become data.test_dl, decoded and resized as this data's files are, run through the validation pipeline;
        `learn.get_preds(DatasetType.Test)` then predicts them in order (their targets are 0). Returns self."""
        if isinstance(items, (str, Path)) and Path(items).is_dir():
            items = ImageList.from_folder(items).items
        elif isinstance(items, ImageList):
            items = items.items
        items = list(items)
        if not items:
            raise ValueError('add_test: no items given')
        if self.resize == 'pil' and all(isinstance(i, (str, Path)) for i in items):
            x, keep = decode_images(items, self.size, num_workers, ignore_errors, self.crop)
            items = [Path(items[k]) for k in keep]
        else:  # one at a time: other forms, or images resized as from_tensors resized (torch)
            x = torch.stack([image_uint8(i, self.size, self.crop, f'add_test (item {k})', self.resize)
                             for k, i in enumerate(items)])
        y = torch.zeros(len(x), dtype=torch.long)
        self.test_dl = TensorDataLoader(x, y, batch_size=self.valid_dl.batch_size, device=self.device,
                                        after_batch=BatchPipeline(self.valid_tfms, self))
        self.test_dl.dataset = ImageDataset(x, y, self.classes, items)
        return self

    def __repr__(self):
        x = self.train_ds.x
        return (f'ImageDataBunch(train: {len(self.train_ds)}, valid: {len(self.valid_ds)}, images '
                f'{tuple(x.shape[1:])}, {self.c} classes, bs {self.train_dl.batch_size}, device {self.device})')

    def normalize(self, stats=None):
        """Normalise batches with (mean, std) per channel; None computes them from the training images."""
        if stats is None:  # exact per-channel statistics over every training image, in chunks
            x, n = self.train_ds.x, 0
            tot, sq = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
            for i in range(0, len(x), 4096):
                c = x[i:i + 4096].double().div_(255)
                tot, sq, n = tot + c.sum((0, 2, 3)).cpu(), sq + (c * c).sum((0, 2, 3)).cpu(), n + c[:, 0].numel()
            mean = tot / n
            stats = (mean.tolist(), (sq / n - mean * mean).clamp_min(0).sqrt().tolist())
        mean, std = (torch.as_tensor(s, dtype=torch.float32).reshape(-1) for s in stats)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f'normalize: stats must be (3 means, 3 stds), got {len(mean)} and {len(std)}')
        self.stats, self._stats_on = (mean, std), {}
        return self

    def _normalize(self, x):
        if self.stats is None:
            return x
        dev = x.device
        if dev not in self._stats_on:  # move the two small tensors once per device, not once per batch
            self._stats_on[dev] = tuple(s.to(dev)[None, :, None, None] for s in self.stats)
        mean, std = self._stats_on[dev]
        return (x - mean) / std

    def denormalize(self, x):
        """Undo normalize() on a float batch: back to [0, 1] images."""
        if self.stats is None:
            return x
        mean, std = (s.to(x.device)[None, :, None, None] for s in self.stats)
        return x * std + mean

    def preprocess(self, x):
        """What validation batches go through (to float, valid transforms, normalisation), for raw uint8 images
        (N, 3, H, W), as Learner.predict uses it."""
        return self.valid_dl.after_batch((x.to(self.device), None))[0]

    def one_batch(self, train=True):
        """The first batch of the training (or validation) loader, augmented and normalised."""
        dl = self.train_dl if train else self.valid_dl
        for batch in dl:
            return batch
        # a bare StopIteration here would end an enclosing generator silently, or read as a bug in the loader
        raise ValueError(f"one_batch: the {'training' if train else 'validation'} loader has no batches "
                         f"({len(dl.dataset)} items, batch_size={dl.batch_size}, drop_last={dl.drop_last})")

    def show_batch(self, rows=3, figsize=(4, 4), train=True):
        """A Figure of rows×rows images from a batch (augmented when `train`), de-normalised, titled by class."""
        x, y = self.one_batch(train)
        n = min(rows * rows, len(x))
        fig = self.image_grid(x[:n], figsize, cols=rows)
        for ax, c in zip(fig.axes, y[:n].tolist()):
            ax.set_title(self.classes[int(c)], fontsize=8)
        fig.tight_layout()
        return fig

    def image_grid(self, x, figsize, cols=None):
        """A Figure with one axes per image of the normalised batch `x` (de-normalised, axes off), in rows of `cols`
        (default: a square grid); show_batch, plot_top_losses and show_results title them."""
        n = len(x)
        img = self.denormalize(x.float()).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        cols = cols or max(1, math.ceil(math.sqrt(n)))
        fig, _ = new_figure(figsize=figsize)
        fig.clf()
        for i in range(n):
            ax = fig.add_subplot(math.ceil(n / cols), cols, i + 1)
            ax.imshow(img[i])
            ax.axis('off')
        return fig
