"""ParamScheduler (sets hyper-parameters every training step from a schedule) and the fit_* policies built on it.

Every policy lays its schedule out in training steps (steps per epoch = len(data.train_dl); in distributed training
the global steps, len of each rank's share; with GradientAccumulation optimizer steps, ceil(batches / n_step)) and
sets it before each step; the Recorder records what was applied.
`lr` (and the other per-group values) is a number, one number per layer group, or a slice, as in `Learner.fit`.
"""
import math
from numbers import Number

import numpy as np

from ..learner import Callback, CancelTrainException
from ..optim import group_lrs, lr_per_group, momentum_key, set_hyper
from ..schedules import (CLR_MODES, CyclicSchedule, GeneralSchedule, _int_at_least, _real, flat_cos_schedule,
                         one_cycle_schedule, sgdr_schedule, step_schedule, warmup_cosine_schedule)

__all__ = ['ParamScheduler', 'fit_one_cycle', 'fit_sgdr', 'fit_clr', 'fit_step', 'fit_exp', 'fit_warmup_cosine',
           'fit_fc', 'fit_phases']


class ParamScheduler(Callback):
    """Before each training step, sets 'lr', 'mom' (SGD momentum or Adam beta1) and 'wd' of every parameter group
    to `sched(step)`, where step counts training steps from `start_step`. The Recorder records what was applied."""
    order = 10

    def __init__(self, sched, start_step=0):
        self.sched, self.start_step = sched, int(start_step)

    def before_fit(self, learn):
        self.last_values = {}  # what before_batch set for the current step (ReduceLROnPlateau reads it)
        names = set(self.sched.names) if hasattr(self.sched, 'names') else None
        self._skip_mom = momentum_key(learn.opt) is None  # e.g. Adagrad: no momentum to cycle
        if names is not None and 'mom' in names and self._skip_mom:
            import warnings
            warnings.warn(f'{type(learn.opt).__name__} has no momentum or betas: the schedule\'s momentum is ignored')

    def resume_signature(self, learn):
        """The schedule as a resumed fit must repeat it: its length and its values at a few steps."""
        total = getattr(self.sched, 'total_steps', None)
        if total is None:
            try:
                total = self.start_step + learn.n_epoch * learn._train_len()
            except TypeError:
                total = self.start_step + 1
        steps = sorted({int(round(i * (total - 1) / 8)) for i in range(9)} | {self.start_step})
        return {'type': type(self.sched).__name__, 'start_step': self.start_step, 'total_steps': int(total),
                'samples': [(t, _plain(self.sched(t))) for t in steps]}

    def before_batch(self, learn):
        if not learn.training:
            return
        opt = learn.opt
        self.last_values = vals = self.sched(self.start_step + learn.train_iter)
        for name, v in vals.items():
            if name == 'mom' and self._skip_mom:
                continue
            set_hyper(opt, name, v)


def _plain(v):
    """Schedule values as Python floats, lists and dicts (numpy scalars would not load weights-only)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    return float(v)


def _check_moms(moms, where):
    if moms is None:
        return None
    if isinstance(moms, Number):
        raise TypeError(f'{where}: moms must be a (max, min) pair such as (0.95, 0.85), got the number {moms:g}. '
                        f'Note that moms=(0.99-0.90) is a subtraction, which Python evaluates to '
                        f'{0.99 - 0.90:.2f}; write moms=(0.99, 0.90).')
    moms = tuple(moms)
    if len(moms) != 2:
        raise ValueError(f'{where}: moms must be a (max, min) pair, got {len(moms)} values')
    for m in moms:  # a number, or one per layer group
        for v in (m if isinstance(m, (list, tuple, np.ndarray)) else [m]):
            if isinstance(v, bool) or not isinstance(v, Number) or not 0 <= v < 1:
                raise ValueError(f'{where}: moms must hold momentums in [0, 1) (SGD momentum or Adam beta1), '
                                 f'got {moms!r}')
    return moms


def fit_one_cycle(learn, cyc_len, max_lr=3e-3, moms=(0.95, 0.85), div_factor=25., pct_start=0.3, final_div=None,
                  wd=None, callbacks=None, tot_epochs=None, start_epoch=None, resume=None, clip=None):
    """Learner.fit_one_cycle's implementation (see its docstring)."""
    from ..checks import check_epochs
    from ..learner import _as_list
    moms = _check_moms(moms, 'fit_one_cycle')
    n = _steps_per_epoch(learn, cyc_len, 'fit_one_cycle', callbacks)
    # fastai v1: the cycle spans tot_epochs (default cyc_len); start_epoch jumps into it, and training stops where
    # the cycle ends, so fit_one_cycle(10, start_epoch=4) trains the last 6 epochs of a 10-epoch cycle
    tot = check_epochs(cyc_len if tot_epochs is None else tot_epochs, 'tot_epochs')
    start = 0 if start_epoch is None else check_epochs(start_epoch, 'start_epoch')
    epochs = min(check_epochs(cyc_len), tot - start)
    if epochs <= 0:
        raise ValueError(f'fit_one_cycle: start_epoch {start} is at or past the end of a {tot}-epoch cycle')
    lrs = group_lrs(learn, max_lr, 'max_lr')
    sched = one_cycle_schedule(tot * n, lrs if len(lrs) > 1 else lrs[0], moms, div_factor, pct_start, final_div)
    learn.fit(epochs, lrs, wd=wd, callbacks=[ParamScheduler(sched, start * n), *_as_list(callbacks)], resume=resume,
              clip=clip)


# ---- the other policies ----------------------------------------------------------------------------------------
def _steps_per_epoch(learn, epochs, where, callbacks=None):
    """Checks fit's arguments and returns the number of training (optimizer) steps in an epoch; `callbacks` are
    the coming call's (a GradientAccumulation there or in learn.callbacks makes a step n_step batches)."""
    from ..checks import check_fit
    check_fit(learn, epochs, labels=False)  # fit scans the labels (once) before any batch
    try:
        return learn._train_len(callbacks)  # in distributed training: global steps, len of this rank's share
    except TypeError:
        raise TypeError(f'{where} needs a training DataLoader with a length (the schedule is laid out in '
                        f'steps)') from None


def _groups(v, learn, name, where):
    """`v` (a number, one per layer group, or a slice) as a number when every group shares it, else a list."""
    kinds = (Number, slice, list, tuple, np.ndarray)
    if isinstance(v, bool) or not isinstance(v, kinds) or (isinstance(v, (list, tuple, np.ndarray))
                                                          and not all(isinstance(x, Number) for x in v)):
        raise TypeError(f'{where}: {name} must be a number, one number per layer group or a slice, got {v!r}')
    try:
        # every learning-rate value (lr, base_lr, eta_min, warmup_lr, min_lr...) follows layer_decay alike
        is_lr = name.endswith('lr') or name == 'eta_min'
        vals = group_lrs(learn, v, name) if is_lr else lr_per_group(v, len(learn.layer_groups), name)
    except ValueError as e:
        raise ValueError(f'{where}: {name}: {e}') from None
    return vals[0] if len(set(vals)) == 1 else vals


def _run(learn, epochs, lr, wd, callbacks, sched, *extra, resume=None, clip=None):
    from ..learner import _as_list
    learn.fit(epochs, lr, wd=wd, callbacks=[ParamScheduler(sched), *extra, *_as_list(callbacks)], resume=resume,
              clip=clip)


def fit_sgdr(learn, n_cycles, cycle_len, lr=3e-3, cycle_mult=2, eta_min=0., wd=None, callbacks=None, resume=None,
             clip=None):
    """SGDR: `n_cycles` cosine cycles from `lr` towards `eta_min`, cycle i lasting cycle_len * cycle_mult**i epochs,
    the lr restarting at `lr` after each (torch's CosineAnnealingWarmRestarts stepped every step). Trains
    cycle_len * (1 + cycle_mult + ... + cycle_mult**(n_cycles-1)) epochs."""
    where = 'fit_sgdr'
    n_cycles = _int_at_least(n_cycles, 'n_cycles', where)
    cycle_len = _int_at_least(cycle_len, 'cycle_len (epochs)', where)
    cycle_mult = _int_at_least(cycle_mult, 'cycle_mult', where)
    epochs = cycle_len * sum(cycle_mult ** i for i in range(n_cycles))
    n = _steps_per_epoch(learn, epochs, where, callbacks)
    lrs = _groups(lr, learn, 'lr', where)
    sched = sgdr_schedule(n_cycles, cycle_len * n, lrs, cycle_mult, _groups(eta_min, learn, 'eta_min', where))
    _run(learn, epochs, lr, wd, callbacks, sched, resume=resume, clip=clip)


def fit_clr(learn, epochs, base_lr, max_lr, step_size_up, step_size_down=None, mode='triangular', gamma=1.,
            cycle_momentum=True, base_momentum=0.8, max_momentum=0.9, wd=None, callbacks=None, resume=None,
            clip=None):
    """Smith's cyclical LR for `epochs` epochs: base_lr -> max_lr in `step_size_up` steps (not epochs), back in
    `step_size_down` (default: the same); mode 'triangular', 'triangular2' (height halved each cycle) or 'exp_range'
    (height times gamma**step). With cycle_momentum, momentum (Adam: beta1) moves max_momentum -> base_momentum ->
    max_momentum against the lr. Equals torch's CyclicLR with the same arguments, stepped every step. Smith suggests
    a step size of 2-10 epochs: step_size_up=4 * len(learn.data.train_dl)."""
    where = 'fit_clr'
    if mode not in CLR_MODES:
        raise ValueError(f"{where}: mode must be one of {', '.join(map(repr, CLR_MODES))}, got {mode!r}")
    epochs = _int_at_least(epochs, 'epochs', where)
    _real(step_size_up, 'step_size_up (steps)', where, low=0, low_open=True)
    if step_size_down is not None:
        _real(step_size_down, 'step_size_down (steps)', where, low=0)
    _real(gamma, 'gamma', where, low=0, low_open=True)
    _steps_per_epoch(learn, epochs, where, callbacks)
    sched = CyclicSchedule(_groups(base_lr, learn, 'base_lr', where), _groups(max_lr, learn, 'max_lr', where),
                           step_size_up, step_size_down, mode, gamma, cycle_momentum,
                           _groups(base_momentum, learn, 'base_momentum', where),
                           _groups(max_momentum, learn, 'max_momentum', where))
    _run(learn, epochs, base_lr, wd, callbacks, sched, resume=resume, clip=clip)


def fit_step(learn, epochs, lr, step_size, gamma=0.1, wd=None, callbacks=None, resume=None, clip=None):
    """Step decay: lr * gamma**(epoch // step_size), `step_size` in epochs (torch's StepLR stepped every epoch)."""
    where = 'fit_step'
    epochs = _int_at_least(epochs, 'epochs', where)
    step_size = _int_at_least(step_size, 'step_size (epochs)', where)
    gamma = _real(gamma, 'gamma', where, low=0, low_open=True)
    n = _steps_per_epoch(learn, epochs, where, callbacks)
    sched = step_schedule(epochs * n, _groups(lr, learn, 'lr', where), step_size * n, gamma)
    _run(learn, epochs, lr, wd, callbacks, sched, resume=resume, clip=clip)


def fit_exp(learn, epochs, lr, gamma, wd=None, callbacks=None, resume=None, clip=None):
    """Exponential decay: lr * gamma**epoch, constant within an epoch (torch's ExponentialLR stepped every epoch)."""
    where = 'fit_exp'
    epochs = _int_at_least(epochs, 'epochs', where)
    gamma = _real(gamma, 'gamma', where, low=0, low_open=True)
    n = _steps_per_epoch(learn, epochs, where, callbacks)
    sched = step_schedule(epochs * n, _groups(lr, learn, 'lr', where), n, gamma)
    _run(learn, epochs, lr, wd, callbacks, sched, resume=resume, clip=clip)


def fit_warmup_cosine(learn, epochs, lr=3e-3, warmup_epochs=1, warmup_lr=None, min_lr=0., wd=None, callbacks=None,
                      resume=None, clip=None):
    """Linear warm-up from `warmup_lr` (default lr/100) to `lr` over `warmup_epochs` (may be fractional), then cosine
    from `lr` towards `min_lr` over the remaining steps, updated every step. Equals torch's
    SequentialLR([LinearLR(start_factor=warmup_lr/lr, total_iters=W), CosineAnnealingLR(T_max=T-W, eta_min=min_lr)],
    milestones=[W]) stepped every step, W and T being the warm-up and total steps."""
    where = 'fit_warmup_cosine'
    epochs = _int_at_least(epochs, 'epochs', where)
    warmup_epochs = _real(warmup_epochs, 'warmup_epochs', where, low=0, high=epochs)
    n = _steps_per_epoch(learn, epochs, where, callbacks)
    lrs = _groups(lr, learn, 'lr', where)
    wlr = None if warmup_lr is None else _groups(warmup_lr, learn, 'warmup_lr', where)
    sched = warmup_cosine_schedule(epochs * n, lrs, warmup_epochs * n, wlr, _groups(min_lr, learn, 'min_lr', where))
    _run(learn, epochs, lr, wd, callbacks, sched, resume=resume, clip=clip)


def fit_fc(learn, epochs, lr=3e-3, pct_start=0.75, div_final=1e5, wd=None, callbacks=None, resume=None, clip=None):
    """Flat then cosine (fastai v2's fit_flat_cos): lr held for pct_start of the steps, then cosine annealing
    towards lr / div_final."""
    where = 'fit_fc'
    epochs = _int_at_least(epochs, 'epochs', where)
    pct_start = _real(pct_start, 'pct_start', where, low=0, high=1)
    div_final = _real(div_final, 'div_final', where, low=0, low_open=True)
    n = _steps_per_epoch(learn, epochs, where, callbacks)
    _run(learn, epochs, lr, wd, callbacks, flat_cos_schedule(epochs * n, _groups(lr, learn, 'lr', where), pct_start,
                                                             div_final), resume=resume, clip=clip)


class _StopAfter(Callback):
    """Ends training (the epoch still validates) once `n` training steps have run."""

    def __init__(self, n):
        self.n = n

    def after_batch(self, learn):
        if learn.training and learn.stepping and learn.train_iter + 1 >= self.n:
            raise CancelTrainException()


def fit_phases(learn, phases, lr=3e-3, wd=None, callbacks=None, resume=None, clip=None):
    """Train through `phases` (TrainingPhase objects, lengths in steps or epochs), then stop.

    Trains ceil(total steps / steps per epoch) epochs; when the phases end mid-epoch, training stops there and that
    epoch still validates. `lr` applies until a phase names 'lr'; a slice in a phase spreads across layer groups.
    """
    n = _steps_per_epoch(learn, 1, 'fit_phases', callbacks)
    sched = GeneralSchedule(phases, steps_per_epoch=n, n_groups=len(learn.layer_groups),
                            expand_lr=lambda v: group_lrs(learn, v))
    epochs = math.ceil(sched.total_steps / n)
    extra = [_StopAfter(sched.total_steps)] if sched.total_steps % n else []
    _run(learn, epochs, lr, wd, callbacks, sched, *extra, resume=resume, clip=clip)
