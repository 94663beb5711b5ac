"""Schedules as pure functions: (start, end, pct) -> value annealers, and step -> value schedules built from phases.

Two phase conventions live here, each matching its torch reference step for step:
- `Phase`/`PhaseSchedule` (one-cycle): a phase ends at a fractional step index and includes it, and `pct` is
  measured between phase ends, as torch.optim.lr_scheduler.OneCycleLR does.
- `TrainingPhase`/`GeneralSchedule` (every other policy, and your own): a phase lasts `length` steps (or epochs)
  and step k of it has pct = k / length, so it starts at its start value and stops just short of its end value,
  as torch's CosineAnnealingWarmRestarts, CyclicLR, SequentialLR(LinearLR, CosineAnnealingLR) and fastai v2 do.
A schedule is any object with `names` (the hyper-parameters it sets) and `__call__(step) -> {name: value}`, where a
value is a number or one number per layer group.
"""
import bisect
import math
from numbers import Number, Real

import numpy as np

from .checks import int_at_least, real_value
from .optim import lr_per_group

__all__ = ['annealing_cos', 'annealing_linear', 'annealing_exp', 'annealing_no', 'ANNEALERS', 'Phase',
           'PhaseSchedule', 'one_cycle_schedule', 'HYPERS', 'TrainingPhase', 'GeneralSchedule', 'sgdr_schedule',
           'CLR_MODES', 'CyclicSchedule', 'step_schedule', 'warmup_cosine_schedule', 'flat_cos_schedule']


def annealing_cos(start, end, pct):
    """Cosine from `start` (pct=0) to `end` (pct=1)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def annealing_linear(start, end, pct):
    """Straight line from `start` to `end`."""
    return (end - start) * pct + start


def annealing_exp(start, end, pct):
    """Geometric interpolation from `start` to `end` (both > 0)."""
    return start * (end / start) ** pct


def annealing_no(start, end, pct):
    """Constant `start`."""
    return start


ANNEALERS = {'cos': annealing_cos, 'cosine': annealing_cos, 'linear': annealing_linear, 'lin': annealing_linear,
             'exp': annealing_exp, 'no': annealing_no, None: annealing_no}


class Phase:
    """One phase of a schedule: it ends at step `end_step`; `values` maps a hyper-parameter name ('lr', 'mom',
    'wd') to (start, end, anneal), where start/end are numbers or one number per layer group."""

    def __init__(self, end_step, values):
        self.end_step = float(end_step)
        self.values = {k: (s, e, ANNEALERS.get(f, f)) for k, (s, e, f) in values.items()}

    def __repr__(self):
        return f'Phase(end_step={self.end_step}, {list(self.values)})'


def _at(start, end, fn, pct):
    if isinstance(start, Number) and isinstance(end, Number):
        return fn(start, end, pct)
    if isinstance(start, Number):
        start = [start] * len(end)
    elif isinstance(end, Number):
        end = [end] * len(start)
    return [fn(s, e, pct) for s, e in zip(start, end)]


class PhaseSchedule:
    """step -> {name: value or per-group values}: the phase holding `step` (the last one after the end) anneals
    each hyper-parameter it names from its start to its end."""

    def __init__(self, phases, total_steps):
        if not phases:
            raise ValueError('PhaseSchedule needs at least one phase')
        self.phases, self.total_steps = list(phases), int(total_steps)
        self.names = sorted({k for p in self.phases for k in p.values})

    def __call__(self, step):
        start = 0.0
        last = len(self.phases) - 1
        for i, ph in enumerate(self.phases):
            if step <= ph.end_step or i == last:
                span = ph.end_step - start
                pct = (step - start) / span if span else 1.0
                return {k: _at(s, e, fn, pct) for k, (s, e, fn) in ph.values.items()}
            start = ph.end_step

    def __repr__(self):
        return f'PhaseSchedule({self.total_steps} steps, {self.phases})'


def one_cycle_schedule(total_steps, max_lr, moms=(0.95, 0.85), div_factor=25., pct_start=0.3, final_div=None,
                       anneal='cos'):
    """Smith's 1cycle: lr warms from max_lr/div_factor to max_lr over pct_start of the steps, then anneals to
    max_lr/final_div (final_div defaults to div_factor*1e4); momentum moves moms[0] -> moms[1] -> moms[0].

    `max_lr` is a number or one number per layer group; `moms` None leaves momentum alone.
    """
    if total_steps < 1:
        raise ValueError(f'one_cycle_schedule: total_steps must be >= 1, got {total_steps}')
    if not 0 <= pct_start < 1:
        raise ValueError(f'one_cycle_schedule: pct_start must be in [0, 1), got {pct_start}')
    div_factor = real_value(div_factor, 'div_factor', 'one_cycle_schedule', low=0, low_open=True)
    final_div = div_factor * 1e4 if final_div is None else \
        real_value(final_div, 'final_div', 'one_cycle_schedule', low=0, low_open=True)
    scale = lambda v, d: v / d if isinstance(v, Number) else [x / d for x in v]  # noqa: E731
    start, low = scale(max_lr, div_factor), scale(max_lr, final_div)
    up = {'lr': (start, max_lr, anneal)}
    down = {'lr': (max_lr, low, anneal)}
    if moms is not None:
        up['mom'] = (moms[0], moms[1], anneal)
        down['mom'] = (moms[1], moms[0], anneal)
    phases = [Phase(float(pct_start * total_steps) - 1, up), Phase(total_steps - 1, down)]
    return PhaseSchedule(phases, total_steps)


# ---- phases by length: compose your own schedule --------------------------------------------------------------
HYPERS = ('lr', 'mom', 'wd')


def _annealer(anneal, where):
    if callable(anneal):
        return anneal
    try:
        return ANNEALERS[anneal]
    except (KeyError, TypeError):
        names = ', '.join(repr(k) for k in ANNEALERS if k is not None)
        raise ValueError(f'{where}: unknown anneal {anneal!r}; use one of {names} or a function '
                         f'(start, end, pct) -> value') from None


def _values(v, where, n_groups):
    """A number, or a list with one number per layer group (a list, tuple or array; a slice when n_groups is known)."""
    if isinstance(v, slice):
        if n_groups is None:
            raise ValueError(f'{where}: a slice needs the number of layer groups: pass n_groups (fit_phases does)')
        return [float(x) for x in lr_per_group(v, n_groups)]
    if isinstance(v, (list, tuple, np.ndarray)):
        vals = [float(x) for x in v]
        if n_groups is not None and len(vals) != n_groups:
            raise ValueError(f'{where}: {len(vals)} values but the learner has {n_groups} layer groups')
        return vals
    if isinstance(v, bool) or not isinstance(v, Real):
        raise ValueError(f'{where}: expected a number, one number per layer group or a slice, got {v!r}')
    return float(v)


def _scale(v, f):
    return v * f if isinstance(v, Number) else [x * f for x in v]


class TrainingPhase:
    """A phase of `length` training steps (or of `epochs` epochs) that anneals hyper-parameters ('lr', 'mom', 'wd').

    Give each hyper-parameter as a keyword or with `schedule_hp` (fastai v1's spelling). A tuple (start, end) or
    (start, end, anneal) anneals from start to end (linear unless `anneal` says otherwise: 'cos', 'linear', 'exp',
    'no' or a function (start, end, pct) -> value); anything else (a number, a list with one value per layer group,
    a slice for lr) is held constant. Step k of the phase has pct = k / length.
    """

    def __init__(self, length=None, epochs=None, **hypers):
        if (length is None) == (epochs is None):
            raise ValueError(f'TrainingPhase: give its length in steps (length=) or in epochs (epochs=), exactly one; '
                             f'got length={length!r}, epochs={epochs!r}')
        self.length = None if length is None else real_value(length, 'length', 'TrainingPhase', low=0)
        self.epochs = None if epochs is None else real_value(epochs, 'epochs', 'TrainingPhase', low=0)
        self.hypers = {}
        for name, vals in hypers.items():
            self.schedule_hp(name, vals)

    def schedule_hp(self, name, vals, anneal=None):
        """Anneal `name` over this phase: `vals` is (start, end), (start, end, anneal) or a value; returns self.

        As in fastai v1, a single value with an `anneal` anneals from that value to 0, and without one holds it.
        """
        where = f'TrainingPhase {name}'
        if name not in HYPERS:
            raise ValueError(f"TrainingPhase: unknown hyper-parameter {name!r}; use one of "
                             f"{', '.join(map(repr, HYPERS))}")
        if isinstance(vals, tuple):
            if len(vals) == 3:
                if anneal is not None:
                    raise ValueError(f'{where}: the anneal is given twice, in {vals!r} and as anneal={anneal!r}')
                start, end, anneal = vals
            elif len(vals) == 2:
                start, end = vals
                anneal = 'linear' if anneal is None else anneal
            else:
                raise ValueError(f'{where}: a tuple must be (start, end) or (start, end, anneal), got {len(vals)} '
                                 f'values; give one value per layer group as a list')
        elif anneal is None:
            start = end = vals
        else:
            start, end = vals, 0.
        self.hypers[name] = (start, end, _annealer(anneal, where))
        return self

    def __repr__(self):
        size = f'length={self.length:g}' if self.length is not None else f'epochs={self.epochs:g}'
        return f'TrainingPhase({size}, {list(self.hypers)})'


class GeneralSchedule:
    """step -> {name: value or per-group values} from consecutive TrainingPhases, each starting where the last ended.

    A hyper-parameter that a phase does not name holds the value the previous phase ended with (and is left alone
    until a phase names it). Phases of length 0 are skipped; after the last phase its end values hold.
    `steps_per_epoch` converts lengths given in epochs; `n_groups` expands slices; `expand_lr(value) -> per-group
    list`, when given, expands every 'lr' number or slice (fit_phases passes the learner's layer decay). Phase
    boundaries may fall between steps (a step belongs to the phase whose [start, end) holds it). `total_steps` is the
    number of steps covered.
    """

    def __init__(self, phases, steps_per_epoch=None, n_groups=None, expand_lr=None):
        phases = list(phases)
        if not phases:
            raise ValueError('GeneralSchedule needs at least one TrainingPhase')
        self.spans, end, carry = [], 0., {}
        for i, ph in enumerate(phases):
            if not isinstance(ph, TrainingPhase):
                raise TypeError(f'GeneralSchedule: phases[{i}] is {type(ph).__name__}, not a TrainingPhase')
            if ph.length is not None:
                length = ph.length
            elif steps_per_epoch is None:
                raise ValueError(f'GeneralSchedule: phases[{i}] lasts {ph.epochs:g} epochs; pass steps_per_epoch to '
                                 f'convert it to steps (fit_phases does)')
            else:
                length = ph.epochs * steps_per_epoch
            start, end = end, round(end + length, 9)  # 3 x 0.1 epoch x 10 steps ends at step 3, not 3.0000000000000004
            if end <= start:
                continue
            vals = dict(carry)
            for name, (s, e, fn) in ph.hypers.items():
                where = f'phases[{i}] {name}'
                if name == 'lr' and expand_lr is not None:
                    s, e = (v if isinstance(v, (list, tuple, np.ndarray)) else expand_lr(v) for v in (s, e))
                s, e = _values(s, where, n_groups), _values(e, where, n_groups)
                if not isinstance(s, Number) and not isinstance(e, Number) and len(s) != len(e):
                    raise ValueError(f'{where}: start has {len(s)} values but end has {len(e)}')
                vals[name] = (s, e, fn)
            for name, (s, e, fn) in vals.items():
                last = _at(s, e, fn, 1.)
                carry[name] = (last, last, annealing_no)
            self.spans.append((start, end, vals))
        if not self.spans:
            raise ValueError('GeneralSchedule: the phases last 0 steps')
        self._starts = [s for s, _, _ in self.spans]
        self.total_steps = math.ceil(end)
        self.names = sorted({k for _, _, v in self.spans for k in v})

    def __call__(self, step):
        start, end, vals = self.spans[max(bisect.bisect_right(self._starts, step) - 1, 0)]
        pct = min((step - start) / (end - start), 1.)
        return {k: _at(s, e, fn, pct) for k, (s, e, fn) in vals.items()}

    def __repr__(self):
        return f'GeneralSchedule({self.total_steps} steps, {len(self.spans)} phases, {self.names})'


# ---- the policies, in steps ------------------------------------------------------------------------------------
def sgdr_schedule(n_cycles, cycle_len, lr, cycle_mult=2, eta_min=0.):
    """SGDR (cosine annealing with warm restarts): cycle i lasts cycle_len * cycle_mult**i steps, its lr cosine from
    `lr` towards `eta_min`; equals torch's CosineAnnealingWarmRestarts(T_0=cycle_len, T_mult=cycle_mult, eta_min)."""
    where = 'sgdr_schedule'
    n_cycles = int_at_least(n_cycles, 'n_cycles', where)
    cycle_len = int_at_least(cycle_len, 'cycle_len', where)
    cycle_mult = int_at_least(cycle_mult, 'cycle_mult', where)
    return GeneralSchedule([TrainingPhase(cycle_len * cycle_mult ** i, lr=(lr, eta_min, 'cos'))
                            for i in range(n_cycles)])


CLR_MODES = ('triangular', 'triangular2', 'exp_range')


class CyclicSchedule:
    """Smith's cyclical learning rate: lr goes base_lr -> max_lr in `step_size_up` steps and back in `step_size_down`
    (default: the same), with the cycle's height scaled by `mode`: 'triangular' (constant), 'triangular2' (halved
    every cycle) or 'exp_range' (times gamma**step). Momentum, when cycled, moves the other way (max -> base -> max).
    Equals torch's CyclicLR with the same arguments, step for step."""

    def __init__(self, base_lr, max_lr, step_size_up, step_size_down=None, mode='triangular', gamma=1.,
                 cycle_momentum=True, base_momentum=0.8, max_momentum=0.9):
        where = 'CyclicSchedule'
        if mode not in CLR_MODES:
            raise ValueError(f"{where}: mode must be one of {', '.join(map(repr, CLR_MODES))}, got {mode!r}")
        up = real_value(step_size_up, 'step_size_up', where, low=0, low_open=True)
        down = up if step_size_down is None else real_value(step_size_down, 'step_size_down', where, low=0)
        self.gamma = real_value(gamma, 'gamma', where, low=0, low_open=True)
        self.base_lr, self.max_lr = _values(base_lr, f'{where} base_lr', None), _values(max_lr, f'{where} max_lr', None)
        self.mode, self.cycle_len, self.ratio = mode, up + down, up / (up + down)
        self.cycle_momentum = bool(cycle_momentum)
        if self.cycle_momentum:
            self.base_mom = _values(base_momentum, f'{where} base_momentum', None)
            self.max_mom = _values(max_momentum, f'{where} max_momentum', None)
        self.names = ['lr', 'mom'] if self.cycle_momentum else ['lr']

    def height(self, step):
        """Where `step` sits between base (0) and max (1) lr, after the mode's scaling."""
        pos = step / self.cycle_len
        cycle = math.floor(pos)
        x = pos - cycle  # fraction of the current cycle done
        h = x / self.ratio if x <= self.ratio else (1. - x) / (1. - self.ratio)
        if self.mode == 'triangular2':
            h /= 2. ** cycle
        elif self.mode == 'exp_range':
            h *= self.gamma ** step
        return h

    def __call__(self, step):
        h = self.height(step)
        out = {'lr': _at(self.base_lr, self.max_lr, annealing_linear, h)}
        if self.cycle_momentum:
            out['mom'] = _at(self.max_mom, self.base_mom, annealing_linear, h)
        return out

    def __repr__(self):
        return f'CyclicSchedule({self.mode}, {self.cycle_len:g} steps a cycle, {self.names})'


def step_schedule(total_steps, lr, step_size, gamma=0.1):
    """Step decay: lr * gamma**(step // step_size) for `total_steps` steps (torch's StepLR; with step_size one epoch
    of steps, torch's ExponentialLR stepped per epoch)."""
    where = 'step_schedule'
    total_steps = int_at_least(total_steps, 'total_steps', where)
    step_size = int_at_least(step_size, 'step_size', where)
    real_value(gamma, 'gamma', where, low=0, low_open=True)
    n = math.ceil(total_steps / step_size)
    return GeneralSchedule([TrainingPhase(min(step_size, total_steps - i * step_size), lr=_scale(lr, gamma ** i))
                            for i in range(n)])


def warmup_cosine_schedule(total_steps, lr, warmup_steps, warmup_lr=None, min_lr=0.):
    """Linear warm-up from `warmup_lr` (default lr/100) to `lr` over `warmup_steps`, then cosine from `lr` towards
    `min_lr` over the remaining steps; equals torch's SequentialLR([LinearLR(start_factor=warmup_lr/lr,
    total_iters=warmup_steps), CosineAnnealingLR(T_max=total_steps - warmup_steps, eta_min=min_lr)])."""
    where = 'warmup_cosine_schedule'
    total_steps = int_at_least(total_steps, 'total_steps', where)
    warmup_steps = real_value(warmup_steps, 'warmup_steps', where, low=0, high=total_steps)
    warmup_lr = _scale(lr, 0.01) if warmup_lr is None else warmup_lr
    return GeneralSchedule([TrainingPhase(warmup_steps, lr=(warmup_lr, lr, 'linear')),
                            TrainingPhase(total_steps - warmup_steps, lr=(lr, min_lr, 'cos'))])


def flat_cos_schedule(total_steps, lr, pct_start=0.75, div_final=1e5):
    """fastai v2's flat-cos: lr held for pct_start of the steps, then cosine towards lr / div_final."""
    where = 'flat_cos_schedule'
    total_steps = int_at_least(total_steps, 'total_steps', where)
    pct_start = real_value(pct_start, 'pct_start', where, low=0, high=1)
    div_final = real_value(div_final, 'div_final', where, low=0, low_open=True)
    flat = pct_start * total_steps
    return GeneralSchedule([TrainingPhase(flat, lr=lr),
                            TrainingPhase(total_steps - flat, lr=(lr, _scale(lr, 1 / div_final), 'cos'))])
