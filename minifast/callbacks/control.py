"""Callbacks that steer a fit from the monitored values of each epoch: EarlyStopping, ReduceLROnPlateau and
SaveModelCallback (fastai v1 semantics; ReduceLROnPlateau decides as torch's ReduceLROnPlateau does).

Each reads this epoch's value of `monitor` ('train_loss', 'valid_loss' or a metric's name) from the Recorder in
after_epoch, keeps its counters in `state_dict()` (so a fit resumed from a Checkpoint decides as the uninterrupted one
would), and checks at before_fit that `monitor` is recorded. An epoch whose value was not computed (its validation
skipped by CancelEpochException) changes nothing; a NaN or infinite value is never an improvement (a first value of
inf counts as a bad epoch, as in torch, whose best starts at inf in min mode and -inf in max mode).
"""
import math
from numbers import Integral

from ..checks import real_value
from ..core import Callback, CancelFitException
from .schedule import ParamScheduler
from .tracking import check_monitor, monitor_mode

__all__ = ['EarlyStopping', 'ReduceLROnPlateau', 'SaveModelCallback', 'EarlyStoppingCallback',
           'ReduceLROnPlateauCallback']


def _epoch_value(learn, monitor):
    """This epoch's value of `monitor`, or None when it was not computed (a cancelled epoch)."""
    r = learn.recorder
    if monitor == 'train_loss':
        return r.train_losses[-1] if r.nb_batches and r.nb_batches[-1] else None
    if monitor == 'valid_loss':
        v = r.val_losses[-1]
    else:
        i, row = r.metrics_names.index(monitor), r.metrics[-1]
        v = row[i] if i < len(row) else None
    return None if v is None else float(v)


def _check_number(v, name, who, low=0., low_open=False, high=None, high_open=False):
    lo, hi = '(' if low_open else '[', ')' if high_open else ']'
    return real_value(v, name, who, low, high, low_open, high_open,
                      message=f"{who}: {name} must be a number in {lo}{low:g}, "
                              f"{'inf' if high is None else f'{high:g}'}{hi}, got {v!r}")


def _check_patience(patience, who):
    if not isinstance(patience, Integral) or isinstance(patience, bool) or patience < 0:
        raise ValueError(f'{who}: patience must be an integer >= 0 (epochs without improvement tolerated), got '
                         f'{patience!r}')
    return int(patience)


class _Monitor(Callback):
    """Shared by the three: the monitor and its mode, the best value so far and the improvement test."""
    order = 52  # after the Recorder (50): the epoch's values are there; before Checkpoint (90): it saves our state

    def __init__(self, learn, monitor, mode, min_delta=0.):
        super().__init__(learn)
        who = type(self).__name__
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"{who}: monitor must be a recorded name such as 'valid_loss', got {monitor!r}")
        self.monitor, self.mode = monitor, monitor_mode(monitor, mode)
        self.min_delta = _check_number(min_delta, 'min_delta', who)
        self.best = None

    def _check(self, learn):
        self.learn = learn
        check_monitor(learn, self.monitor, type(self).__name__)

    def improved(self, v):
        """Whether `v` beats the best so far by more than min_delta (NaN and +-inf never do; the first finite value
        does). `best` stays None until a finite value comes, which decides as torch's initial best of +-inf."""
        if v is None or not math.isfinite(v):
            return False
        if self.best is None:
            return True
        return v < self.best - self.min_delta if self.mode == 'min' else v > self.best + self.min_delta

    def _ran_out(self, learn):
        """After an epoch: an improvement becomes `best` and resets `wait`; a value not computed changes nothing;
        any other epoch adds one to `wait`. True when `wait` now exceeds `patience`."""
        v = _epoch_value(learn, self.monitor)
        if v is None:
            return False
        if self.improved(v):
            self.best, self.wait = v, 0
            return False
        self.wait += 1
        return self.wait > self.patience

    def _say(self, learn, msg):
        if not learn.silent and learn.is_main:
            print(msg, flush=True)


class EarlyStopping(_Monitor):
    """Stop the fit once `monitor` has not improved by more than `min_delta` for more than `patience` epochs.

    fastai v1's EarlyStoppingCallback: after each epoch, an improvement (lower for 'min', higher for 'max'; the
    first finite value always is one, NaN and +-inf never are) resets the wait to 0 and becomes `best`; any other
    epoch adds 1 to `wait`, and when wait > patience, after_epoch raises CancelFitException: every after_epoch hook
    still sees that epoch (Recorder, CSVLogger, Checkpoint), after_fit runs, and fit returns normally with the epochs
    trained in the Recorder's history (`learn.n_epoch` keeps the number asked for; `stopped_epoch` is the last epoch
    trained).

    Args:
        monitor: 'valid_loss', 'train_loss' or a metric's name; an unknown name fails at before_fit, listing the
            recorded names.
        min_delta: how much (absolute, >= 0) a value must beat the best by to count as an improvement.
        patience: epochs without improvement tolerated before stopping (0: stop at the first).
        mode: 'auto' (min for names holding 'loss' or 'error', max otherwise), 'min' or 'max'.
    """

    def __init__(self, learn=None, monitor='valid_loss', min_delta=0., patience=0, mode='auto'):
        super().__init__(learn, monitor, mode, min_delta)
        self.patience = _check_patience(patience, 'EarlyStopping')
        self.wait, self.stopped_epoch = 0, None

    def before_fit(self, learn):
        self._check(learn)
        self.best, self.wait, self.stopped_epoch = None, 0, None

    def before_epoch(self, learn):
        if self.stopped_epoch is not None:  # resumed from the checkpoint of the epoch that decided to stop
            raise CancelFitException()

    def after_epoch(self, learn):
        if self._ran_out(learn):
            self.stopped_epoch = learn.epoch
            best = 'no finite value' if self.best is None else self.best
            self._say(learn, f'Epoch {learn.epoch}: early stopping ({self.monitor} did not improve on {best} '
                             f'for {self.wait} epoch(s))')
            raise CancelFitException()

    def state_dict(self):
        """best, wait and the epoch that stopped the fit (restored on resume)."""
        return {'best': self.best, 'wait': self.wait, 'stopped_epoch': self.stopped_epoch}

    def load_state_dict(self, state):
        """Restore what `state_dict` returned."""
        self.best, self.wait, self.stopped_epoch = state['best'], state['wait'], state['stopped_epoch']


class ReduceLROnPlateau(_Monitor):
    """Multiply the learning rate of every parameter group by `factor` once `monitor` has not improved by more
    than `min_delta` for more than `patience` epochs.

    It decides as torch.optim.lr_scheduler.ReduceLROnPlateau(mode, factor, patience, threshold=min_delta,
    threshold_mode='abs', cooldown=0, min_lr, eps) stepped with each epoch's value: an improvement resets `wait`;
    any other epoch (NaN included) adds 1, also once the lr is at min_lr (fastai v1 stopped counting there); when
    wait > patience each group's lr becomes max(lr * factor, its min_lr), changed only when that lowers it by more
    than `eps`, and wait goes back to 0. Groups keep their ratios (discriminative lrs) until one reaches its floor.
    A group whose LayerGroup settings fix its lr (see `Learner.split`) keeps that lr: it is neither reduced nor
    scaled. An infinite value is a bad epoch as in torch; unlike torch, -inf in min mode (inf in max mode) is too.

    min_lr: a number is the floor of every parameter group (as torch's single min_lr); a sequence gives one floor
    per layer group (each parameter group takes its layer group's). The default 0.001 is fastai v1's.

    The new lr shows in the Recorder (`learn.recorder.lrs`, `plot_lr()`) from the next epoch's first step; each
    drop is also kept in `reductions` as (epoch, [lr of each parameter group]).

    With a schedule that sets the lr every step (fit_one_cycle, fit_sgdr, fit_warmup_cosine... any ParamScheduler
    whose schedule names 'lr'), the drops scale the schedule: each group's lr is the schedule's value times the
    group's `scales` entry, which each drop multiplies by new_lr / old_lr computed on the lr of the epoch's last
    step, as above (min_lr bounds that lr, not the schedule's later values). Without a schedule (`fit`), the lr is
    set once and the drops change it in place; so do they in the steps where a schedule does not set the lr (a
    TrainingPhase of fit_phases that names no 'lr'), while the steps it sets are scaled.
    """

    def __init__(self, learn=None, monitor='valid_loss', patience=0, factor=0.2, min_lr=0.001, min_delta=0.,
                 mode='auto', eps=1e-8):
        super().__init__(learn, monitor, mode, min_delta)
        who = 'ReduceLROnPlateau'
        self.patience = _check_patience(patience, who)
        self.factor = _check_number(factor, 'factor', who, low_open=True, high=1., high_open=True)
        if isinstance(min_lr, (list, tuple)):
            self.min_lr = [_check_number(v, 'min_lr', who) for v in min_lr]
        else:
            self.min_lr = _check_number(min_lr, 'min_lr', who)
        self.eps = _check_number(eps, 'eps', who)
        self.wait, self.scales, self.reductions, self._scaled, self._scheds = 0, None, [], False, []

    def _floors(self, groups):
        if not isinstance(self.min_lr, list):
            return [self.min_lr] * len(groups)
        n = max(g.get('layer_group', 0) for g in groups) + 1
        if len(self.min_lr) != n:
            raise ValueError(f'ReduceLROnPlateau: min_lr has {len(self.min_lr)} values but the learner has {n} layer '
                             f'groups')
        return [self.min_lr[g.get('layer_group', 0)] for g in groups]

    def before_fit(self, learn):
        self._check(learn)
        groups = learn.opt.param_groups
        self._floors(groups)  # a min_lr of the wrong length fails before training
        self.best, self.wait, self.reductions = None, 0, []
        self.scales = [1.] * len(groups)
        self._scheds = [cb for cb in (learn.hooks.cbs if learn.hooks is not None else ())
                        if isinstance(cb, ParamScheduler) and _sets_lr(cb)]
        self._scaled = bool(self._scheds)

    def before_batch(self, learn):
        if not (self._scaled and learn.training):
            return
        # after the ParamScheduler (order 10): scale the lr only when it set it for this step; otherwise the group
        # still holds the lr of the last step (or the one after_epoch lowered in place), already scaled
        if not any('lr' in cb.last_values for cb in self._scheds):
            return
        for g, s in zip(learn.opt.param_groups, self.scales):
            if s != 1. and not _fixed_lr(g):
                g['lr'] = g['lr'] * s

    def after_epoch(self, learn):
        if not self._ran_out(learn):
            return
        self.wait = 0
        groups = learn.opt.param_groups
        changed = False
        for i, (g, floor) in enumerate(zip(groups, self._floors(groups))):
            if _fixed_lr(g):
                continue
            old = float(g['lr'])
            new = max(old * self.factor, floor)
            if old - new > self.eps:
                g['lr'] = new
                self.scales[i] *= new / old
                changed = True
        if changed:
            lrs = [g['lr'] for g in groups]
            self.reductions.append((learn.epoch, lrs))
            self._say(learn, f"Epoch {learn.epoch}: reducing lr to {', '.join(f'{lr:.3g}' for lr in lrs)}")

    def state_dict(self):
        """best, wait, the groups' current lrs and schedule scales, and the drops so far (restored on resume)."""
        learn = getattr(self, 'learn', None)
        lrs = None if learn is None or learn.opt is None else [g['lr'] for g in learn.opt.param_groups]
        return {'best': self.best, 'wait': self.wait, 'scales': list(self.scales or []), 'lrs': lrs,
                'reductions': [[e, list(lrs)] for e, lrs in self.reductions]}

    def load_state_dict(self, state):
        """Restore what `state_dict` returned; without a schedule the groups get back the lrs they had."""
        self.best, self.wait, self.scales = state['best'], state['wait'], list(state['scales'])
        self.reductions = [(e, list(lrs)) for e, lrs in state['reductions']]
        learn = getattr(self, 'learn', None)
        if not self._scaled and state['lrs'] is not None and learn is not None and learn.opt is not None:
            for g, lr in zip(learn.opt.param_groups, state['lrs']):
                g['lr'] = lr


def _fixed_lr(g):
    """Whether param group `g` holds a fixed lr (a LayerGroup setting that fit, schedules and lr_find leave alone)."""
    return 'lr' in (g.get('fixed') or {})


def _sets_lr(cb):
    """Whether a ParamScheduler's schedule sets 'lr'."""
    names = getattr(cb.sched, 'names', None)
    if names is None:
        names = cb.sched(cb.start_step).keys()
    return 'lr' in names


class SaveModelCallback(_Monitor):
    """Save the model (with `learn.save`) when `monitor` improves, or after every epoch; load the best at the end.

    fastai v1's SaveModelCallback: every='improvement' writes learn.path/model_dir/`name`.pth after each epoch whose
    `monitor` beats the best so far (strictly; NaN and +-inf never do), and with `load_at_end` loads that file into the
    learner (model and optimizer) at after_fit, when the fit completed or was stopped by a CancelFitException
    (EarlyStopping), not after an error or interrupt. every='epoch' writes `name`_{epoch}.pth after every epoch
    and leaves the model as the last epoch made it (load_at_end does not apply).

    Files are written atomically by `learn.save` (model, optimizer, Recorder history, RNG states, callbacks' state)
    and read by `learn.load` (weights-only safe loading). In distributed training rank 0 writes and every rank
    waits for it before loading. Resumable: the best value and its epoch come back with a Checkpoint, so a resumed
    fit saves when the uninterrupted one would and loads the file the first run wrote if nothing better came.
    """
    order = 85  # before Checkpoint (90), after the loggers: its state and the files it names are written first

    def __init__(self, learn=None, monitor='valid_loss', every='improvement', name='bestmodel', mode='auto',
                 load_at_end=True):
        super().__init__(learn, monitor, mode)
        if every not in ('improvement', 'epoch'):
            raise ValueError(f"SaveModelCallback: every must be 'improvement' or 'epoch', got {every!r}")
        if not isinstance(name, str) or not name or '/' in name or name.endswith('.pth'):
            raise ValueError(f"SaveModelCallback: name must be a file name without '/' or '.pth' (saved as "
                             f'model_dir/name.pth), got {name!r}')
        self.every, self.name, self.load_at_end = every, name, bool(load_at_end)
        self.best_epoch = None

    def before_fit(self, learn):
        self.learn = learn
        if self.every == 'improvement':
            self._check(learn)
        self.best, self.best_epoch = None, None

    def after_epoch(self, learn):
        if self.every == 'epoch':
            learn.save(f'{self.name}_{learn.epoch}')
            return
        v = _epoch_value(learn, self.monitor)
        if self.improved(v):
            self.best, self.best_epoch = v, learn.epoch
            self._say(learn, f'Better model found at epoch {learn.epoch} with {self.monitor} value: {v}.')
            learn.save(self.name)

    def after_fit(self, learn):
        if self.every != 'improvement' or not self.load_at_end or self.best_epoch is None:
            return
        if learn.exception is not None:
            return  # an error or interrupt: leave the learner as it stopped
        learn.dist.barrier()  # under torchrun rank 0 may still be writing the last improvement
        learn.load(self.name)

    def state_dict(self):
        """The best value and its epoch (restored on resume)."""
        return {'best': self.best, 'best_epoch': self.best_epoch}

    def load_state_dict(self, state):
        """Restore what `state_dict` returned."""
        self.best, self.best_epoch = state['best'], state['best_epoch']


# fastai v1's names (pass the arguments by keyword: v1 put `mode` before min_delta/patience)
EarlyStoppingCallback = EarlyStopping
ReduceLROnPlateauCallback = ReduceLROnPlateau
