"""ParamScheduler (sets hyper-parameters every training step from a schedule) and the fit_* policies built on it."""
from numbers import Number

from ..learner import Callback
from ..optim import lr_per_group, momentum_key, set_hyper
from ..schedules import one_cycle_schedule

__all__ = ['ParamScheduler', 'fit_one_cycle']


class ParamScheduler(Callback):
    """Before each training step, sets 'lr', 'mom' (SGD momentum or Adam beta1) and 'wd' of every parameter group
    to `sched(step)`, where step counts training steps from `start_step`. The Recorder records what was applied."""
    order = 10

    def __init__(self, sched, start_step=0):
        self.sched, self.start_step = sched, int(start_step)

    def before_fit(self, learn):
        names = set(self.sched.names) if hasattr(self.sched, 'names') else None
        self._skip_mom = momentum_key(learn.opt) is None  # e.g. Adagrad: no momentum to cycle
        if names is not None and 'mom' in names and self._skip_mom:
            import warnings
            warnings.warn(f'{type(learn.opt).__name__} has no momentum or betas: the schedule\'s momentum is ignored')

    def before_batch(self, learn):
        if not learn.training:
            return
        opt = learn.opt
        for name, v in self.sched(self.start_step + learn.train_iter).items():
            if name == 'mom' and self._skip_mom:
                continue
            set_hyper(opt, name, v)


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
    return moms


def fit_one_cycle(learn, cyc_len, max_lr=3e-3, moms=(0.95, 0.85), div_factor=25., pct_start=0.3, final_div=None,
                  wd=None, callbacks=None, tot_epochs=None, start_epoch=None):
    """Learner.fit_one_cycle's implementation (see its docstring)."""
    from ..learner import _as_list
    moms = _check_moms(moms, 'fit_one_cycle')
    from ..checks import check_fit
    cyc_len = check_fit(learn, cyc_len)
    try:
        n = len(learn.data.train_dl)
    except TypeError:
        raise TypeError('fit_one_cycle needs a training DataLoader with a length (the schedule is laid out in '
                        'steps)') from None
    tot = cyc_len if tot_epochs is None else int(tot_epochs)
    start = 0 if start_epoch is None else int(start_epoch)
    if start + cyc_len > tot:
        raise ValueError(f'fit_one_cycle: start_epoch {start} + cyc_len {cyc_len} exceeds tot_epochs {tot}')
    lrs = lr_per_group(max_lr, len(learn.layer_groups))
    sched = one_cycle_schedule(tot * n, lrs if len(lrs) > 1 else lrs[0], moms, div_factor, pct_start, final_div)
    learn.fit(cyc_len, lrs, wd=wd, callbacks=[ParamScheduler(sched, start * n), *_as_list(callbacks)])
