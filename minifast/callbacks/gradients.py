"""Gradient callbacks: GradientClipping (clip the total gradient norm before each step) and GradientAccumulation
(one optimizer step every n_step batches)."""
from numbers import Integral

import torch

from ..checks import real_value
from ..core import Callback

__all__ = ['GradientClipping', 'GradientAccumulation']


class GradientClipping(Callback):
    """Clip the gradients to a total (2-)norm of at most `clip` before each optimizer step, as
    torch.nn.utils.clip_grad_norm_ over the trainable parameters (fastai v1's GradientClipping).

    `learn.fit(..., clip=0.1)` (and every fit_* method) adds one for that call; `GradientClipping(learn, clip=0.1)`
    is usable in callback_fns= (as partial(GradientClipping, clip=0.1)) and callbacks=. It runs in after_backward,
    when the gradients are complete: with GradientAccumulation, once per step, on the accumulated (mean) gradients;
    in distributed training, on the gradients averaged across ranks. Under fp16 the gradients are unscaled first (the
    GradScaler then still skips a step whose gradients overflowed). No host synchronisation on a GPU.
    """

    def __init__(self, learn=None, clip=0.1):
        super().__init__(learn)
        self.clip = real_value(clip, 'clip', 'GradientClipping', low=0, low_open=True,
                               message=f'GradientClipping: clip must be a positive finite number (a maximum gradient '
                                       f'norm), got {clip!r}')

    def before_fit(self, learn):
        # every parameter: clip_grad_norm_ skips those without a gradient, so layers unfrozen during the fit count
        self._params = list(learn.model.parameters())

    def after_backward(self, learn):
        learn.stepper.unscale(learn.opt)  # fp16: clip the true gradients (the step then does not unscale them again)
        torch.nn.utils.clip_grad_norm_(self._params, self.clip)


class GradientAccumulation(Callback):
    """Accumulate the gradients of `n_step` batches and take one optimizer step with their mean: training with
    batches of bs behaves as with batches of n_step * bs (exactly so for a model without BatchNorm, whose statistics
    still see batches of bs).

    Each batch's loss is divided by the number of batches in its group before its backward pass; the optimizer
    steps (and zeroes the gradients) after every n_step batches, and after the last batch of an epoch, whose group
    may be shorter: its loss is then divided by the batches it has, so its gradient is the mean over what it saw.
    `learn.train_iter`, and with it the schedules, lr_find's sweep, the Recorder's per-step lists, DivergenceGuard's
    step numbers and Checkpoint(every=N), count optimizer steps, ceil(batches / n_step) per epoch.

    Events: before_batch, after_pred, after_loss and after_batch run for every batch; after_backward and after_step
    once per step, on the group's last batch, when `learn.stepping` is True (it is True outside accumulation), with
    `learn.loss` the mean of the group's batch losses (undivided), which the Recorder records. Usable in
    callback_fns= (partial(GradientAccumulation, n_step=4)) and callbacks=; lr_find keeps it. The training
    DataLoader needs a length. In distributed training the batches that do not step skip DDP's all_reduce
    (no_sync()).
    """

    def __init__(self, learn=None, n_step=4):
        super().__init__(learn)
        if isinstance(n_step, bool) or not isinstance(n_step, Integral) or n_step < 1:
            raise ValueError(f'GradientAccumulation: n_step must be a positive integer (batches per step), got '
                             f'{n_step!r}')
        self.n_step = int(n_step)

    def before_fit(self, learn):
        try:
            learn.batches_per_epoch()
        except TypeError:
            raise TypeError('GradientAccumulation needs a training DataLoader with a length (the last group of an '
                            'epoch is divided by the batches it has)') from None
