"""Inference with a trained learner: predictions over a loader (`get_preds`) and for one item (`predict`), bound on
`Learner` as methods of the same names."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from .data.core import DatasetType
from .state import preserved

__all__ = ['get_preds', 'predict', 'is_cross_entropy', 'loss_activation', 'item_losses']


def get_preds(learn, ds_type=DatasetType.Valid, with_loss=False, n_batch=None, activ=None, dl=None):
    """fastai v1's get_preds: [predictions, targets] over the `ds_type` loader (default: validation), or over `dl`
    when given, on CPU; the loss's activation is applied (softmax for cross-entropy) unless `activ` says otherwise.

    Args:
        ds_type: a DatasetType (Valid, Train, Fix: the training set in order without augmentation, Test).
        with_loss: also return each item's loss (the loss function with reduction='none', on the raw outputs,
            computed batch-wise on the device): [predictions, targets, losses].
        n_batch: stop after this many batches.
        activ: a function raw outputs -> predictions, instead of the loss's own activation.
        dl: any loader of (x, y) batches, instead of `ds_type`'s.
    """
    if dl is None and not isinstance(ds_type, DatasetType):  # get_preds(loader), as minifast spelled it before
        dl, ds_type = ds_type, None
    dl = learn.data.dl(ds_type) if dl is None else dl
    if activ is None:
        activ = loss_activation(learn.loss_func)
    preds, targs, losses = [], [], []
    with preserved(learn, parts=('modes',)), torch.no_grad(), learn.stepper.autocast():  # as validation runs
        learn.model.eval()
        for i, b in enumerate(dl):
            if n_batch is not None and i >= n_batch:
                break
            xb, yb = learn.prepare_batch(b)
            out = learn.model(*xb).float()
            if with_loss:
                losses.append(item_losses(learn.loss_func, out, yb).float().cpu())
            preds.append(activ(out).cpu())
            targs.append(yb.cpu())
    if not preds:
        raise ValueError(f'get_preds: the {ds_type.name if ds_type else "given"} loader yielded no batches')
    res = [torch.cat(preds), torch.cat(targs)]
    return res + [torch.cat(losses)] if with_loss else res


def loss_activation(loss_func):
    """What turns the model's raw outputs into predictions for `loss_func`: softmax for cross-entropy, sigmoid for
    binary cross-entropy with logits, else the outputs themselves."""
    if is_cross_entropy(loss_func):
        return lambda o: o.softmax(-1)
    if loss_func is F.binary_cross_entropy_with_logits or isinstance(loss_func, nn.BCEWithLogitsLoss):
        return torch.sigmoid
    return lambda o: o


def item_losses(loss_func, out, targ):
    """The loss of each item of a batch: `loss_func` with reduction='none' (a torch loss module is copied with it),
    averaged over any dimension beyond the batch's."""
    if isinstance(loss_func, nn.Module) and hasattr(loss_func, 'reduction'):
        lf = copy.copy(loss_func)
        lf.reduction = 'none'
        loss = lf(out, targ)
    else:
        try:
            loss = loss_func(out, targ, reduction='none')
        except TypeError as e:
            name = getattr(loss_func, '__name__', type(loss_func).__name__)
            raise TypeError(f'with_loss: the loss function {name} takes no reduction= argument, so per-item losses '
                            f'cannot be computed; use a torch loss (F.cross_entropy, nn.CrossEntropyLoss...) or one '
                            f'that accepts reduction="none"') from e
    if loss.ndim == 0 or loss.shape[0] != out.shape[0]:
        raise ValueError(f'with_loss: the loss function returned shape {tuple(loss.shape)} with reduction="none"; '
                         f'one loss per item ({out.shape[0]}) was expected')
    return loss.reshape(loss.shape[0], -1).mean(1) if loss.ndim > 1 else loss


def predict(learn, x):
    """Predict one item (no batch dimension; raw, as in data.valid_ds): (label, class index, probabilities) for
    classification. Data with a `preprocess` method (images) converts and normalises the item first."""
    xs = x if isinstance(x, (tuple, list)) else (x,)
    pre = getattr(learn.data, 'preprocess', None)  # e.g. images: uint8 -> float, normalised like validation
    with preserved(learn, parts=('modes',)), torch.no_grad(), learn.stepper.autocast():  # as get_preds runs
        learn.model.eval()
        xs = [t.unsqueeze(0).to(learn.device) for t in xs]
        if pre is not None:
            xs = [pre(t) for t in xs]
        out = learn.model(*xs)[0].float().cpu()
    if not is_cross_entropy(learn.loss_func):
        return out, out, out
    probs = out.softmax(-1)
    idx = int(probs.argmax())
    classes = getattr(learn.data, 'classes', None)
    return (classes[idx] if classes is not None else idx), idx, probs


def is_cross_entropy(loss_func):
    """Whether `loss_func` is cross-entropy (its predictions then become probabilities by a softmax)."""
    return loss_func is F.cross_entropy or isinstance(loss_func, nn.CrossEntropyLoss)
