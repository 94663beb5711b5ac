"""DataBunch (a train and a validation loader) and TensorDataLoader (batches by indexing in-memory tensors)."""
import enum
import math
import numbers

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..device import resolve_device
from ..distributed import shard_bounds

__all__ = ['DataBunch', 'DatasetType', 'TensorDataLoader']


class DatasetType(enum.Enum):
    """Which loader of a DataBunch (fastai v1's names): Train (shuffled, augmented), Valid, Test (added with
    `add_test`), Fix (the training set in order, without augmentation, nothing dropped), Single (one item)."""
    Train = 1
    Valid = 2
    Test = 3
    Single = 4
    Fix = 5


class TensorDataLoader:
    """Yields (x[idx], y[idx]) batches from tensors: no per-item work, no collate, no worker processes.

    The shuffle order comes from torch's global RNG, so torch.manual_seed fixes it. With `device`, each batch is
    moved there after indexing (tensors already on that device stay put); `after_batch(batch) -> batch` then runs
    on the batch's device (image loaders convert, augment and normalise there).
    """

    def __init__(self, *tensors, batch_size=64, shuffle=False, drop_last=False, device=None, after_batch=None):
        if not tensors:
            raise ValueError('TensorDataLoader needs at least one tensor')
        n = len(tensors[0])
        for i, t in enumerate(tensors[1:], 1):
            if len(t) != n:
                raise ValueError(f'TensorDataLoader: tensor 0 has {n} items but tensor {i} has {len(t)}')
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f'TensorDataLoader: batch_size must be an integer >= 1, got {batch_size!r}')
        self.tensors, self.batch_size, self.shuffle, self.drop_last = tensors, int(batch_size), shuffle, drop_last
        self.device = None if device is None else resolve_device(device)
        self.after_batch = after_batch
        self.dataset = TensorDataset(*tensors)

    def __len__(self):
        n = len(self.tensors[0])
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n, bs = len(self.tensors[0]), self.batch_size
        idx = torch.randperm(n, device=self.tensors[0].device) if self.shuffle else None
        dev, fn = self.device, self.after_batch
        for i in range(len(self)):
            if idx is None:
                b = tuple(t[i * bs:(i + 1) * bs] for t in self.tensors)
            else:
                j = idx[i * bs:(i + 1) * bs]
                b = tuple(t[j if t.device == j.device else j.to(t.device)] for t in self.tensors)
            if dev is not None:
                b = tuple(t if t.device == dev else t.to(dev, non_blocking=True) for t in b)
            yield b if fn is None else fn(b)

    def shard(self, rank, world, train=True):
        """This loader as rank `rank` of `world` sees it in distributed training (same tensors, device and
        after_batch).

        train=True: every rank draws the same permutation (torch's global RNG, synced across ranks) exactly as this
        loader does, cuts it into global batches of batch_size * world items (a partial one is dropped), and takes
        items [rank * batch_size, (rank + 1) * batch_size) of each: the ranks together see the batches of one
        process with batch_size * world. train=False: the contiguous block [rank * c, (rank + 1) * c) of the items,
        c = ceil(n / world), in batches of batch_size, with no padding and nothing dropped (a rank may get fewer
        items, or none).
        """
        return _Shard(self, rank, world, train)


class _Shard:
    """One rank's view of a TensorDataLoader (see TensorDataLoader.shard)."""

    def __init__(self, dl, rank, world, train):
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f'TensorDataLoader.shard: need 0 <= rank < world, got rank {rank!r}, world {world!r}')
        self.dl, self.rank, self.world, self.train = dl, rank, world, train
        self.tensors, self.batch_size, self.shuffle, self.device = dl.tensors, dl.batch_size, dl.shuffle, dl.device
        self.after_batch, self.dataset, self.drop_last = dl.after_batch, dl.dataset, train

    def _block(self):
        return shard_bounds(len(self.tensors[0]), self.rank, self.world)

    def __len__(self):
        n, bs = len(self.tensors[0]), self.batch_size
        if self.train:
            return n // (bs * self.world)
        start, stop = self._block()
        return math.ceil((stop - start) / bs)

    def __iter__(self):
        n, bs = len(self.tensors[0]), self.batch_size
        # drawn as the loader draws it, so that every rank's RNG advances as one process's would
        idx = torch.randperm(n, device=self.tensors[0].device) if self.shuffle else None
        if self.train:
            g, lo = bs * self.world, self.rank * bs
            parts = [(i * g + lo, i * g + lo + bs) for i in range(len(self))]
        else:  # every item once, in order (the permutation, if any, is drawn only to advance the RNG)
            idx, (start, stop) = None, self._block()
            parts = [(a, min(a + bs, stop)) for a in range(start, stop, bs)]
        dev, fn = self.device, self.after_batch
        for a, b in parts:
            if idx is None:
                batch = tuple(t[a:b] for t in self.tensors)
            else:
                j = idx[a:b]
                batch = tuple(t[j if t.device == j.device else j.to(t.device)] for t in self.tensors)
            if dev is not None:
                batch = tuple(t if t.device == dev else t.to(dev, non_blocking=True) for t in batch)
            yield batch if fn is None else fn(batch)


class DataBunch:
    """A training loader and an optional validation loader, as the Learner expects them."""

    def __init__(self, train_dl, valid_dl=None, classes=None, c=None):
        self.train_dl, self.valid_dl, self.classes, self.test_dl = train_dl, valid_dl, classes, None
        self.c = c if c is not None else len(classes) if classes is not None else None

    @property
    def test_ds(self):
        """The test set (added by add_test), or None."""
        return getattr(self.test_dl, 'dataset', None)

    @property
    def fix_dl(self):
        """The training set in order, as validation sees data: no shuffling, no augmentation, nothing dropped."""
        dl = self.train_dl
        if isinstance(dl, TensorDataLoader):
            return TensorDataLoader(*dl.tensors, batch_size=dl.batch_size, device=dl.device,
                                    after_batch=getattr(self.valid_dl, 'after_batch', None) or dl.after_batch)
        if isinstance(dl, DataLoader):
            return DataLoader(dl.dataset, batch_size=dl.batch_size, shuffle=False, drop_last=False,
                              num_workers=dl.num_workers, collate_fn=dl.collate_fn, pin_memory=dl.pin_memory)
        raise TypeError(f'DatasetType.Fix: the training loader is a {type(dl).__name__}; only TensorDataLoader and '
                        f'torch DataLoader can be replayed in order')

    def dl(self, ds_type=DatasetType.Valid):
        """The loader of `ds_type` (a DatasetType; Valid by default), with an error naming what is missing."""
        if not isinstance(ds_type, DatasetType):
            raise TypeError(f'dl: ds_type must be a DatasetType (Train, Valid, Test, Fix), got {ds_type!r}')
        if ds_type is DatasetType.Fix:
            return self.fix_dl
        dl = {DatasetType.Train: self.train_dl, DatasetType.Valid: self.valid_dl,
              DatasetType.Test: self.test_dl}.get(ds_type)
        if ds_type is DatasetType.Single:
            raise ValueError('dl: DatasetType.Single has no loader; use learn.predict(item) for one item')
        if dl is None:
            how = {DatasetType.Valid: 'this data has no validation set',
                   DatasetType.Test: 'no test set was added: call data.add_test(items) first'}[ds_type]
            raise ValueError(f'dl({ds_type}): {how}')
        return dl

    @property
    def train_ds(self):
        """The training dataset (the loader's `dataset`)."""
        return getattr(self.train_dl, 'dataset', None)

    @property
    def valid_ds(self):
        """The validation dataset, or None."""
        return getattr(self.valid_dl, 'dataset', None)

    @classmethod
    def from_tensors(cls, x_train, y_train, x_valid=None, y_valid=None, bs=64, val_bs=None, shuffle=True,
                     drop_last=True, classes=None):
        """Loaders over in-memory tensors; training batches are shuffled and the last partial one dropped."""
        for name, x, y in (('train', x_train, y_train), ('valid', x_valid, y_valid)):
            if (x is None) != (y is None):
                raise ValueError(f'DataBunch.from_tensors: x_{name} and y_{name} must be given together')
            if x is not None and len(x) != len(y):
                raise ValueError(f'DataBunch.from_tensors: x_{name} has {len(x)} items but y_{name} has {len(y)}')
        train = TensorDataLoader(x_train, y_train, batch_size=bs, shuffle=shuffle, drop_last=drop_last)
        valid = None if x_valid is None else TensorDataLoader(x_valid, y_valid,
                                                               batch_size=bs if val_bs is None else val_bs)
        c = None
        if classes is None and not y_train.is_floating_point() and y_train.ndim == 1:
            c = int(max(y_train.max(), y_valid.max() if y_valid is not None and len(y_valid) else 0)) + 1
        db = cls(train, valid, classes=classes, c=c)
        db.c_inferred = c is not None  # guessed from the largest label: a class may be absent from the data
        return db

    def input_spec(self):
        """What this data's model inputs and targets are, as JSON-ready values (what learn.export records): kind
        'tensor', classes, c, and the per-item shape and dtype of each input and of the target."""
        for dl in (self.train_dl, self.valid_dl):
            ts = getattr(dl, 'tensors', None)
            if ts is not None:
                items = [(t.shape[1:], t.dtype) for t in ts]
                break
            ds = getattr(dl, 'dataset', None)
            if ds is not None and hasattr(ds, '__len__') and len(ds):
                items = [(torch.as_tensor(t).shape, torch.as_tensor(t).dtype) for t in ds[0]]
                break
        else:
            raise ValueError(f'input_spec: neither loader of this {type(self).__name__} holds tensors or a '
                             f'non-empty dataset, so the shape of its items is unknown')
        if len(items) < 2:
            raise ValueError(f'input_spec: items of {len(items)} tensor(s); expected inputs and a target')
        spec = [{'shape': list(shape), 'dtype': str(dtype).replace('torch.', '')} for shape, dtype in items]
        keep = lambda c: c if isinstance(c, (str, int, float, bool)) else str(c)  # noqa: E731
        return {'kind': 'tensor', 'classes': None if self.classes is None else [keep(c) for c in self.classes],
                'c': self.c, 'inputs': spec[:-1], 'target': spec[-1]}

    @classmethod
    def from_spec(cls, spec, device=None, bs=64):
        """A DataBunch with no items whose (empty) loaders have the inputs and targets `spec` describes (see
        input_spec): what load_learner gives its Learner for tensor data."""
        if not isinstance(spec, dict) or spec.get('kind') != 'tensor':
            raise ValueError(f"DataBunch.from_spec: expected a spec of kind 'tensor', got {spec!r:.80}")

        def empty(s, what):
            shape, dtype = s.get('shape'), getattr(torch, str(s.get('dtype')), None)
            if not isinstance(dtype, torch.dtype) or not isinstance(shape, list) or \
                    not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
                raise ValueError(f'DataBunch.from_spec: {what} must have a shape (a list of sizes) and a torch '
                                 f'dtype name, got {s!r:.80}')
            return torch.zeros(0, *shape, dtype=dtype)

        ts = [empty(s, f'input {i}') for i, s in enumerate(spec['inputs'])] + [empty(spec['target'], 'target')]
        dev = None if device is None else resolve_device(device)
        return cls(TensorDataLoader(*ts, batch_size=bs, shuffle=True, drop_last=True, device=dev),
                   TensorDataLoader(*ts, batch_size=bs, device=dev), classes=spec.get('classes'), c=spec.get('c'))

    def __repr__(self):
        n = lambda dl: len(dl.dataset) if getattr(dl, 'dataset', None) is not None else '?'  # noqa: E731
        return (f'DataBunch(train: {n(self.train_dl)} items, valid: '
                f'{n(self.valid_dl) if self.valid_dl is not None else "none"}, c={self.c})')
