"""Input checks that fail early with messages naming the thing that is wrong."""
import functools
import operator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['check_data', 'check_metrics', 'check_fit', 'check_batch', 'metric_name']


def check_data(data):
    """`data` must have a `train_dl` (and may have `valid_dl`, possibly None)."""
    if not hasattr(data, 'train_dl'):
        raise TypeError(f'Learner: data must have a `train_dl` attribute (and `valid_dl`, which may be None); got '
                        f'{type(data).__name__}. Wrap your loaders with DataBunch(train_dl, valid_dl) or use '
                        f'DataBunch.from_tensors(x_train, y_train, x_valid, y_valid).')
    if not hasattr(data, 'valid_dl'):
        raise TypeError(f'Learner: data ({type(data).__name__}) has `train_dl` but no `valid_dl`; set valid_dl=None '
                        f'when there is no validation set.')


def metric_name(m):
    """The column name of a metric: its function name (through partials)."""
    while isinstance(m, functools.partial):
        m = m.func
    return getattr(m, '__name__', type(m).__name__)


def check_metrics(metrics):
    """A list of callables; a single callable is wrapped."""
    if metrics is None:
        return []
    ms = list(metrics) if isinstance(metrics, (list, tuple)) else [metrics]
    for i, m in enumerate(ms):
        if not callable(m):
            raise TypeError(f'metrics[{i}] is {m!r} ({type(m).__name__}), which is not callable: a metric is a '
                            f'function (pred, target) -> tensor, such as minifast.accuracy')
    return ms


def check_fit(learn, epochs):
    """Arguments of fit and the training DataLoader, before any batch runs; returns epochs as an int."""
    try:
        n = operator.index(epochs)  # ints and numpy integers, not floats, strings or bools
    except TypeError:
        n = None
    if n is None or isinstance(epochs, bool) or n < 0:
        raise ValueError(f'fit: epochs must be a non-negative integer, got {epochs!r}')
    dl = learn.data.train_dl
    if dl is None:
        raise ValueError('fit: data.train_dl is None; there is nothing to train on')
    try:
        n_batches = len(dl)
    except TypeError:
        return n
    if n_batches == 0:
        ds = getattr(dl, 'dataset', None)
        nds = len(ds) if ds is not None and hasattr(ds, '__len__') else '?'
        raise ValueError(f'fit: the training DataLoader is empty (0 batches from {nds} items with '
                         f'batch_size={getattr(dl, "batch_size", "?")}, drop_last={getattr(dl, "drop_last", "?")})')
    return n


def _is_class_loss(loss_func):
    return (loss_func in (F.cross_entropy, F.nll_loss)
            or isinstance(loss_func, (nn.CrossEntropyLoss, nn.NLLLoss)))


def check_batch(learn):
    """Targets of the first batch against the model's output, for class-index losses (cross-entropy, NLL)."""
    learn._first_batch = False
    if not _is_class_loss(learn.loss_func):
        return
    pred, y = learn.pred, learn.yb
    if not isinstance(pred, torch.Tensor) or not isinstance(y, torch.Tensor):
        return
    name = getattr(learn.loss_func, '__name__', type(learn.loss_func).__name__)
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
