"""ParamScheduler: sets hyper-parameters every training step from a schedule (the fit_* policies of
minifast.policies are built on it); the Recorder records what was applied."""
import warnings

import numpy as np

from ..core import Callback
from ..optim import inert_decay, momentum_key, set_hyper

__all__ = ['ParamScheduler']


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
            warnings.warn(f'{type(learn.opt).__name__} has no momentum or betas: the schedule\'s momentum is ignored')
        if names is None or 'wd' not in names:  # decay that float32 cannot apply at any lr of this fit
            why = inert_decay(learn.opt, self._peak_lrs(learn), getattr(learn, 'true_wd', True))
            if why:
                warnings.warn(f'fit: {why}')

    def _total(self, learn):
        total = getattr(self.sched, 'total_steps', None)
        if total is None:
            try:
                total = self.start_step + learn.n_epoch * learn.steps_per_epoch()
            except TypeError:
                total = self.start_step + 1
        return int(total)

    def _peak_lrs(self, learn):
        """The highest scheduled lr of each layer group over the steps this fit will run (every step, or 5,000 spread
        over a longer schedule); None when the schedule sets no lr."""
        total = max(self._total(learn), self.start_step + 1)
        steps = np.unique(np.linspace(self.start_step, total - 1, min(total - self.start_step, 5000)).astype(int))
        n = max(g['layer_group'] for g in learn.opt.param_groups) + 1  # the schedule's values are per layer group
        peak = [None] * n
        for t in steps:
            lr = self.sched(int(t)).get('lr')
            if lr is None:
                return None  # a schedule without lr: the fit's lr holds
            lrs = list(lr) if isinstance(lr, (list, tuple, np.ndarray)) else [lr] * n
            peak = [float(x) if p is None else max(p, float(x)) for p, x in zip(peak, lrs)]
        return peak

    def resume_signature(self, learn):
        """The schedule as a resumed fit must repeat it: its length and its values at a few steps."""
        total = self._total(learn)
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
