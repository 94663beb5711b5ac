"""Input checks that fail early with messages naming the thing that is wrong."""
import functools
import math
import operator
import os
import sys
from numbers import Real

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ['check_data', 'check_learner_args', 'check_learner_options', 'check_metrics', 'check_epochs', 'check_wd',
           'check_fit', 'check_batch', 'check_finite_inputs', 'metric_name', 'is_torchmetric', 'int_value',
           'int_at_least', 'real_value', 'LAYER_DECAY_RULES']


def check_data(data):
    """`data` must have a `train_dl` (and may have `valid_dl`, possibly None)."""
    if not hasattr(data, 'train_dl'):
        raise TypeError(f'Learner: data must have a `train_dl` attribute (and `valid_dl`, which may be None); got '
                        f'{type(data).__name__}. Wrap your loaders with DataBunch(train_dl, valid_dl) or use '
                        f'DataBunch.from_tensors(x_train, y_train, x_valid, y_valid).')
    if not hasattr(data, 'valid_dl'):
        raise TypeError(f'Learner: data ({type(data).__name__}) has `train_dl` but no `valid_dl`; set valid_dl=None '
                        f'when there is no validation set.')


def check_learner_args(model, loss_func, opt_func):
    """Learner's model, loss_func and opt_func have the right kinds, so a mistake fails here, not at the first batch."""
    if not isinstance(model, nn.Module):
        raise TypeError(f'Learner: model must be a torch.nn.Module, got {type(model).__name__} {model!r:.60}')
    if loss_func is not None and not callable(loss_func):
        raise TypeError(f'Learner: loss_func must be a function (pred, target) -> loss such as F.cross_entropy, got '
                        f'{type(loss_func).__name__} {loss_func!r:.60}')
    if isinstance(opt_func, torch.optim.Optimizer) or not callable(opt_func):
        raise TypeError(f'Learner: opt_func must be a function or class (params, lr) -> optimizer, such as AdamW or '
                        f'partial(torch.optim.SGD, momentum=0.9), not {type(opt_func).__name__} {opt_func!r:.60}; '
                        f'the Learner builds the optimizer itself')



# how layer_decay spreads the lr (optim.layer_decay_lrs): 'timm' counts the head as the top layer, 'zoobot' (seed 000)
# puts the head and the highest body block both at the full lr
LAYER_DECAY_RULES = ('timm', 'zoobot')


def check_learner_options(path, model_dir, layer_groups, splitter, layer_decay, layer_decay_rule='timm', head_wd=None):
    """Learner's path and model_dir are folder names; layer_groups (or a splitter, not both), layer_decay and its rule,
    and head_wd have the right kinds."""
    for name, v in (('path', path), ('model_dir', model_dir)):
        if not (isinstance(v, (str, os.PathLike)) or (name == 'path' and v is None)):
            raise TypeError(f'Learner: {name} must be a folder (a str or Path), got {v!r}')
    if layer_groups is not None and splitter is not None:
        raise ValueError('Learner: give layer_groups or splitter, not both')
    if layer_groups is not None and not isinstance(layer_groups, (list, tuple, nn.ModuleList)):
        raise TypeError(f'Learner: layer_groups must be a list of layer groups (modules or lists of modules), '
                        f'got {layer_groups!r}')
    if layer_decay is not None and not (isinstance(layer_decay, (int, float)) and 0 <= layer_decay <= 1):
        raise ValueError(f'Learner: layer_decay must be a number in [0, 1], got {layer_decay!r}')
    if layer_decay_rule not in LAYER_DECAY_RULES:
        raise ValueError(f"Learner: layer_decay_rule must be 'timm' (the head counts as the top layer: the block below "
                         f"it gets lr * layer_decay) or 'zoobot' (seed 000: the head and the highest body block both "
                         f"at the full lr), got {layer_decay_rule!r}")
    if head_wd is not None:
        real_value(head_wd, 'head_wd', 'Learner', low=0,
                   message=f'Learner: head_wd must be a finite number >= 0 (the head\'s fixed weight decay) or None '
                           f'(as wd), got {head_wd!r}')


def metric_name(m):
    """The column name of a metric: its `__name__` (a function's name, through partials; one set on a torchmetrics
    object), else its class name (a torchmetrics.Metric: e.g. MulticlassF1Score)."""
    while isinstance(m, functools.partial):
        m = m.func
    return getattr(m, '__name__', type(m).__name__)


def is_torchmetric(m):
    """Whether `m` is a torchmetrics.Metric, found without importing torchmetrics (an optional extra): an instance
    exists only once torchmetrics is imported."""
    tm = sys.modules.get('torchmetrics')
    return tm is not None and isinstance(m, tm.Metric)


def check_metrics(metrics):
    """A list of callables (functions (pred, target) -> 0-d tensor, or torchmetrics.Metric objects); a single one is
    wrapped."""
    if metrics is None:
        return []
    ms = list(metrics) if isinstance(metrics, (list, tuple)) else [metrics]
    tm = sys.modules.get('torchmetrics')
    for i, m in enumerate(ms):
        if tm is not None and isinstance(m, tm.MetricCollection):  # one column per metric: compute() gives a dict
            raise TypeError(f'metrics[{i}] is a torchmetrics.MetricCollection ({", ".join(m.keys())}): pass its '
                            f'metrics as a list instead, e.g. metrics=list(collection.values())')
        if not callable(m):
            raise TypeError(f'metrics[{i}] is {m!r} ({type(m).__name__}), which is not callable: a metric is a '
                            f'function (pred, target) -> tensor, such as minifast.accuracy, or a torchmetrics.Metric')
    return ms


def int_value(v):
    """`v` as an int when it is an integer (an int, a numpy integer, an integer 0-d tensor), else None (also for a
    bool, a float or a string)."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def int_at_least(v, name, where, low=1):
    """`v` as an int when it is an integer >= `low` (see `int_value`), else
    ValueError('{where}: {name} must be an integer >= {low}, got {v!r}')."""
    n = int_value(v)
    if n is None or n < low:
        raise ValueError(f'{where}: {name} must be an integer >= {low}, got {v!r}')
    return n


def real_value(v, name, where, low=None, high=None, low_open=False, high_open=False, message=None, coerce=False):
    """`v` as a float when it is a finite real number in [low, high], else a ValueError.

    An end given as None is unbounded; `low_open` / `high_open` leave that end out ((low, high]...). A real number is
    a numbers.Real other than a bool (an int, a float, a numpy number); with `coerce`, anything float() takes
    except a bool or a string (also a 0-d tensor or array). The error names the first test that fails:
    '{where}: {name} must be a finite number, got {v!r}', then '... must be >= {low:g}, got {v!r}' (> when
    low_open), then '... must be <= {high:g}, got {v!r}' (< when high_open); `message`, when given, is the whole
    text of the error whichever test fails.
    """
    if coerce:
        try:
            x = None if isinstance(v, (bool, str)) else float(v)
        except (TypeError, ValueError):
            x = None
    else:
        x = v if isinstance(v, Real) and not isinstance(v, bool) else None
    if x is None or not math.isfinite(x):
        bad = 'must be a finite number'
    elif low is not None and (x <= low if low_open else x < low):
        bad = f'must be {">" if low_open else ">="} {low:g}'
    elif high is not None and (x >= high if high_open else x > high):
        bad = f'must be {"<" if high_open else "<="} {high:g}'
    else:
        return float(x)
    raise ValueError(f'{where}: {name} {bad}, got {v!r}' if message is None else message)


def check_epochs(epochs, name='epochs'):
    """`epochs` as an int; ValueError unless it is a non-negative integer (not a float, string or bool)."""
    n = int_value(epochs)
    if n is None or n < 0:
        raise ValueError(f'fit: {name} must be a non-negative integer, got {epochs!r}')
    return n


def check_wd(wd, where):
    """`wd` (a weight decay: a number, or one per layer group) must hold finite numbers >= 0; returns it."""
    message = f'{where}: wd must be a finite number >= 0 (or one per layer group), got {wd!r}'
    for v in (wd if isinstance(wd, (list, tuple, np.ndarray)) else [wd]):
        real_value(v, 'wd', where, low=0, message=message)
    return wd


def check_fit(learn, epochs, labels=True):
    """Arguments of fit and the data, before any batch runs; returns epochs as an int.

    Rejects an empty training or validation loader and, for class-index losses, in-memory labels that are floats
    or lie outside [0, data.c) (unless `labels=False`: the fit_* policies check the rest first, fit then scans the
    labels once).
    """
    n = check_epochs(epochs)
    dl = learn.data.train_dl
    if dl is None:
        raise ValueError('fit: data.train_dl is None; there is nothing to train on')
    _check_not_empty(dl, 'training')
    valid_dl = getattr(learn.data, 'valid_dl', None)
    if valid_dl is not None:
        _check_not_empty(valid_dl, 'validation')
    if labels and _is_class_loss(learn.loss_func):
        for split, d in (('train', dl), ('valid', valid_dl)):
            y = _labels_in_memory(d)
            if y is not None:
                _check_labels(learn, y, split, getattr(d, 'batch_size', None))
    return n


def _check_not_empty(dl, which):
    """ValueError when `dl` has a length of 0, saying why (no items, or drop_last with less than a batch)."""
    try:
        n_batches = len(dl)
    except TypeError:
        return
    if n_batches > 0:
        return
    ds = getattr(dl, 'dataset', None)
    nds = len(ds) if ds is not None and hasattr(ds, '__len__') else '?'
    bs, drop = getattr(dl, 'batch_size', '?'), getattr(dl, 'drop_last', '?')
    msg = f'fit: the {which} DataLoader is empty (0 batches from {nds} items with batch_size={bs}, drop_last={drop})'
    if drop is True and isinstance(nds, int) and nds > 0:
        msg += (f': drop_last=True with {nds} items and batch_size={bs} gives no batches: lower bs or set '
                f'drop_last=False')
    raise ValueError(msg)


def _labels_in_memory(dl):
    """The label tensor (the last tensor) of a loader over in-memory tensors, else None."""
    if dl is None:
        return None
    ts = getattr(dl, 'tensors', None)
    if ts is None and isinstance(getattr(dl, 'dataset', None), TensorDataset):
        ts = dl.dataset.tensors
    if not isinstance(ts, (tuple, list)) or len(ts) < 2 or not isinstance(ts[-1], torch.Tensor):
        return None
    return ts[-1]


def _loss_name(loss_func):
    return getattr(loss_func, '__name__', type(loss_func).__name__)


def _check_labels(learn, y, split, bs):
    """Every label of a split at once: integer class indices in [0, data.c), ignore_index aside."""
    name = _loss_name(learn.loss_func)
    if y.is_floating_point():
        if y.ndim == 1:  # probabilities would be (N, n_classes): 1-D floats are class labels of the wrong dtype
            b = min(bs, len(y)) if isinstance(bs, int) else len(y)
            raise TypeError(f'{name} expects integer class targets (torch.int64) of shape ({b},), or float '
                            f'probabilities of shape ({b}, n_classes); got {y.dtype} targets of shape ({b},) '
                            f'({split} labels: {y.dtype}, shape {tuple(y.shape)}). Convert class labels with '
                            f'y.long().')
        return
    if y.dtype == torch.bool or y.is_complex() or y.numel() == 0:
        return
    c = getattr(learn.data, 'c', None)
    c = c if isinstance(c, int) and not isinstance(c, bool) and c > 0 else None
    ignore = getattr(learn.loss_func, 'ignore_index', -100)
    ignore = ignore if isinstance(ignore, int) else None
    keep = y != ignore if ignore is not None else torch.ones_like(y, dtype=torch.bool)
    if not bool(keep.any()):
        return
    big = torch.iinfo(y.dtype).max
    lo, hi = torch.stack([y.masked_fill(~keep, big).min(), y.masked_fill(~keep, 0).max()]).tolist()
    if lo >= 0 and (c is None or hi < c):
        return
    bad = keep & ((y < 0) | (y >= c)) if c is not None else keep & (y < 0)
    n_bad = int(bad.sum())
    ends = ([f'smallest {lo}'] if lo < 0 else []) + ([f'largest {hi}'] if c is not None and hi >= c else [])
    first = lo if lo < 0 else hi
    ign = f' (ignore_index {ignore} is skipped)' if ignore is not None else ''
    if c is None:
        raise ValueError(f'{split} labels: {n_bad} of {y.numel()} are negative ({", ".join(ends)}): target value '
                         f'{first} is out of range; {name} needs class indices >= 0{ign}')
    raise ValueError(f'{split} labels: {n_bad} of {y.numel()} are outside [0, {c}) ({", ".join(ends)}): target '
                     f'value {first} is out of range for {c} classes (data.c); {name} needs class indices '
                     f'0..{c - 1}{ign}. Fix the labels, or data.c if the data has more classes')


def _is_class_loss(loss_func):
    return (loss_func in (F.cross_entropy, F.nll_loss)
            or isinstance(loss_func, (nn.CrossEntropyLoss, nn.NLLLoss)))


def check_batch(learn):
    """Targets of the first batch against the model's output, for class-index losses (cross-entropy, NLL)."""
    if not _is_class_loss(learn.loss_func):
        return
    pred, y = learn.pred, learn.yb
    if not isinstance(pred, torch.Tensor) or not isinstance(y, torch.Tensor):
        return
    name = _loss_name(learn.loss_func)
    if y.is_floating_point():
        if y.shape == pred.shape:
            return  # class probabilities: cross-entropy accepts them
        raise TypeError(f'{name} expects integer class targets (torch.int64) of shape {tuple(pred.shape[:1])}, or '
                        f'float probabilities of shape {tuple(pred.shape)}; got {y.dtype} targets of shape '
                        f'{tuple(y.shape)}. Convert class labels with y.long().')
    if pred.ndim < 2 or y.numel() == 0:
        return
    c = pred.shape[1]
    ignore = getattr(learn.loss_func, 'ignore_index', -100)
    keep = y != ignore
    # min and max of the non-ignored targets in one host sync, on the first batch of each pass only
    lo, hi = torch.stack([y.masked_fill(~keep, c - 1).min(), y.masked_fill(~keep, 0).max()]).tolist()
    if hi >= c or lo < 0:
        bad = hi if hi >= c else lo
        raise ValueError(f'target value {bad} is out of range for a model with {c} outputs (valid targets are '
                         f'0..{c - 1}): check the number of classes in the data against the final layer of the model')
    n_classes = getattr(learn.data, 'c', None)
    # from_tensors infers c from the largest label, so a non-negative ignore_index (255) can inflate it: skip that
    inferred_from_ignore = (getattr(learn.data, 'classes', None) is None and isinstance(ignore, int)
                            and n_classes == ignore + 1)
    # a count guessed from the largest label (from_tensors without classes) only bounds the classes from below
    guessed_wider = getattr(learn.data, 'c_inferred', False) and c > n_classes
    if (isinstance(n_classes, int) and not isinstance(n_classes, bool) and n_classes > 0 and c != n_classes
            and not inferred_from_ignore and not guessed_wider):
        raise ValueError(f'the model outputs {c} values per item but the data has {n_classes} classes (data.c): make '
                         f'the final layer output {n_classes} values, or pass classes= (or c=) to the DataBunch if the '
                         f'data has {c} classes and some are missing from the labels')


def check_finite_inputs(xb, epoch, it):
    """ValueError when a floating-point input of the batch `xb` (a tensor or tuple of them) holds NaN or inf."""
    for i, x in enumerate((xb,) if isinstance(xb, torch.Tensor) else xb):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or bool(torch.isfinite(x).all()):
            continue
        n_nan, n_inf = torch.stack([torch.isnan(x).sum(), torch.isinf(x).sum()]).tolist()
        raise ValueError(f'epoch {epoch}, batch {it}: input {i} (shape {tuple(x.shape)}, {x.dtype}) holds {n_nan} '
                         f'NaN and {n_inf} inf of {x.numel()} values: clean the data (torch.nan_to_num, or drop '
                         f'the rows) before training')
