"""The one owner of how a batch's loss becomes an optimizer step: mixed precision (autocast, GradScaler), gradient
accumulation, the clipping hand-off (unscaling once) and the weight-decay step."""
import torch

from .accel import all_finite

__all__ = ['Stepper']


class Stepper:
    """What happens between a batch's loss and the next batch: `backward`, then `step`.

    Precision: `bf16` or `fp16` (autocast, and for fp16 a GradScaler, `scaler`), chosen with `set_precision`;
    `precision` names it ('bf16', 'fp16' or 'fp32').
    Accumulation: `n_acc` batches per optimizer step (set for a fit by `begin`); `stepping` says whether the current
    training batch ends a step; `step_bs` counts the items of the current step. `decay` is the WeightDecay the
    optimizer was built with (optim.create_opt sets it).
    """

    def __init__(self, device):
        self.device, self.decay = device, None
        self.set_precision('fp32')
        self.begin(1)

    # ---- precision --------------------------------------------------------------------------------------------
    def set_precision(self, kind, init_scale=2. ** 16, growth_interval=2000):
        """'bf16', 'fp16' (with a fresh GradScaler) or 'fp32'."""
        self.bf16, self.fp16 = kind == 'bf16', kind == 'fp16'
        self.precision = 'bf16' if self.bf16 else 'fp16' if self.fp16 else 'fp32'  # named in a resume signature
        self.amp = self.bf16 or self.fp16  # whether the forward and loss run under autocast
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=init_scale,
                                           growth_interval=growth_interval) if self.fp16 else None

    def autocast(self):
        """The autocast context of this precision (disabled in full precision)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.bf16 else torch.float16,
                              enabled=self.amp)

    # ---- one step ---------------------------------------------------------------------------------------------
    def begin(self, n_acc):
        """A new fit (or pass) accumulating `n_acc` batches per step."""
        self.n_acc, self.stepping, self.unscaled = n_acc, True, False
        self.acc_loss, self.acc_count, self.step_bs = None, 0, None

    def backward(self, learn):
        """The backward pass of `learn.loss`; True when the gradients of a step are complete (after_backward and
        `step` follow), False inside an accumulation group."""
        if self.n_acc > 1:
            return self._accumulate(learn)
        (learn.loss if self.scaler is None else self.scaler.scale(learn.loss)).backward()
        return True

    def _accumulate(self, learn):
        """Gradient accumulation: the backward of this batch's loss divided by the number of batches in its group
        (n_acc, or fewer in the last group of an epoch), so the gradients become the mean over the group's batches.
        On the group's last batch `learn.loss` becomes the mean of the group's (undivided) losses."""
        n, i = self.n_acc, learn.iter
        k = min(n, learn.n_iter - (i - i % n))  # batches in this group
        loss = learn.loss.detach()
        if i % n == 0 or self.acc_loss is None:  # a new group
            self.acc_loss, self.acc_count, self.step_bs = loss, 1, len(learn.yb)
        else:
            self.acc_loss, self.acc_count, self.step_bs = self.acc_loss + loss, self.acc_count + 1, \
                self.step_bs + len(learn.yb)
        scaled = learn.loss / k
        (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
        if not self.stepping:
            return False
        if self.acc_count < k:  # batches of the group were cancelled before their backward: the mean is over the rest
            with torch.no_grad():
                grads = [p.grad for p in learn.model.parameters() if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, k / self.acc_count)
        learn.loss = self.acc_loss / self.acc_count
        return True

    def unscale(self, opt):
        """fp16: unscale the gradients in place, once per step (gradient clipping must see true gradients; the
        step then does not unscale them again). Nothing in other precisions."""
        if self.scaler is not None and not self.unscaled:
            self.scaler.unscale_(opt)
            self.unscaled = True

    def step(self, opt):
        """The optimizer step with weight decay (skipped by the scaler when fp16 gradients overflowed)."""
        if self.scaler is None:
            self.decay.step()
            return
        scaler, wd = self.scaler, self.decay
        if not wd.native:  # L2 / decoupled decay by hand must see true gradients
            self.unscale(opt)
            keep = None
            if wd.true_wd:  # the decay multiplies the weights: not on a step the scaler skips (read on the device)
                grads = [p.grad for g in opt.param_groups for p in g['params'] if p.grad is not None]
                if grads:
                    keep = all_finite(grads)
            wd.decay(keep)
        scaler.step(opt)  # fused optimizers take the scale and the overflow flag in-kernel: no host sync
        scaler.update()
        self.unscaled = False

    def cancelled(self, opt, training):
        """A batch was cancelled (CancelBatchException): with accumulation, a group's gradients are dropped when the
        batch would have stepped, and fp16 gradients already unscaled for clipping are dropped too."""
        if training and (self.unscaled or (self.n_acc > 1 and self.stepping)):
            self.drop_step(opt)

    def drop_step(self, opt):
        """Drop this step's gradients; gradients already unscaled (fp16) also close the scaler's record of them,
        or the next step would treat scaled gradients as unscaled."""
        if self.unscaled:
            self.scaler.update()  # unscale_ recorded this step's overflow check: update() consumes it
            self.unscaled = False
        opt.zero_grad()

    def end_group(self, opt):
        """After an epoch's accumulated batches: gradients of a group left unfinished (a cancel or an error) must not
        reach the next step."""
        if self.acc_loss is not None:
            opt.zero_grad()
        self.stepping, self.acc_loss = True, None

    def state_dict(self):
        """The GradScaler's state (fp16), else None."""
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state):
        """Restore what `state_dict` returned (nothing without a scaler or a state)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
