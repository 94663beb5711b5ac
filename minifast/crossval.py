"""k-fold cross-validation (seed 003): stratified folds of a DataBunch's training set, one fair run per fold (same
initial weights, same seeding), and the per-fold and mean +- sd values of every loss and metric."""
import math
import numbers
import time
import warnings

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator
from torch.utils.data import DataLoader, RandomSampler, Subset

from .callbacks.recorder import new_figure
from .data.core import DataBunch, TensorDataLoader
from .data.images import ImageDataBunch
from .determinism import set_seed
from .grid import (POLICIES, config_name, diagnose, fit_run, fresh_learner, initial_weights, mean_sd, plain,
                   record_problem, run_record, split_config)

__all__ = ['kfold_indices', 'fold_data', 'kfold_data', 'cross_validate', 'CVResult']

STRATIFY = (True, False, 'auto')


def _labels_or_n(y_or_n):
    """(labels as a 1-D numpy array or None, n)."""
    if isinstance(y_or_n, numbers.Integral) and not isinstance(y_or_n, bool):
        return None, int(y_or_n)
    y = y_or_n.detach().cpu().numpy() if isinstance(y_or_n, torch.Tensor) else np.asarray(y_or_n)
    if y.ndim == 0:
        raise ValueError(f'kfold_indices: expected labels (one per item) or a number of items, got {y_or_n!r:.60}')
    return y, len(y)


def _class_name(v, classes):
    try:
        return f'class {v!r} ({classes[int(v)]!r})' if classes is not None else f'class {v!r}'
    except (IndexError, TypeError, ValueError):
        return f'class {v!r}'


def _stratified(y, stratify, k, classes):
    """Whether to stratify by `y`, checking that every class can be spread over the k folds."""
    if stratify not in STRATIFY:
        raise ValueError(f"kfold_indices: stratify must be True, False or 'auto', got {stratify!r}")
    if y is None:
        if stratify is True:
            raise ValueError('kfold_indices: stratify=True needs the labels, not a number of items')
        return False
    # 'auto': integer (or bool) class labels are stratified; float targets (regression) are not
    if stratify is False or (stratify == 'auto' and not (y.ndim == 1 and (y.dtype.kind in 'iub'))):
        return False
    if y.ndim != 1:
        raise ValueError(f'kfold_indices: stratify=True needs one label per item (1-D), got shape {y.shape}')
    values, counts = np.unique(y, return_counts=True)
    small = int(np.argmin(counts))
    if counts[small] < k:
        what = (f'{_class_name(values[small].item(), classes)} has {counts[small]} item(s), fewer than the '
                f'k={k} folds')
        if stratify is True:
            raise ValueError(f'kfold_indices: {what}, so it cannot be in every fold: lower k to at most '
                             f'{counts[small]}, or use stratify=False')
        warnings.warn(f"kfold_indices (stratify='auto'): {what}; it is spread over {counts[small]} fold(s) and "
                      f'missing from the others (lower k, or stratify=False, to silence this)')
    return True


def kfold_indices(y_or_n, k=5, stratify='auto', seed=0, classes=None):
    """k (train_idx, valid_idx) pairs of sorted LongTensors: valid_idx partitions 0..n-1 into k folds of sizes
    differing by at most 1, train_idx is the rest.

    y_or_n: the labels (one per item: a tensor, array or list) or the number of items n.
    stratify: True spreads every class over the folds as evenly as possible (its count per fold differs by at most
        1; an error when a class has fewer than k items); 'auto' stratifies integer class labels (1-D, integer or bool
        dtype) and not float targets (regression) or a bare n, and only warns about a class smaller than k.
    seed: the folds are a function of the labels, k and seed alone (a private generator: torch's global RNG is
        neither used nor advanced); another seed gives other folds.
    classes: the names of the label values, for error messages.
    """
    y, n = _labels_or_n(y_or_n)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 2:
        raise ValueError(f'kfold_indices: k must be an integer >= 2 (the number of folds), got {k!r}')
    if k > n:
        raise ValueError(f'kfold_indices: k={k} folds of {n} items would leave a fold empty; lower k to at most {n}')
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f'kfold_indices: seed must be an integer, got {seed!r}')
    g = torch.Generator().manual_seed(int(seed))
    if _stratified(y, stratify, int(k), classes):
        _, inv = np.unique(y, return_inverse=True)
        blocks = [torch.from_numpy(np.flatnonzero(inv == c)) for c in range(int(inv.max()) + 1)]
        order = torch.cat([b[torch.randperm(len(b), generator=g)] for b in blocks])
    else:
        order = torch.randperm(n, generator=g)
    # the items in `order` are dealt to the folds in turn: any run of consecutive items (one class's block, or all
    # n) lands in the k folds as evenly as possible, which gives both the size and the per-class guarantees
    fold = torch.empty(n, dtype=torch.long)
    fold[order] = torch.arange(n) % k
    out = []
    for i in range(k):
        mask = fold == i
        out.append((torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()))
    return out


def _targets(data):
    """The training set's targets of `data` (what the folds are stratified by)."""
    dl = data.train_dl
    if isinstance(data, ImageDataBunch):
        return data.train_ds.y
    if isinstance(dl, TensorDataLoader):
        return dl.tensors[-1]
    if isinstance(dl, DataLoader):
        ds = dl.dataset
        y = getattr(ds, 'targets', None)
        if y is None:  # any map-style dataset of (input, target) items
            y = [ds[i][-1] for i in range(len(ds))]
            y = torch.stack([torch.as_tensor(t) for t in y]) if y else torch.zeros(0)
        return y
    raise TypeError(f'cross-validation: the training loader is a {type(dl).__name__}; folds are drawn from a '
                    f'TensorDataLoader (DataBunch.from_tensors, ImageDataBunch) or a torch DataLoader over a dataset')


def _take(t, idx):
    return t[idx.to(t.device)]


def fold_data(data, train_idx, valid_idx):
    """A DataBunch built like `data` whose training set is data's training items at `train_idx` and whose
    validation set is data's training items at `valid_idx` (data's own validation set is not used: it stays a
    held-out test of the final model).

    Built as `data` is: the same batch sizes, shuffle, drop_last and device; the training part gets the training
    loader's after_batch (augmentation), the validation part the validation loader's (the training loader's when
    `data` has none); classes, c and input_spec are data's. An ImageDataBunch keeps its transforms, crop/resize,
    item files and normalisation stats (those of data's whole training set); uint8 images stay where they are (CPU
    or GPU). A test set (add_test) is not carried over."""
    train_idx, valid_idx = (torch.as_tensor(i, dtype=torch.long).flatten().cpu() for i in (train_idx, valid_idx))
    tdl, vdl = data.train_dl, data.valid_dl
    if isinstance(data, ImageDataBunch):
        ds = data.train_ds
        items = (lambda idx: None if ds.items is None else [ds.items[i] for i in idx.tolist()])  # noqa: E731
        out = ImageDataBunch(_take(ds.x, train_idx), _take(ds.y, train_idx), _take(ds.x, valid_idx),
                             _take(ds.y, valid_idx), data.classes, bs=tdl.batch_size, val_bs=vdl.batch_size,
                             train_tfms=data.train_tfms, valid_tfms=data.valid_tfms, device=data.device,
                             path=data.path, train_items=items(train_idx), valid_items=items(valid_idx),
                             drop_last=tdl.drop_last, device_data=False, crop=data.crop, resize=data.resize)
        if data.stats is not None:
            out.normalize(data.stats)
        out.train_dl.shuffle = tdl.shuffle
    elif isinstance(tdl, TensorDataLoader):
        valid_after = vdl.after_batch if isinstance(vdl, TensorDataLoader) else tdl.after_batch
        train = TensorDataLoader(*(_take(t, train_idx) for t in tdl.tensors), batch_size=tdl.batch_size,
                                 shuffle=tdl.shuffle, drop_last=tdl.drop_last, device=tdl.device,
                                 after_batch=tdl.after_batch)
        valid = TensorDataLoader(*(_take(t, valid_idx) for t in tdl.tensors),
                                 batch_size=vdl.batch_size if vdl is not None else tdl.batch_size,
                                 device=vdl.device if isinstance(vdl, TensorDataLoader) else tdl.device,
                                 after_batch=valid_after)
        out = DataBunch(train, valid, classes=data.classes, c=data.c)
    elif isinstance(tdl, DataLoader):
        def loader(idx, like, shuffle, drop_last):
            return DataLoader(Subset(tdl.dataset, idx.tolist()), batch_size=like.batch_size, shuffle=shuffle,
                              drop_last=drop_last, num_workers=like.num_workers, collate_fn=like.collate_fn,
                              pin_memory=like.pin_memory)
        like = vdl if isinstance(vdl, DataLoader) else tdl
        out = DataBunch(loader(train_idx, tdl, isinstance(tdl.sampler, RandomSampler), tdl.drop_last),
                        loader(valid_idx, like, False, False), classes=data.classes, c=data.c)
    else:
        raise TypeError(f'fold_data: the training loader is a {type(tdl).__name__}; folds are built from a '
                        f'TensorDataLoader (DataBunch.from_tensors, ImageDataBunch) or a torch DataLoader')
    if hasattr(data, 'c_inferred'):
        out.c_inferred = data.c_inferred
    return out


def kfold_data(data, k=5, stratify='auto', seed=0):
    """The k fold DataBunches of `data` (see fold_data and kfold_indices): fold i validates on the i-th fold of
    data's training set and trains on the others; data's own validation set is left out (a held-out test of the
    final model). All k are built at once (k copies of the training set: cross_validate builds one at a time)."""
    return [fold_data(data, tr, va) for tr, va in _folds(data, k, stratify, seed)]


def _folds(data, k, stratify, seed):
    return kfold_indices(_targets(data), k, stratify, seed, classes=getattr(data, 'classes', None))


def cross_validate(make_learner, data, k=5, config=None, epochs=2, max_lr=1e-2, seed=0, policy='one_cycle',
                   stratify='auto', monitor='valid_loss', silent=None, on_fold=None, init=None):
    """k-fold cross-validation of `config`: for each fold i of data's training set (see kfold_indices: stratified
    for class labels, drawn with `seed`), learn = make_learner(data=<fold i's DataBunch>, **config's learner keys),
    trained with the config's fit keys (grid_search's split: FIT_KEYS go to the fit; `epochs`, `max_lr` and
    `policy` are the defaults). data's own validation set is not used (it stays a held-out test of the final model).

    Fair: every fold starts from the same weights, those of make_learner on fold 0 after set_seed(seed) (or `init`,
    a state dict, e.g. shared by the trials of a search), and set_seed(seed) runs before each fit. A fold that
    diverges is recorded with status 'diverged' and the next fold goes on. `on_fold(i, record)` is called after each
    fold (an exception it raises stops the cross-validation). Returns a CVResult (its `.record()` is one run record
    of the config scored by the mean over folds)."""
    if policy not in POLICIES:
        raise ValueError(f'cross_validate: policy must be one of {POLICIES}, got {policy!r}')
    config = dict(config or {})
    pol, n_ep, fit, made = split_config(config, policy, epochs)
    folds = _folds(data, k, stratify, seed)
    records = []
    for i, (tr, va) in enumerate(folds):
        fd = fold_data(data, tr, va)
        make = (lambda fd: lambda **kw: make_learner(data=fd, **kw))(fd)
        if init is None:
            init = initial_weights(make, config, seed)
        learn = fresh_learner(make, made, init, seed, silent)
        if not learn.silent:  # the epoch table that follows belongs to this fold
            print(f'cross-validation fold {i + 1}/{k}: {config_name(config)}, seed {seed}', flush=True)
        set_seed(seed)
        t0 = time.perf_counter()
        status = fit_run(learn, pol, n_ep, dict(fit), max_lr)
        rec = run_record(learn, config, seed, status, time.perf_counter() - t0, name=f'{config_name(config)} '
                         f'fold {i}')
        rec['fold'] = i
        records.append(rec)
        del learn, fd  # one fold's data and model alive at a time
        if on_fold is not None:
            on_fold(i, rec)
    return CVResult(records, config=config, seed=seed, monitor=monitor)


def _finite(v):
    return isinstance(v, numbers.Number) and not isinstance(v, bool) and math.isfinite(v)


class CVResult:
    """The k fold records of a cross-validation (`folds`, run records with 'fold': i), with `mean` and `sd`
    ({name: value} of train_loss, valid_loss and every metric over the folds, sd the sample sd), a table, a plot and
    `record()` (one run record of the config, scored by the means).

    The mean and sd are over the folds that finished (status 'done') with a finite value; a diverged fold is left
    out of them (and makes `status` and record()'s status 'diverged', so a GridResult never ranks the config on the
    folds that survived); when no fold finished they are over every fold's finite final values. mean is None
    without any value, sd None with fewer than two."""

    def __init__(self, folds, config=None, seed=0, monitor='valid_loss'):
        self.folds, self.config, self.seed, self.monitor = list(folds), dict(config or {}), seed, monitor

    @property
    def names(self):
        """train_loss, valid_loss and the metrics, in the records' order."""
        return list(dict.fromkeys(n for r in self.folds for n in r['final']))

    def _counted(self):
        done = [r for r in self.folds if r['status'] == 'done']
        return done or self.folds

    def _stats(self):
        return {n: mean_sd([r['final'][n] for r in self._counted() if _finite(r['final'].get(n))])
                for n in self.names}

    @property
    def mean(self):
        """{name: mean over the folds} (see the class docstring for diverged folds)."""
        return {n: m for n, (m, _) in self._stats().items()}

    @property
    def sd(self):
        """{name: sample sd over the folds} (None with fewer than two folds counted)."""
        return {n: s for n, (_, s) in self._stats().items()}

    @property
    def score(self):
        """The mean of `monitor` over the folds (what a search ranks the config by)."""
        return self.mean.get(self.monitor)

    @property
    def status(self):
        """'done' when every fold finished, else 'diverged'."""
        return 'done' if self.folds and all(r['status'] == 'done' for r in self.folds) else 'diverged'

    def epoch_means(self):
        """Per epoch, {'epoch': e, name: mean over the counted folds that have a finite value there}."""
        runs = self._counted()
        out = []
        for e in range(max((len(r['epochs']) for r in runs), default=0)):
            rows = [r['epochs'][e] for r in runs if e < len(r['epochs'])]
            keys = dict.fromkeys(k for row in rows for k in row if k != 'epoch')
            out.append({'epoch': e, **{k: mean_sd([row[k] for row in rows if _finite(row.get(k))])[0]
                                       for k in keys}})
        return out

    def record(self, name=None):
        """One run record (grid.run_record's format, so a GridResult can hold it): 'final' the means, 'sd' the sds,
        'folds' the per-fold finals, 'k', 'epochs' the per-epoch means over the folds, 'seconds' the total, the
        verdict of the mean validation curve, 'decay' that of fold 0, and status 'done' only if every fold
        finished."""
        epochs = self.epoch_means()
        word, why = diagnose([row.get('valid_loss') for row in epochs])
        rec = plain({'name': name or config_name(self.config), 'config': self.config, 'seed': self.seed,
                     'status': self.status, 'seconds': sum(r['seconds'] for r in self.folds), 'final': self.mean,
                     'sd': self.sd, 'k': len(self.folds), 'folds': [r['final'] for r in self.folds],
                     'fold_status': [r['status'] for r in self.folds], 'verdict': word,
                     'diagnosis': f'mean of {len(self.folds)} folds: {why}', 'epochs': epochs,
                     'decay': self.folds[0].get('decay') if self.folds else None})
        why = record_problem(rec)  # what GridResult and the search rely on
        if why is not None:
            raise RuntimeError(f'CVResult.record: the combined record is not a run record ({why})')
        return rec

    def table(self):
        """One row per fold (its final values, time and status), then the mean and sd rows."""
        if not self.folds:
            return '(no folds)'
        names = self.names
        rows = [[str(r.get('fold', i)), *[r['final'].get(n) for n in names], r['seconds'], r['status']]
                for i, r in enumerate(self.folds)]
        mean, sd = self.mean, self.sd
        rows.append(['mean', *[mean[n] for n in names], sum(r['seconds'] for r in self.folds), self.status])
        rows.append(['sd', *[sd[n] for n in names], None, ''])
        cols = ['fold', *names, 'seconds', 'status']

        def cell(v, c):
            return '' if v is None else f'{v:.1f}' if c == 'seconds' else f'{v:.4f}' if isinstance(v, float) \
                else str(v)
        text = [[cell(v, c) for v, c in zip(r, cols)] for r in rows]
        width = [max(len(c), *(len(t[j]) for t in text)) for j, c in enumerate(cols)]
        lines = ['  '.join(c.ljust(w) for c, w in zip(cols, width))]
        lines += ['  '.join(v.ljust(w) for v, w in zip(t, width)) for t in text]
        return '\n'.join(line.rstrip() for line in lines)

    def __repr__(self):
        return self.table()

    def plot(self, metric='valid_loss', ax=None, title=None):
        """`metric` per epoch: one thin line per fold and the mean over folds (thick, black). Returns the Figure."""
        fig, (ax,) = new_figure(ax, figsize=(7, 4.5))
        for i, r in enumerate(self.folds):
            pts = [(e['epoch'], e[metric]) for e in r['epochs'] if _finite(e.get(metric))]
            if pts:
                ax.plot(*zip(*pts), marker='.', alpha=0.6, color=f'C{i % 10}',
                        label=f"fold {r.get('fold', i)}" + (f" ({r['status']})" if r['status'] != 'done' else ''))
        pts = [(e['epoch'], e[metric]) for e in self.epoch_means() if _finite(e.get(metric))]
        if pts:
            ax.plot(*zip(*pts), marker='o', color='black', linewidth=2.5, label='mean')
        m, s = self.mean.get(metric), self.sd.get(metric)
        ax.set_xlabel('Epoch')
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        summary = '' if m is None else f': final mean {m:.4f}' + ('' if s is None else f' +- {s:.4f}')
        ax.set_title(title or f'{metric} per epoch, {len(self.folds)} folds{summary}')
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        return fig
