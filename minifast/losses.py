"""Loss functions: fastai v1's LabelSmoothingCrossEntropy, and the mixed loss that MixUp and CutMix train with."""
import copy
import inspect
from functools import partial

from torch import nn

__all__ = ['LabelSmoothingCrossEntropy', 'per_item_loss', 'mixed_loss']


class LabelSmoothingCrossEntropy(nn.CrossEntropyLoss):
    """fastai v1's label-smoothing cross-entropy: (1-eps) * NLL + eps * the mean over classes of -log p.

    It is torch's nn.CrossEntropyLoss(label_smoothing=eps): equal to F.cross_entropy(..., label_smoothing=eps), with
    class dimensions (N, C, d1...) and reduction 'mean', 'sum' or 'none'. Being a CrossEntropyLoss, the rest of
    minifast treats it as cross-entropy (softmax predictions in get_preds/predict, per-item losses, target checks).
    """

    def __init__(self, eps=0.1, reduction='mean', weight=None, ignore_index=-100):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps <= 1:
            raise ValueError(f'LabelSmoothingCrossEntropy: eps must be a number in [0, 1], got {eps!r}')
        if reduction not in ('mean', 'sum', 'none'):
            raise ValueError(f"LabelSmoothingCrossEntropy: reduction must be 'mean', 'sum' or 'none', got "
                             f'{reduction!r}')
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=float(eps))
        self.eps = float(eps)

    def extra_repr(self):
        return f'eps={self.eps}, reduction={self.reduction!r}'


def _loss_name(loss_func):
    return getattr(loss_func, '__name__', type(loss_func).__name__)


def per_item_loss(loss_func, who='MixUp'):
    """A function (pred, target) -> one loss per item for `loss_func`: a torch loss module copied with
    reduction='none', or the function called with reduction='none'. TypeError, naming the loss, for a function
    that takes no reduction= argument."""
    if isinstance(loss_func, nn.Module) and hasattr(loss_func, 'reduction'):
        lf = copy.copy(loss_func)  # shares its weights; the user's module keeps its reduction
        lf.reduction = 'none'
    else:
        try:
            params = inspect.signature(loss_func).parameters.values()
        except (TypeError, ValueError):  # no signature to read (a builtin): the first call tells
            params = None
        if params is not None and not any(p.name == 'reduction' or p.kind is p.VAR_KEYWORD for p in params):
            raise TypeError(f"{who}: per-sample mixing needs the loss of each item, and the loss function "
                            f"{_loss_name(loss_func)} takes no reduction= argument; give it reduction='none' "
                            f'support, or mix with one lambda per batch ({who}(..., per_sample=False)), which any '
                            f'loss (pred, target) -> loss supports')
        lf = partial(loss_func, reduction='none')

    def item_loss(pred, targ):
        loss = lf(pred, targ)
        if loss.ndim == 0 or loss.shape[0] != pred.shape[0]:
            raise ValueError(f"{who}: the loss function {_loss_name(loss_func)} returned shape {tuple(loss.shape)} "
                             f"with reduction='none'; one loss per item ({pred.shape[0]}) was expected")
        return loss.reshape(loss.shape[0], -1).mean(1) if loss.ndim > 1 else loss
    return item_loss


def mixed_loss(loss_func, pred, y1, y2, lam, item_loss=None, loss1=None):
    """The loss of a mixed batch: lam * loss(pred, y1) + (1 - lam) * loss(pred, y2).

    `lam` is a 0-dim tensor (one lambda for the batch: any loss function) or one lambda per item (then the items'
    losses from `item_loss`, default `per_item_loss(loss_func)`, are mixed item by item and averaged, or summed for
    a loss with reduction='sum'). `loss1`, when given, is loss_func(pred, y1), already computed."""
    if lam.ndim == 0:
        l1 = loss_func(pred, y1) if loss1 is None else loss1
        return lam * l1 + (1 - lam) * loss_func(pred, y2)
    item_loss = per_item_loss(loss_func) if item_loss is None else item_loss
    loss = lam * item_loss(pred, y1) + (1 - lam) * item_loss(pred, y2)
    return loss.sum() if getattr(loss_func, 'reduction', 'mean') == 'sum' else loss.mean()
