"""Test-time augmentation (fastai v1's `learn.TTA` and `learn.tta_only`): predictions averaged over zoomed-in corner
views of each image, flipped too when the model was trained with flips, made batch-wise on the data's device."""
import torch
import torch.nn.functional as F

from .data.augment import FlipLR, ZoomCrop, flips_lr, tta_kept
from .data.core import DatasetType, TensorDataLoader
from .data.images import BatchPipeline
from .inference import activation_name, is_cross_entropy, item_losses
from .state import preserved

__all__ = ['TTA', 'tta_only', 'tta_views', 'tta_loss']


def tta_views(train_tfms, scale=1.35, flip=None):
    """The view transforms of TTA, one list per view: the image zoomed by `scale` and cropped back at each corner
    (row, col in {0, 1}, fastai v1's order), then the same four flipped left-right, each followed by the training
    transforms that are not flips, crops or zooms (drawn at random).

    flip: None flips only when `train_tfms` did (FlipLR or Dihedral): 8 views, else 4, since a model trained
    without flips (digits, text) need not know flipped images (on digits, benchmarks/tta.py: flipped views cost
    0.4 to 0.6 points more at beta 0.4); True or False decides.
    """
    flip = flips_lr(train_tfms) if flip is None else bool(flip)
    kept = tta_kept(train_tfms)
    views = []
    for i in range(8 if flip else 4):
        zoom = ZoomCrop(scale, row_pct=float(i & 1), col_pct=float((i & 2) > 0))
        views.append(([FlipLR(p=1.)] if i & 4 else []) + [zoom] + kept)
    return views


def _image_loader(learn, ds_type):
    """The `ds_type` loader, checked to hold uint8 images (N, C, H, W) of an image bunch: what the views transform."""
    data = learn.data
    if ds_type is DatasetType.Train:
        raise ValueError('TTA: the Train loader is shuffled, augmented and drops its last batch, so its predictions '
                         'cannot be matched with views of the items; use ds_type=DatasetType.Fix (the training set '
                         'in order, unaugmented)')
    dl = data.dl(ds_type)
    x = dl.tensors[0] if isinstance(dl, TensorDataLoader) else None
    if not all(hasattr(data, a) for a in ('train_tfms', 'valid_tfms', 'stats')) or x is None \
            or x.dtype != torch.uint8 or x.ndim != 4:
        what = f'{type(data).__name__} whose {ds_type.name} loader is a {type(dl).__name__}'
        if x is not None:
            what += f' of {x.dtype} tensors shaped {tuple(x.shape)}'
        raise TypeError(f'TTA needs image data (an ImageDataBunch, its loaders holding uint8 images N x C x H x W); '
                        f'this learner has a {what}: use learn.get_preds() for other data')
    return data, dl


def tta_only(learn, ds_type=DatasetType.Valid, activ=None, scale=1.35, flip=None):
    """Yields the predictions (on CPU, the loss's activation applied) of each TTA view of the `ds_type` set: the
    views of `tta_views` (8 with flips, 4 without). The model, its modes and the global RNG are left as they were."""
    data, dl = _image_loader(learn, ds_type)
    with preserved(learn, parts=('rng',)):  # the random views must not shift a later fit's shuffles and draws
        for view in tta_views(data.train_tfms, scale, flip):
            vdl = TensorDataLoader(*dl.tensors, batch_size=dl.batch_size, device=dl.device,
                                   after_batch=BatchPipeline([*data.valid_tfms, *view], data))
            yield learn.get_preds(dl=vdl, activ=activ)[0]


def TTA(learn, beta=0.4, scale=1.35, ds_type=DatasetType.Valid, activ=None, with_loss=False, flip=None):  # noqa: N802
    """fastai v1's TTA: (beta * p + (1 - beta) * a, targets) with p the plain predictions of the `ds_type` set and a
    the mean of its TTA views' (see tta_views; `flip` as there). beta=None returns (p, a, targets); with_loss adds
    each item's loss of the final predictions (see tta_loss)."""
    if beta is not None and not 0 <= beta <= 1:
        raise ValueError(f'TTA: beta must be in [0, 1] or None, got {beta}')
    _image_loader(learn, ds_type)  # a clear error before any pass
    preds, y = learn.get_preds(ds_type, activ=activ)
    avg = torch.stack(list(tta_only(learn, ds_type, activ, scale, flip))).mean(0)
    if beta is None:
        return preds, avg, y
    final = preds * beta + avg * (1 - beta)
    return (final, y, tta_loss(learn.loss_func, final, y, activ)) if with_loss else (final, y)


def tta_loss(loss_func, preds, y, activ=None):
    """Each item's loss of predictions that are already activated (averaged probabilities): for cross-entropy the
    negative log-probability of the target, for binary cross-entropy with logits the binary cross-entropy, else
    `loss_func` with reduction='none' on the predictions themselves (fastai v1 passed probabilities to the loss as
    if they were logits)."""
    if activ is None and is_cross_entropy(loss_func):
        return -preds.gather(1, y.long()[:, None])[:, 0].clamp_min(torch.finfo(preds.dtype).tiny).log()
    if activ is None and activation_name(loss_func) == 'sigmoid':
        return F.binary_cross_entropy(preds, y.to(preds.dtype), reduction='none').reshape(len(y), -1).mean(1)
    return item_losses(loss_func, preds, y)
