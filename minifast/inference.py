"""Inference with a trained learner: predictions over a loader (`get_preds`) and for one item (`predict`), bound on
`Learner` as methods of the same names."""
import torch
import torch.nn.functional as F
from torch import nn

from .state import preserved

__all__ = ['get_preds', 'predict', 'is_cross_entropy']


def get_preds(learn, dl=None, activ=None):
    """(predictions, targets) over `dl` (default: validation set), on CPU; softmax applied for cross-entropy."""
    dl = learn.data.valid_dl if dl is None else dl
    if activ is None:
        activ = (lambda o: o.softmax(-1)) if is_cross_entropy(learn.loss_func) else (lambda o: o)
    preds, targs = [], []
    with preserved(learn, parts=('modes',)), torch.no_grad(), learn.stepper.autocast():  # as validation runs
        learn.model.eval()
        for b in dl:
            xb, _ = learn.prepare_batch(b)
            preds.append(activ(learn.model(*xb).float()).cpu())
            targs.append(b[-1].cpu())
    return torch.cat(preds), torch.cat(targs)


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
