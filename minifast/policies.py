"""The fit policies (fit_one_cycle, fit_sgdr, fit_clr, fit_step, fit_exp, fit_warmup_cosine, fit_flat_cos,
fit_phases) and the LR range test, as functions of the learner; `Learner` binds each as a method of the same name.

Every policy lays its schedule out in training steps (steps per epoch = len(data.train_dl); in distributed training
the global steps, len of each rank's share; with GradientAccumulation optimizer steps, ceil(batches / n_step)) and
sets it before each step through a ParamScheduler. `lr` (and the other per-group values) is a number, one number
per layer group, or a slice, as in `Learner.fit`. The arguments every policy shares are documented once, below
(`FIT_ARGS`), and passed to `learn.fit` in one place (`_run`).
"""
import math
import numbers
import warnings
from numbers import Number

import numpy as np

from .callbacks.gradients import GradientAccumulation, GradientClipping
from .callbacks.lr_finder import LRFinder, LRFindResult, curve_shape, suggest_max_lr, suggestions
from .callbacks.progress import interactive
from .callbacks.schedule import ParamScheduler
from .checks import check_epochs, check_fit, int_at_least, real_value
from .core import Callback, CancelTrainException, DivergenceError, as_list
from .distributed import broadcast_object, local
from .optim import group_lrs, lr_per_group
from .schedules import (CLR_MODES, CyclicSchedule, GeneralSchedule, flat_cos_schedule,
                        one_cycle_schedule, sgdr_schedule, step_schedule, warmup_cosine_schedule)
from .state import preserved

__all__ = ['fit_one_cycle', 'fit_sgdr', 'fit_clr', 'fit_step', 'fit_exp', 'fit_warmup_cosine', 'fit_flat_cos',
           'fit_fc', 'fit_phases', 'lr_find', 'FIT_ARGS']

FIT_ARGS = """
    Every policy also takes (as `Learner.fit` does):
        wd: weight decay (None keeps learn.wd).
        callbacks: callbacks for this call only.
        resume: continue an interrupted call exactly from a Checkpoint folder or file (see `Learner.fit`).
        clip: clip the gradients to this total norm before each step (see `Learner.fit`).
"""


def _policy(f):
    """Append the shared arguments' documentation (FIT_ARGS) to a policy's docstring."""
    f.__doc__ = (f.__doc__ or '').rstrip() + '\n' + FIT_ARGS
    return f


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


@_policy
def fit_one_cycle(learn, cyc_len, max_lr=3e-3, moms=(0.95, 0.85), div_factor=25., pct_start=0.3, final_div=None,
                  wd=None, callbacks=None, tot_epochs=None, start_epoch=None, resume=None, clip=None):
    """Train with Smith's 1cycle policy (fastai v1 semantics; every step equals torch's OneCycleLR).

    Args:
        cyc_len: epochs to train.
        max_lr: peak learning rate (a number, one per layer group, or slice(start, end) / slice(end)).
        moms: (max, min) momentum (beta1 for Adam): moms[0] -> moms[1] while the lr rises, back as it falls.
        div_factor: the lr starts at max_lr / div_factor.
        pct_start: fraction of the steps spent warming up.
        final_div: the lr ends at max_lr / final_div (default div_factor * 1e4).
        tot_epochs, start_epoch: lay the cycle over tot_epochs and start at start_epoch (to continue a run).
    """
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
    _run(learn, epochs, lrs, wd, callbacks, ParamScheduler(sched, start * n), resume=resume, clip=clip)


# ---- the other policies ----------------------------------------------------------------------------------------
def _steps_per_epoch(learn, epochs, where, callbacks=None):
    """Checks fit's arguments and returns the number of training (optimizer) steps in an epoch; `callbacks` are
    the coming call's (a GradientAccumulation there or in learn.callbacks makes a step n_step batches)."""
    check_fit(learn, epochs, labels=False)  # fit scans the labels (once) before any batch
    try:
        return learn.steps_per_epoch(callbacks)  # in distributed training: global steps, len of this rank's share
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
    """learn.fit with the schedule (a ParamScheduler, or a schedule for one), the policy's own callbacks and the
    call's: the tail every policy shares."""
    sched = sched if isinstance(sched, ParamScheduler) else ParamScheduler(sched)
    learn.fit(epochs, lr, wd=wd, callbacks=[sched, *extra, *as_list(callbacks)], resume=resume,
              clip=clip)


@_policy
def fit_sgdr(learn, n_cycles, cycle_len, lr=3e-3, cycle_mult=2, eta_min=0., wd=None, callbacks=None, resume=None,
             clip=None):
    """SGDR: `n_cycles` cosine cycles from `lr` towards `eta_min`, cycle i lasting cycle_len * cycle_mult**i epochs,
    the lr restarting at `lr` after each (torch's CosineAnnealingWarmRestarts stepped every step). Trains
    cycle_len * (1 + cycle_mult + ... + cycle_mult**(n_cycles-1)) epochs."""
    where = 'fit_sgdr'
    n_cycles = int_at_least(n_cycles, 'n_cycles', where)
    cycle_len = int_at_least(cycle_len, 'cycle_len (epochs)', where)
    cycle_mult = int_at_least(cycle_mult, 'cycle_mult', where)
    epochs = cycle_len * sum(cycle_mult ** i for i in range(n_cycles))
    n = _steps_per_epoch(learn, epochs, where, callbacks)
    lrs = _groups(lr, learn, 'lr', where)
    sched = sgdr_schedule(n_cycles, cycle_len * n, lrs, cycle_mult, _groups(eta_min, learn, 'eta_min', where))
    _run(learn, epochs, lr, wd, callbacks, sched, resume=resume, clip=clip)


@_policy
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
    epochs = int_at_least(epochs, 'epochs', where)
    real_value(step_size_up, 'step_size_up (steps)', where, low=0, low_open=True)
    if step_size_down is not None:
        real_value(step_size_down, 'step_size_down (steps)', where, low=0)
    real_value(gamma, 'gamma', where, low=0, low_open=True)
    _steps_per_epoch(learn, epochs, where, callbacks)
    sched = CyclicSchedule(_groups(base_lr, learn, 'base_lr', where), _groups(max_lr, learn, 'max_lr', where),
                           step_size_up, step_size_down, mode, gamma, cycle_momentum,
                           _groups(base_momentum, learn, 'base_momentum', where),
                           _groups(max_momentum, learn, 'max_momentum', where))
    _run(learn, epochs, base_lr, wd, callbacks, sched, resume=resume, clip=clip)


@_policy
def fit_step(learn, epochs, lr, step_size, gamma=0.1, wd=None, callbacks=None, resume=None, clip=None):
    """Step decay: lr * gamma**(epoch // step_size), `step_size` in epochs (torch's StepLR stepped every epoch)."""
    where = 'fit_step'
    epochs = int_at_least(epochs, 'epochs', where)
    step_size = int_at_least(step_size, 'step_size (epochs)', where)
    gamma = real_value(gamma, 'gamma', where, low=0, low_open=True)
    n = _steps_per_epoch(learn, epochs, where, callbacks)
    sched = step_schedule(epochs * n, _groups(lr, learn, 'lr', where), step_size * n, gamma)
    _run(learn, epochs, lr, wd, callbacks, sched, resume=resume, clip=clip)


@_policy
def fit_exp(learn, epochs, lr, gamma, wd=None, callbacks=None, resume=None, clip=None):
    """Exponential decay: lr * gamma**epoch, constant within an epoch (torch's ExponentialLR stepped every epoch)."""
    where = 'fit_exp'
    epochs = int_at_least(epochs, 'epochs', where)
    gamma = real_value(gamma, 'gamma', where, low=0, low_open=True)
    n = _steps_per_epoch(learn, epochs, where, callbacks)
    sched = step_schedule(epochs * n, _groups(lr, learn, 'lr', where), n, gamma)
    _run(learn, epochs, lr, wd, callbacks, sched, resume=resume, clip=clip)


@_policy
def fit_warmup_cosine(learn, epochs, lr=3e-3, warmup_epochs=1, warmup_lr=None, min_lr=0., wd=None, callbacks=None,
                      resume=None, clip=None):
    """Linear warm-up from `warmup_lr` (default lr/100) to `lr` over `warmup_epochs` (may be fractional), then cosine
    from `lr` towards `min_lr` over the remaining steps, updated every step. Equals torch's
    SequentialLR([LinearLR(start_factor=warmup_lr/lr, total_iters=W), CosineAnnealingLR(T_max=T-W, eta_min=min_lr)],
    milestones=[W]) stepped every step, W and T being the warm-up and total steps."""
    where = 'fit_warmup_cosine'
    epochs = int_at_least(epochs, 'epochs', where)
    warmup_epochs = real_value(warmup_epochs, 'warmup_epochs', where, low=0, high=epochs)
    n = _steps_per_epoch(learn, epochs, where, callbacks)
    lrs = _groups(lr, learn, 'lr', where)
    wlr = None if warmup_lr is None else _groups(warmup_lr, learn, 'warmup_lr', where)
    sched = warmup_cosine_schedule(epochs * n, lrs, warmup_epochs * n, wlr, _groups(min_lr, learn, 'min_lr', where))
    _run(learn, epochs, lr, wd, callbacks, sched, resume=resume, clip=clip)


@_policy
def fit_flat_cos(learn, epochs, lr=3e-3, pct_start=0.75, final_div=None, wd=None, callbacks=None, resume=None,
                 clip=None, div_final=None):
    """Flat then cosine (fastai v2's fit_flat_cos; also `fit_fc`): lr held for pct_start of the steps, then cosine
    annealing towards lr / final_div (default 1e5; `div_final` is its older name)."""
    where = 'fit_fc'
    if final_div is not None and div_final is not None:
        raise TypeError(f'{where}: give final_div or its older name div_final, not both')
    div_final = 1e5 if final_div is None and div_final is None else final_div if final_div is not None else div_final
    epochs = int_at_least(epochs, 'epochs', where)
    pct_start = real_value(pct_start, 'pct_start', where, low=0, high=1)
    div_final = real_value(div_final, 'div_final', where, low=0, low_open=True)
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


@_policy
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


fit_fc = fit_flat_cos  # the older name


# ---- the LR range test ---------------------------------------------------------------------------------------
# learner attributes a sweep changes besides the model and optimizer: put back afterwards, like them
_SWEEP_ATTRS = ('state', 'epoch', 'n_epoch', 'train_iter', 'callbacks', 'interrupted', 'diverged', 'epoch_rng',
                'fit_args')


def lr_find(learn, start_lr=1e-7, end_lr=10, num_it=100, stop_div=True, wd=None):
    """LR range test: one step per learning rate, exponentially from start_lr to end_lr; restores everything.

    Args:
        start_lr, end_lr: the sweep's ends (numbers, or one per layer group).
        num_it: steps in the sweep (over as many epochs as that needs; no validation). A GradientAccumulation or
            GradientClipping in learn.callbacks stays for the sweep: a step is then n_step batches.
        stop_div: stop once the smoothed loss exceeds 4x its best, or has stayed risen for half a decade of lr after
            a real descent (a plateau: see LRFinder), or any loss is not finite.
        wd: weight decay during the sweep (None keeps learn.wd).

    Model parameters and buffers, optimizer state and hyper-parameters, and the RNG states (torch, CUDA, numpy,
    random) are restored afterwards, also when the sweep is interrupted, and nothing is written to disk. The
    sweep stays in `learn.recorder` for `learn.recorder.plot(suggestion=True)`; the returned LRFindResult holds
    `max_lr` (the suggestion for fit_one_cycle), the 'steep', 'valley' and 'minimum' suggestions, and a `note` (also
    printed) when the curve shows no clear descent. In distributed training rank 0 sweeps alone (one process at
    the per-process batch size, over the whole training set) while the others wait; its result and Recorder
    history are then broadcast, so every rank returns the same LRFindResult. An error on rank 0 is raised on
    every rank.

    The sweep shows a progress bar, no epoch table, where bars can redraw (a notebook, a terminal). In a notebook
    or at an interactive prompt it ends with fastai v1's line 'LR Finder is complete, type learn.recorder.plot() to
    see the graph.'; not in scripts or the `minifast` command, nor with silent=True.
    """
    if learn.dist.world > 1:
        return _lr_find_distributed(learn, start_lr, end_lr, num_it, stop_div, wd)
    if isinstance(num_it, bool) or not isinstance(num_it, numbers.Integral) or num_it < 2:
        raise ValueError(f'lr_find: num_it must be an integer of at least 2, got {num_it!r}')
    starts, ends = group_lrs(learn, start_lr, 'start_lr'), group_lrs(learn, end_lr, 'end_lr')
    if not all(0 < s < e for s, e in zip(starts, ends)):  # the sweep is exponential and rises
        raise ValueError(f'lr_find: the sweep needs 0 < start_lr < end_lr (for every layer group), got '
                         f'start_lr={start_lr!r}, end_lr={end_lr!r}')
    n = _steps_per_epoch(learn, 1, 'lr_find')
    head = learn.layer_groups[-1]
    if learn.is_main and any(k in getattr(head, 'settings', {}) for k in ('lr', 'lr_mult')):
        warnings.warn('lr_find: the last layer group has a fixed lr or an lr_mult, so the recorded lrs (and the '
                      'suggestions) are the values applied to it, not the values you would pass to fit')
    finder = LRFinder(start_lr, end_lr, num_it, stop_div)
    interrupted = False
    try:
        with preserved(learn, attrs=_SWEEP_ATTRS), learn.progress.bars_only():
            # the sweep runs with the Recorder and the finder only: the user's callbacks (loggers, checkpoints,
            # early stopping) must neither see it nor write anything; those that shape a step (gradient
            # accumulation and clipping) stay, so each sweep step is a step as the fit would take it
            learn.callbacks = [cb for cb in learn.callbacks
                               if isinstance(cb, (GradientAccumulation, GradientClipping))]
            try:
                learn.fit(math.ceil(num_it / n), start_lr, wd=wd, callbacks=[finder])
            except DivergenceError:  # a non-finite loss ends the sweep (with or without stop_div); it is recorded
                finder.diverged = True
    except KeyboardInterrupt:  # everything else is as before the sweep; the flag says the sweep was cut short
        interrupted = True
        raise
    finally:
        if interrupted:
            learn.interrupted = True
    rec = learn.recorder
    shape = curve_shape(rec.lrs, rec.raw_losses)  # read once: the suggestions and the note both come from it
    sug = suggestions(rec.lrs, rec.losses, raw_losses=rec.raw_losses, shape=shape)
    if learn.is_main and not learn.silent and interactive():  # fastai v1's hint, where it can be followed
        print('LR Finder is complete, type learn.recorder.plot() to see the graph.')
    res = LRFindResult(rec.lrs, rec.losses, diverged=finder.diverged, suggestions=sug, plateau=finder.plateau,
                       note=suggest_max_lr(rec.lrs, rec.raw_losses, shape)[1], raw_losses=rec.raw_losses, **sug)
    if learn.is_main and res.note and not learn.silent:
        print(f'lr_find: {res.note}')
    return res


def _lr_find_distributed(learn, start_lr, end_lr, num_it, stop_div, wd):
    """lr_find under torchrun: rank 0 sweeps as a single process, then broadcasts (see lr_find)."""
    res = err = rec = None
    if learn.is_main:
        try:
            with local(learn):
                res = lr_find(learn, start_lr, end_lr, num_it, stop_div, wd)
            rec = learn.recorder.state_dict()
        except Exception as e:  # the other ranks wait in the broadcast below: tell them
            err = e
    res, rec, msg = broadcast_object((res, rec, None if err is None else f'{type(err).__name__}: {err}'))
    if err is not None:
        raise err
    if msg is not None:
        raise RuntimeError(f'lr_find failed on rank 0: {msg}')
    if not learn.is_main:
        learn.recorder.load_state_dict(rec)
    return res
