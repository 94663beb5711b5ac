"""The LR range test's callback (an exponential learning-rate sweep), its result and its suggestions; `lr_find`
itself is in minifast.policies."""
import math
from dataclasses import dataclass, field

import numpy as np

from ..core import Callback, CancelBatchException, CancelFitException, CancelValidateException
from ..optim import group_lrs, set_hyper

__all__ = ['LRFinder', 'LRFindResult', 'ema_step', 'suggestions', 'suggest_steep', 'suggest_valley', 'suggest_minimum']

def ema_step(mov, value, beta, n):
    """One step of the debiased exponential moving average: (new average, debiased value after n values)."""
    mov = beta * mov + (1 - beta) * value
    return mov, mov / (1 - beta ** n)



class LRFinder(Callback):
    """Sets lr = start_lr * (end_lr / start_lr) ** (i / (num_it - 1)) at step i; no validation; stops after num_it
    steps, at the first loss that is not finite, or (stop_div) once the smoothed loss exceeds 4x its best."""
    order = 10

    def __init__(self, start_lr, end_lr, num_it=100, stop_div=True, beta=0.98):
        self.start_lr, self.end_lr, self.num_it, self.stop_div, self.beta = start_lr, end_lr, num_it, stop_div, beta

    def before_fit(self, learn):
        self.best, self._mov, self.diverged, self._stop = math.inf, 0., False, False
        self._start, self._end = group_lrs(learn, self.start_lr), group_lrs(learn, self.end_lr)

    def before_batch(self, learn):
        if not learn.training:
            return
        pos = learn.train_iter / max(self.num_it - 1, 1)
        set_hyper(learn.opt, 'lr', [s * (e / s) ** pos for s, e in zip(self._start, self._end)])

    def after_step(self, learn):
        i = learn.train_iter + 1
        self._stop = i >= self.num_it
        loss = learn.loss.item()  # the stop tests need the value now: one host sync per sweep step
        if not math.isfinite(loss):  # always the end of the sweep, whatever stop_div says; the Recorder (a later
            self.diverged = self._stop = True  # after_step hook) does not record it, as with the divergence check
            raise CancelBatchException()
        if self.stop_div:
            self._mov, smooth = ema_step(self._mov, loss, self.beta, i)
            if smooth > 4 * self.best:
                self.diverged = self._stop = True
            self.best = min(self.best, smooth)

    def after_batch(self, learn):
        if learn.training and self._stop:  # raised here, a closing event, so the Recorder still sees this step
            raise CancelFitException()

    def before_validate(self, learn):
        raise CancelValidateException()


def _finite(lrs, losses):
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    keep = np.isfinite(losses) & np.isfinite(lrs) & (lrs > 0)
    return lrs[keep], losses[keep]


def suggest_steep(lrs, losses):
    """The lr where the smoothed loss falls fastest per decade of lr; None with fewer than 3 finite points."""
    lrs, losses = _finite(lrs, losses)
    if len(lrs) < 3:
        return None
    slope = np.gradient(losses, np.log10(lrs))
    return float(lrs[int(np.argmin(slope))])


def suggest_minimum(lrs, losses):
    """A tenth of the lr at the lowest smoothed loss; None without finite points."""
    lrs, losses = _finite(lrs, losses)
    return float(lrs[int(np.argmin(losses))] / 10) if len(lrs) else None


def suggest_valley(lrs, losses):
    """fastai v2's 'valley' rule: take the longest (not necessarily contiguous) run of ever lower losses, and
    suggest the lr about halfway along it; None with fewer than 3 finite points."""
    lrs, losses = _finite(lrs, losses)
    n = len(losses)
    if n < 3:
        return None
    run = np.ones(n, dtype=int)  # run[i]: length of the longest decreasing subsequence ending at i
    for i in range(1, n):
        lower = losses[:i] > losses[i]
        if lower.any():
            run[i] = run[:i][lower].max() + 1
    end = int(np.argmax(run))  # first index reaching the longest run
    start = end - int(run[end])
    third = (end - start) / 3
    return float(lrs[max(start + int(third) + int(third / 2), 0)])


@dataclass
class LRFindResult:
    """What lr_find measured and suggests (each suggestion None when the data cannot support it)."""
    lrs: list
    losses: list
    steep: float = None
    valley: float = None
    minimum: float = None
    diverged: bool = False
    suggestions: dict = field(default_factory=dict)

    def __repr__(self):
        fmt = lambda v: 'None' if v is None else f'{v:.2e}'  # noqa: E731
        return (f'LRFindResult({len(self.lrs)} steps, steep={fmt(self.steep)}, valley={fmt(self.valley)}, '
                f'minimum={fmt(self.minimum)})')


def suggestions(lrs, losses, skip_start=None, skip_end=5):
    """The three suggestions on lrs/losses after dropping the first tenth (skip_start) and last `skip_end` points."""
    n = len(lrs)
    skip_start = n // 10 if skip_start is None else skip_start
    if n - skip_start - skip_end < 3:
        skip_start = skip_end = 0
    lr, ls = lrs[skip_start:n - skip_end], losses[skip_start:n - skip_end]
    return {'steep': suggest_steep(lr, ls), 'valley': suggest_valley(lr, ls), 'minimum': suggest_minimum(lr, ls)}
