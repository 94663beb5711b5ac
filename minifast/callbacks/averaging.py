"""Weight averaging during training: EMA (an exponential moving average of the weights, updated on the device every
few optimizer steps) and SWA (stochastic weight averaging: the equal-weight average of the epoch ends from
`start_epoch`, with SWALR's lr annealing, and BatchNorm statistics recomputed at the end)."""
import contextlib
import copy
import math
import warnings

import torch

from ..checks import int_at_least, real_value
from ..core import Callback
from ..landscape import recompute_bn
from ..optim import set_hyper
from ..state import Snapshot, preserved

__all__ = ['EMA', 'SWA', 'swa_alpha']

VALIDATE = ('model', 'ema')
ANNEAL = ('cos', 'linear')


class _Averaged(Callback):
    """What EMA and SWA share: `model`, a copy of the learner's model (made at each fit's start, on its device) whose
    parameters and buffers hold the average; `n_averaged`, the number of updates so far (a Python int: no device
    read); `update` (foreach ops, no host sync); `apply`; and the checkpoint state (`state_dict`/`load_state_dict`,
    which Checkpoint saves and fit(resume=...) restores)."""
    order = 80  # before Checkpoint (90): its files hold this fit's average; after ParamScheduler (10): SWA's lr wins

    def __init__(self, average_buffers):
        self.average_buffers, self.model, self.n_averaged = average_buffers, None, 0
        self._names = self._live = self._avg = None

    def _track(self, model):
        """Start a new average of `model`: a copy of it on its device; the first `update` copies the weights in."""
        avg = copy.deepcopy(model)
        for p in avg.parameters():
            p.grad = None
            p.requires_grad_(False)
        params, bufs = list(model.named_parameters()), list(model.named_buffers())
        self._names = [n for n, _ in params] + [n for n, _ in bufs]
        live = [p for _, p in params] + [b for _, b in bufs]
        mine = list(avg.parameters()) + list(avg.buffers())
        # floating tensors are averaged; integer buffers (BatchNorm's num_batches_tracked), and every buffer when
        # buffers are not averaged, are copied from the model at each update
        avg_idx = [i for i, t in enumerate(live) if (t.is_floating_point() or t.is_complex())
                   and (i < len(params) or self.average_buffers)]
        copy_idx = sorted(set(range(len(live))) - set(avg_idx))
        self._live = ([live[i] for i in avg_idx], [live[i] for i in copy_idx], live)
        self._avg = ([mine[i] for i in avg_idx], [mine[i] for i in copy_idx], mine)
        self.model, self.n_averaged = avg.eval(), 0

    def _weight(self):
        """The weight of the model's new weights in this update (n_averaged >= 1)."""
        raise NotImplementedError

    def update(self):
        """Fold the model's current weights into the average: foreach ops on the device, no host sync (the first
        update copies them, as torch.optim.swa_utils.AveragedModel does)."""
        (avg_f, avg_c, avg_all), (live_f, live_c, live_all) = self._avg, self._live
        with torch.no_grad():
            if self.n_averaged == 0:
                if avg_all:  # (foreach ops refuse empty lists: a model without parameters or buffers)
                    torch._foreach_copy_(avg_all, live_all)
            else:
                if avg_f:
                    torch._foreach_lerp_(avg_f, live_f, self._weight())
                if avg_c:
                    torch._foreach_copy_(avg_c, live_c)
        self.n_averaged += 1

    def apply(self, learn):
        """Copy the averaged parameters and buffers into `learn`'s model (a Learner or a bare model)."""
        self._need_average('apply')
        model = learn if isinstance(learn, torch.nn.Module) else learn.model
        ts = list(model.parameters()) + list(model.buffers())
        if len(ts) != len(self._avg[2]):
            raise ValueError(f'{type(self).__name__}.apply: the model has {len(ts)} parameters and buffers, the '
                             f'average {len(self._avg[2])}; apply it to the model it was taken from')
        if ts:
            with torch.no_grad():
                torch._foreach_copy_(ts, self._avg[2])
        return learn

    @contextlib.contextmanager
    def applied(self, learn):
        """Run the body with the averaged weights in `learn`'s model (e.g. learn.validate()), then put the model's
        own weights and buffers back exactly, also on an error."""
        self._need_average('applied')
        with preserved(learn, ('weights', 'buffers')):
            self.apply(learn)
            yield learn

    def _need_average(self, what):
        if self.model is None:
            raise ValueError(f'{type(self).__name__}.{what}: there is no average yet; fit with this callback first')

    def state_dict(self):
        """The number of updates and the averaged tensors (saved in checkpoints, restored on resume)."""
        return {'n_averaged': self.n_averaged,
                'averaged': {} if self._avg is None else dict(zip(self._names, self._avg[2]))}

    def load_state_dict(self, state):
        """Restore what `state_dict` returned, into this fit's average (its tensors stay on the model's device)."""
        saved = state['averaged']
        if list(saved) != self._names:
            missing, extra = sorted(set(self._names) - set(saved)), sorted(set(saved) - set(self._names))
            raise ValueError(f'the saved average does not match this model: missing {missing[:5]}, unexpected '
                             f'{extra[:5]}')
        if self._names:
            with torch.no_grad():
                torch._foreach_copy_(self._avg[2], [saved[n] for n in self._names])
        self.n_averaged = int(state['n_averaged'])


class EMA(_Averaged):
    """An exponential moving average of the model's weights, kept on the model's device and updated after every
    `every` optimizer steps: avg = decay * avg + (1 - decay) * weights (one foreach lerp, no host sync; the first
    update copies the weights), as torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn(decay).

    Args:
        decay: in (0, 1); the average spans about 1 / (1 - decay) updates.
        every: update after every `every` optimizer steps (counted over the fit, so a resumed fit updates at the same
            steps).
        validate: 'model' (the epoch's validation runs on the model's weights) or 'ema' (on the average, swapped in
            for the validation and swapped out after it: the model is left bit-identical).
        average_buffers: True (default): floating buffers (BatchNorm running statistics) are averaged as the
            parameters are (AveragedModel(use_buffers=True)); False: they are copied from the model. Integer buffers
            (num_batches_tracked) are always copied (as timm's ModelEmaV3 does).
        replace_at_end: copy the average into the model when the fit completes (not after an error or Ctrl-C).

    `ema.model` is the averaged copy of the model (evaluate or export it: ema.model.state_dict()); `ema.apply(learn)`
    copies the average into the learner's model and `with ema.applied(learn): learn.validate()` evaluates it and puts
    the model back. Each fit starts a new average; Checkpoint saves it, and fit(resume=...) continues it exactly.
    """

    def __init__(self, decay=0.999, every=1, validate='model', average_buffers=True, replace_at_end=False):
        super().__init__(bool(average_buffers))
        self.decay = real_value(decay, 'decay', 'EMA', low=0., high=1., low_open=True, high_open=True,
                                message=f'EMA: decay must be a number in (0, 1) (e.g. 0.999: an average over '
                                        f'about 1000 steps), got {decay!r}')
        self.every = int_at_least(every, 'every', 'EMA')
        if validate not in VALIDATE:
            raise ValueError(f"EMA: validate must be 'model' or 'ema', got {validate!r}")
        self.validate, self.replace_at_end = validate, bool(replace_at_end)
        self._swap = None

    def _weight(self):
        return 1. - self.decay

    def before_fit(self, learn):
        self._track(learn.model)
        self._swap = None

    def after_step(self, learn):
        if (learn.train_iter + 1) % self.every == 0:  # train_iter counts the steps before this one
            self.update()

    def before_validate(self, learn):
        # the epoch's validation only (not a learn.validate() from a hook), once there is an average
        if self.validate == 'ema' and learn.phase == 'valid' and self._swap is None and self.n_averaged:
            self._swap = (learn.state, Snapshot.take(learn, ('weights', 'buffers')))
            self.apply(learn)

    def after_validate(self, learn):
        if self._swap is not None and self._swap[0] is learn.state:
            self._swap_back()

    def _swap_back(self):
        snap, self._swap = self._swap[1], None
        snap.restore()

    def after_fit(self, learn):
        if self._swap is not None:  # an error or Ctrl-C in the validation: after_validate did not run
            self._swap_back()
        if self.replace_at_end and learn.exception is None and self.n_averaged:
            self.apply(learn)


def swa_alpha(k, anneal_epochs, strategy='cos'):
    """How far SWA's lr has moved from the lr at start_epoch towards swa_lr in the k-th SWA epoch (k = 0 at
    start_epoch): 0 at k = 0, 1 from k = anneal_epochs on (at once when anneal_epochs is 0), as SWALR stepped at
    each epoch end."""
    t = 1. if anneal_epochs == 0 else max(0., min(1., k / anneal_epochs))
    return (1 - math.cos(math.pi * t)) / 2 if strategy == 'cos' else t


class SWA(_Averaged):
    """Stochastic weight averaging: from epoch `start_epoch` (0-based) on, the weights at each epoch's end are
    averaged with equal weights (AveragedModel.update_parameters at each epoch end); at the end of the fit the average
    is put in the model and its BatchNorm statistics are recomputed on the training data (one pass, cumulative
    averaging, as torch.optim.swa_utils.update_bn).

    Args:
        start_epoch: the first epoch whose end is averaged; it must be one of the fit's epochs.
        swa_lr: the lr of the SWA epochs (a number, or one per layer group); None keeps the fit's own schedule.
            From start_epoch on, the lr moves from its value at start_epoch to swa_lr over `anneal_epochs` epochs,
            as torch.optim.swa_utils.SWALR stepped at each epoch end (the fit's own schedule stops there).
        anneal_epochs: epochs of annealing (0: swa_lr from start_epoch on); default 10, SWALR's.
        anneal_strategy: 'cos' or 'linear'.

    Buffers are copied from the model at each update (AveragedModel's default, use_buffers=False), then the
    BatchNorm statistics are recomputed. Checkpoint saves the average, the count and the lr it annealed from, and
    fit(resume=...) continues them exactly. `swa.model` is the averaged copy (before its BatchNorm recompute).
    """

    def __init__(self, start_epoch, swa_lr=None, anneal_epochs=10, anneal_strategy='cos'):
        super().__init__(False)
        self.start_epoch = int_at_least(start_epoch, 'start_epoch', 'SWA', low=0)
        # plain floats: they reach the optimizer's groups and the checkpoint, which loads weights-only (no numpy)
        if isinstance(swa_lr, (list, tuple)):
            swa_lr = [real_value(v, 'swa_lr', 'SWA', low=0., low_open=True) for v in swa_lr]
        elif swa_lr is not None:
            swa_lr = real_value(swa_lr, 'swa_lr', 'SWA', low=0., low_open=True)
        self.swa_lr = swa_lr
        self.anneal_epochs = int_at_least(anneal_epochs, 'anneal_epochs', 'SWA', low=0)
        if anneal_strategy not in ANNEAL:
            raise ValueError(f"SWA: anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.anneal_strategy = anneal_strategy
        self._lrs = None

    def _weight(self):
        return 1. / (self.n_averaged + 1)  # an equal-weight running mean

    def before_fit(self, learn):
        if self.start_epoch >= learn.n_epoch:
            raise ValueError(f'SWA: start_epoch={self.start_epoch} is beyond this {learn.n_epoch}-epoch fit (its '
                             f'epochs are 0 to {learn.n_epoch - 1}); give a start_epoch below {learn.n_epoch}, or '
                             f'fit for more epochs')
        self._track(learn.model)
        self._lrs = None

    def resume_signature(self, learn):
        """SWA's lr schedule, which a resumed fit must repeat."""
        return {'type': 'SWA', 'start_epoch': self.start_epoch, 'swa_lr': self.swa_lr,
                'anneal_epochs': self.anneal_epochs, 'anneal_strategy': self.anneal_strategy}

    def before_batch(self, learn):
        if not learn.training or self.swa_lr is None or learn.epoch < self.start_epoch:
            return
        groups = learn.opt.param_groups
        if self._lrs is None:  # the first SWA batch: anneal from the lr each group has now
            start = [g['lr'] for g in groups]
            set_hyper(learn.opt, 'lr', self.swa_lr)  # swa_lr per layer group, as each param group takes it
            self._lrs = [[a, g['lr']] for a, g in zip(start, groups)]
        alpha = swa_alpha(learn.epoch - self.start_epoch, self.anneal_epochs, self.anneal_strategy)
        for g, (lr0, swa) in zip(groups, self._lrs):
            g['lr'] = swa * alpha + lr0 * (1 - alpha)  # SWALR's expression

    def after_epoch(self, learn):
        if learn.epoch >= self.start_epoch:
            self.update()

    def after_fit(self, learn):
        if learn.exception is not None:
            return
        if not self.n_averaged:
            warnings.warn(f'SWA: the fit stopped at epoch {learn.epoch}, before start_epoch={self.start_epoch}; '
                          f'nothing was averaged and the model keeps its weights')
            return
        # all or nothing: the model is not left with the average and half-estimated statistics
        with preserved(learn.model, ('weights', 'buffers')) as snap:
            self.apply(learn)
            recompute_bn(learn.model, learn.data.train_dl, learn.device)
            snap.discard()

    def state_dict(self):
        """The average, its count and the lrs the SWA epochs anneal between (restored on resume)."""
        return {**super().state_dict(), 'lrs': self._lrs}

    def load_state_dict(self, state):
        """Restore what `state_dict` returned."""
        super().load_state_dict(state)
        self._lrs = state['lrs']
