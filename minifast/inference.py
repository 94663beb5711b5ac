"""Inference with a trained learner: predictions over a loader (`get_preds`) and for one item (`predict`), bound on
`Learner` as methods of the same names."""
import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.core import DatasetType
from .data.items import image_uint8, is_image_item
from .state import preserved

__all__ = ['get_preds', 'predict', 'predict_files', 'is_cross_entropy', 'loss_activation', 'activation_name',
           'ACTIVATIONS', 'item_losses']


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


ACTIVATIONS = {'softmax': lambda o: o.softmax(-1), 'sigmoid': torch.sigmoid, 'none': lambda o: o}


def activation_name(loss_func):
    """The name (a key of ACTIVATIONS) of what turns the model's raw outputs into predictions for `loss_func`:
    'softmax' for cross-entropy, 'sigmoid' for binary cross-entropy with logits, else 'none'."""
    if is_cross_entropy(loss_func):
        return 'softmax'
    if loss_func is F.binary_cross_entropy_with_logits or isinstance(loss_func, nn.BCEWithLogitsLoss):
        return 'sigmoid'
    return 'none'


def loss_activation(loss_func):
    """The function of ACTIVATIONS that `activation_name(loss_func)` names."""
    return ACTIVATIONS[activation_name(loss_func)]


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


def predict(learn, item):
    """fastai v1's predict: one item -> (class, class index, probabilities) for classification, else the output
    three times. For image data `item` is a file path, an `open_image` Image, a PIL image, a numpy array or a tensor
    (one image, no batch dimension), decoded and resized as the data's files were, then converted and normalised as
    validation batches are (never the training augmentation); other data takes the raw item (or a tuple of
    inputs)."""
    probs = _predict_batch(learn, [_as_input(learn.data, item, 'predict')])[0]
    return _triple(learn, probs)


def predict_files(learn, items, bs=None, ignore_errors=False):
    """Predict many images (a folder, or a list of files or of images in any form predict takes) in batches:
    (items, labels, class indices, probabilities), in the order of `items` (unreadable files are skipped with
    ignore_errors=True, so `items` says which were predicted). The data's test set is left as it was."""
    data = learn.data
    if not hasattr(data, 'add_test'):
        raise TypeError(f'predict_files: {type(data).__name__} has no add_test(); it needs image data (an '
                        f'ImageDataBunch, or a learner from load_learner)')
    old = data.test_dl
    try:
        data.add_test(items, ignore_errors=ignore_errors)
        dl = data.test_dl
        if bs is not None:
            dl.batch_size = int(bs)
        probs, _ = get_preds(learn, DatasetType.Test)
        kept = dl.dataset.items
    finally:
        data.test_dl = old
    idx = probs.argmax(-1) if is_cross_entropy(learn.loss_func) else None
    labels = None if idx is None else [_label(data, int(i)) for i in idx]
    return kept, labels, idx, probs


def _as_input(data, item, what):
    """The model's inputs for one item, without a batch dimension, before preprocessing."""
    if getattr(data, 'size', None) is not None:  # image data: every form of an image becomes its uint8 tensor
        return (image_uint8(item, data.size, data.crop, what, getattr(data, 'resize', 'pil')),)
    if is_image_item(item):
        raise TypeError(f'{what}: {type(item).__name__} given, but the data ({type(data).__name__}) is not image '
                        f'data; pass the item as the data holds it')
    xs = item if isinstance(item, (tuple, list)) else (item,)
    return tuple(x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)) for x in xs)


def _predict_batch(learn, items):
    """The model's outputs (after the loss's activation, on CPU) for a list of items as `_as_input` gives them."""
    pre = getattr(learn.data, 'preprocess', None)  # images: uint8 -> float, normalised like validation
    with preserved(learn, parts=('modes',)), torch.no_grad(), learn.stepper.autocast():  # as get_preds runs
        learn.model.eval()
        xs = [torch.stack(t).to(learn.device) for t in zip(*items)]
        if pre is not None:
            xs = [pre(t) for t in xs]
        out = learn.model(*xs).float()
        return loss_activation(learn.loss_func)(out).cpu()


def _label(data, idx):
    classes = getattr(data, 'classes', None)
    return classes[idx] if classes is not None else idx


def _triple(learn, probs):
    if not is_cross_entropy(learn.loss_func):
        return probs, probs, probs
    idx = int(probs.argmax())
    return _label(learn.data, idx), idx, probs


def is_cross_entropy(loss_func):
    """Whether `loss_func` is cross-entropy (its predictions then become probabilities by a softmax)."""
    return loss_func is F.cross_entropy or isinstance(loss_func, nn.CrossEntropyLoss)
