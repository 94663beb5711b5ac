"""Mixing regularisers: MixUp (blend two items), CutMix (paste a box of one image into another), and fastai v1's
`learn.mixup()`, bound on Learner.

Both mix on the device and draw from torch's global RNG of the batch's device (no host sync), so a checkpoint's RNG
state replays them: a resumed fit is the uninterrupted one. Training batches only: validation never sees a mix.
"""
import math
import numbers

import torch
import torch.nn.functional as F

from ..core import Callback
from ..losses import mixed_loss, per_item_loss

__all__ = ['MixHandler', 'MixUp', 'CutMix', 'mixup', 'mixed_targets']


def mixed_targets(pred, y, perm, lam):
    """lam * Y + (1 - lam) * Y[perm], where Y is `y` as probabilities: class indices (N,) or (N, d1...) are one-hot
    encoded along `pred`'s class dimension 1; float targets of `pred`'s shape are mixed as they are."""
    if not y.is_floating_point():
        if pred.ndim < 2 or y.shape != pred.shape[:1] + pred.shape[2:]:
            raise TypeError(f'stack_y=False mixes the targets as probabilities: class-index targets of shape '
                            f'{tuple(y.shape)} do not match the model output {tuple(pred.shape)} (N, C, ...)')
        y = F.one_hot(y, pred.shape[1]).movedim(-1, 1).to(torch.float32)
    elif y.shape != pred.shape:
        raise TypeError(f'stack_y=False mixes float targets of the model output\'s shape {tuple(pred.shape)}; got '
                        f'{tuple(y.shape)}')
    lam = lam.view(-1, *[1] * (y.ndim - 1)) if lam.ndim else lam
    return lam * y + (1 - lam) * y[perm]


def _blend(x, x2, lam):
    lam = (lam.view(-1, *[1] * (x.ndim - 1)) if lam.ndim else lam).to(x.dtype)
    return lam * x + (1 - lam) * x2


class MixHandler(Callback):
    """The base of MixUp and CutMix: per training batch, `mix` (before_batch) draws a permutation and lambda(s) and
    mixes the inputs; after_loss replaces the loss with the mixed loss. Validation batches pass untouched.

    stack_y=True (fastai v1's default): learn.yb keeps the batch's own targets and the loss is
    lam * loss_func(pred, y) + (1 - lam) * loss_func(pred, y[perm]), for any loss function (pred, target) -> loss
    (with one lambda per item, the loss must accept reduction='none': see minifast.losses.mixed_loss).
    stack_y=False: the targets themselves are mixed as probabilities (class indices one-hot encoded) and become
    learn.yb; the loss function must accept them (F.cross_entropy does). learn.loss_func is never replaced.
    """
    order = -20  # before DivergenceGuard (-10) checks the loss: every later after_loss sees the mixed loss

    def __init__(self, learn=None, alpha=1., stack_y=True):
        if isinstance(learn, numbers.Real):  # MixUp(0.4): no learner is a number, so it is alpha
            learn, alpha = None, learn
        super().__init__(learn)
        name = type(self).__name__
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
            raise ValueError(f'{name}: alpha must be a positive finite number (lambda ~ Beta(alpha, alpha)), got '
                             f'{alpha!r}')
        self.alpha, self.stack_y, self.per_sample = float(alpha), bool(stack_y), False
        self._betas, self._mix, self._item_loss = {}, None, None

    def beta(self, device):
        """Beta(alpha, alpha) on `device`, made once per device (without validation: its checks sync the host)."""
        d = self._betas.get(device)
        if d is None:
            a = torch.tensor(self.alpha, device=device)
            d = self._betas[device] = torch.distributions.Beta(a, a, validate_args=False)
        return d

    def mix(self, learn, xb):
        """(permutation, lambda(s), mixed inputs) for a training batch's inputs `xb`."""
        raise NotImplementedError

    def before_fit(self, learn):
        mixers = [cb for cb in learn.hooks.cbs if isinstance(cb, MixHandler)]
        if len(mixers) > 1:
            names = ', '.join(type(m).__name__ for m in mixers)
            raise ValueError(f'{len(mixers)} mixing callbacks in one fit ({names}); give one MixUp or CutMix')
        self._mix = None
        # checked now, before any batch: a loss without reduction= fails here, with nothing trained
        self._item_loss = per_item_loss(learn.loss_func, type(self).__name__) \
            if self.per_sample and self.stack_y else None

    def before_batch(self, learn):
        if not learn.training:
            return
        if not isinstance(learn.yb, torch.Tensor):
            raise TypeError(f'{type(self).__name__} mixes a batch with one target tensor; got targets of type '
                            f'{type(learn.yb).__name__}')
        perm, lam, xb = self.mix(learn, learn.xb)
        if learn.channels_last:  # the mix may have lost the batch's memory format
            xb = tuple(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x for x in xb)
        learn.xb, self._mix = xb, (perm, lam)

    def after_loss(self, learn):
        if not learn.training or self._mix is None:
            return
        perm, lam = self._mix
        pred, y = learn.pred, learn.yb
        with learn.stepper.autocast():  # as the loop computes the loss
            if self.stack_y:  # with one lambda, the loop's loss is the first term: reused
                learn.loss = mixed_loss(learn.loss_func, pred, y, y[perm], lam, self._item_loss,
                                        learn.loss if lam.ndim == 0 else None)
            else:
                learn.yb = mixed_targets(pred, y, perm, lam)
                learn.loss = learn.loss_func(pred, learn.yb)

    def after_batch(self, learn):
        if learn.training:
            self._mix = None

    def after_fit(self, learn):
        self._mix = self._item_loss = None


class MixUp(MixHandler):
    """MixUp (Zhang et al. 2018), as fastai v1's MixUpCallback: each training batch is blended with a permutation
    of itself, x = lam * x + (1 - lam) * x[perm], and trained on the mixed loss (see MixHandler).

    Per batch, drawn from torch's RNG of the batch's device, in this order: perm = torch.randperm(bs), then
    lam ~ Beta(alpha, alpha), one per item (per_sample=True, fastai v1) or one for the batch; lam = max(lam, 1 - lam)
    (v1: each item stays the larger part of its mix). Every input tensor is mixed (all must be floating point).
    stack_x=True (v1): the inputs are not mixed; the model gets (*xb, *(x[perm] for x in xb), lam) and mixes them
    itself. Usable in callbacks= and callback_fns= (partial(MixUp, alpha=0.2)); `learn.mixup()` adds one.
    """

    def __init__(self, learn=None, alpha=0.4, stack_x=False, stack_y=True, per_sample=True):
        super().__init__(learn, alpha, stack_y)
        self.stack_x, self.per_sample = bool(stack_x), bool(per_sample)

    def mix(self, learn, xb):
        for i, x in enumerate(xb):
            if not x.is_floating_point():
                raise TypeError(f'MixUp blends floating-point inputs; input {i} of the batch is {x.dtype}')
        dev, bs = xb[0].device, xb[0].shape[0]
        perm = torch.randperm(bs, device=dev)
        lam = self.beta(dev).sample((bs,) if self.per_sample else ())
        lam = torch.maximum(lam, 1 - lam)
        if self.stack_x:
            return perm, lam, (*xb, *(x[perm] for x in xb), lam)
        return perm, lam, tuple(_blend(x, x[perm], lam) for x in xb)


class CutMix(MixHandler):
    """CutMix (Yun et al. 2019): a box of each training image is replaced by the same box of another image of the
    batch (a permutation), and the loss is mixed with lam = 1 - box area / image area (see MixHandler).

    Per batch, drawn from torch's RNG of the batch's device, in this order: perm = torch.randperm(bs); lam ~ Beta(alpha,
    alpha), one for the batch; for each spatial dimension of size S (H then W), a centre c = randint(0, S). The box's
    side is round(S * (1 - lam) ** (1 / spatial dims)) (sqrt for images), spans [c - side // 2, c + side // 2) clipped
    to the image, and lam is then corrected to 1 - its area / the image's. Inputs: one tensor (N, C, H, W), or (N, C,
    L) (a segment is cut). The box is a mask built on the device (torch.where), so nothing syncs the host.
    """

    def __init__(self, learn=None, alpha=1., stack_y=True):
        super().__init__(learn, alpha, stack_y)

    def mix(self, learn, xb):
        if len(xb) != 1 or xb[0].ndim < 3 or not xb[0].is_floating_point():
            got = ', '.join(f'{tuple(x.shape)} {x.dtype}' for x in xb)
            raise TypeError(f'CutMix cuts boxes from one floating-point input of shape (N, C, H, W) or (N, C, L); got '
                            f'{got}')
        x = xb[0]
        dev, sizes = x.device, x.shape[2:]
        perm = torch.randperm(x.shape[0], device=dev)
        lam = self.beta(dev).sample(())
        ratio = (1 - lam) ** (1 / len(sizes))
        mask, area = None, None
        for d, size in enumerate(sizes):
            side = torch.round(size * ratio).long()
            c = torch.randint(0, size, (), device=dev)
            lo, hi = (c - side // 2).clamp(0, size), (c + side // 2).clamp(0, size)
            ar = torch.arange(size, device=dev)
            m = ((ar >= lo) & (ar < hi)).view([size if i == d else 1 for i in range(len(sizes))])
            mask, area = (m, hi - lo) if mask is None else (mask & m, area * (hi - lo))
        lam = 1 - area.to(torch.float32) / math.prod(sizes)
        return perm, lam, (torch.where(mask, x[perm], x),)


def mixup(learn, alpha=0.4, stack_x=False, stack_y=True, per_sample=True):
    """fastai v1's learn.mixup(): add a MixUp callback to learn.callbacks (replacing any MixUp or CutMix there) and
    return the learner."""
    for cb in [cb for cb in learn.callbacks if isinstance(cb, MixHandler)]:
        learn.remove_cb(cb)
    learn.add_cb(MixUp(alpha=alpha, stack_x=stack_x, stack_y=stack_y, per_sample=per_sample))
    return learn
