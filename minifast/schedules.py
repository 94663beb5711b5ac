"""Schedules as pure functions: (start, end, pct) -> value annealers, and step -> value schedules built from phases.

Phases follow torch's step convention (a phase ends at a fractional step index, and `pct` is measured between
phase ends), so a one-cycle schedule here equals torch.optim.lr_scheduler.OneCycleLR step for step.
"""
import math
from numbers import Number

__all__ = ['annealing_cos', 'annealing_linear', 'annealing_exp', 'annealing_no', 'ANNEALERS', 'Phase',
           'PhaseSchedule', 'one_cycle_schedule']


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


ANNEALERS = {'cos': annealing_cos, 'linear': annealing_linear, 'lin': annealing_linear, 'exp': annealing_exp,
             'no': annealing_no, None: annealing_no}


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
    final_div = div_factor * 1e4 if final_div is None else final_div
    scale = lambda v, d: v / d if isinstance(v, Number) else [x / d for x in v]  # noqa: E731
    start, low = scale(max_lr, div_factor), scale(max_lr, final_div)
    up = {'lr': (start, max_lr, anneal)}
    down = {'lr': (max_lr, low, anneal)}
    if moms is not None:
        up['mom'] = (moms[0], moms[1], anneal)
        down['mom'] = (moms[1], moms[0], anneal)
    phases = [Phase(float(pct_start * total_steps) - 1, up), Phase(total_steps - 1, down)]
    return PhaseSchedule(phases, total_steps)
