"""The LR range test's callback (an exponential learning-rate sweep), its result and its suggestions; `lr_find`
itself is in minifast.policies."""
import math
from dataclasses import dataclass, field

import numpy as np

from ..core import Callback, CancelBatchException, CancelFitException, CancelValidateException
from ..optim import group_lrs, set_hyper

__all__ = ['LRFinder', 'LRFindResult', 'ema_step', 'suggestions', 'suggest_steep', 'suggest_valley', 'suggest_minimum',
           'suggest_max_lr', 'curve_shape', 'CurveShape', 'start_level']

NOISE_K = 3        # a fall (or rise) is clear when it exceeds NOISE_K times the loss's step-to-step spread
HALF_WINDOW = 0.25  # decades of lr on each side of a point in the centred smoothing of curve_shape
RISE_DIV = 10      # without a clear descent, max_lr is the lr where the loss rises / RISE_DIV (Smith: "10 times less")

def ema_step(mov, value, beta, n):
    """One step of the debiased exponential moving average: (new average, debiased value after n values)."""
    mov = beta * mov + (1 - beta) * value
    return mov, mov / (1 - beta ** n)



class LRFinder(Callback):
    """Sets lr = start_lr * (end_lr / start_lr) ** (i / (num_it - 1)) at step i; no validation; stops after num_it
    steps, at the first loss that is not finite, or (stop_div) once the smoothed loss exceeds 4x its best or, after
    a real descent, has stayed risen (`plateau`) for half a decade of lr.

    A real descent: the running median of the loss over half a decade of lr fell below the start level (the median
    loss of the first tenth of the sweep, at least 5 steps) by more than 3 times the spread of those losses. Risen:
    that running median back above the midpoint between the start level and its lowest value. This ends sweeps
    like MNIST-1D's, where the loss jumps to a plateau at chance that never passes 4x the best and the sweep would
    otherwise run on to end_lr over a curve that says nothing more.
    """
    order = 10

    def __init__(self, start_lr, end_lr, num_it=100, stop_div=True, beta=0.98):
        self.start_lr, self.end_lr, self.num_it, self.stop_div, self.beta = start_lr, end_lr, num_it, stop_div, beta

    def before_fit(self, learn):
        self.best, self._mov, self.diverged, self.plateau, self._stop = math.inf, 0., False, False, False
        self._start, self._end = group_lrs(learn, self.start_lr), group_lrs(learn, self.end_lr)
        self._recent, self._level, self._risen, self._low = [], None, 0, math.inf
        decades = math.log10(self._end[-1] / self._start[-1])
        self._patience = max(3, round(0.5 * (self.num_it - 1) / decades)) if decades > 0 else self.num_it

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
            self._check_plateau(loss)

    def _check_plateau(self, loss):
        self._recent.append(loss)
        if self._level is None:  # still in the first tenth: collect the start level and its spread
            if len(self._recent) >= max(5, self.num_it // 10):
                self._level, self._spread = start_level(self._recent)
            return
        # the running median of the last half decade, not the EMA: that trails by ~50 steps and would take most of
        # a sweep to climb onto a plateau at the start level
        med = float(np.median(self._recent[-self._patience:]))
        self._low = min(self._low, med)
        drop = self._level - self._low
        if drop <= 3 * self._spread:  # no real descent yet: nothing to be past
            return
        self._risen = self._risen + 1 if med > self._low + drop / 2 else 0
        if self._risen >= self._patience:
            self.plateau = self._stop = True

    def after_batch(self, learn):
        if learn.training and self._stop:  # raised here, a closing event, so the Recorder still sees this step
            raise CancelFitException()

    def before_validate(self, learn):
        raise CancelValidateException()


def start_level(losses):
    """(median, robust spread) of `losses`: the level a sweep starts from and its step-to-step noise (1.4826 x the
    median absolute deviation, the standard deviation for Gaussian noise, unmoved by a few spikes)."""
    a = np.asarray(losses, dtype=float)
    med = float(np.median(a))
    return med, float(1.4826 * np.median(np.abs(a - med)))


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


def centred_smooth(losses, half):
    """A running median over +-half points, then a running mean over +-half points: no lag (the EMA of the
    Recorder's `losses` trails the raw loss by about 1/(1-beta) = 50 steps), and spikes do not move it."""
    a, n = np.asarray(losses, dtype=float), len(losses)
    med = np.array([np.median(a[max(0, i - half):i + half + 1]) for i in range(n)])
    return np.array([med[max(0, i - half):i + half + 1].mean() for i in range(n)])


@dataclass
class CurveShape:
    """What a sweep's raw losses show: the start level (median of the first tenth) and the step-to-step noise, the
    lowest point of the centred smoothing and the depth of the fall to it, whether that fall is clear (deeper than
    NOISE_K x the noise: a fall single steps cannot produce), and `onset`, the lr from which the smoothed loss stays
    clearly above the level it had before its lowest point, once it rises by more than NOISE_K x the noise (None if
    it never does). `half`: the smoothing's half window in steps (HALF_WINDOW decades of lr)."""
    start: float
    noise: float
    i_min: int
    lr_min: float
    depth: float
    clear: bool
    onset: float = None
    half: int = 1


def curve_shape(lrs, raw_losses):
    """The CurveShape of a sweep (lrs rising exponentially); None with fewer than 5 finite points."""
    lrs, raw = _finite(lrs, raw_losses)
    n = len(raw)
    if n < 5:
        return None
    step = float(np.median(np.diff(np.log10(lrs))))  # decades per step
    half = max(1, int(round(HALF_WINDOW / step))) if step > 0 else 1
    sm = centred_smooth(raw, half)
    start, _ = start_level(raw[:max(5, n // 10)])
    i_min = int(np.argmin(sm))
    _, noise = start_level((raw - sm)[:max(i_min + 1, 5, n // 10)])  # the spread about the trend, before the minimum
    depth = start - float(sm[i_min])
    # the rise: from where the smoothed loss stays clearly above the level of the curve before its lowest point,
    # clearly for the smoothed curve (an average of 2 * half + 1 steps: its noise is that much smaller)
    level, _ = start_level(raw[:i_min + 1])
    above = sm > level + NOISE_K * noise / math.sqrt(2 * half + 1)
    stays = np.flatnonzero(~above)  # the onset: the first point after the last one not clearly above that level
    j = 0 if not len(stays) else int(stays[-1]) + 1
    risen = j < n and sm[j:].max() > level + NOISE_K * noise  # and a clear rise: more than the steps' own noise
    return CurveShape(start, noise, i_min, float(lrs[i_min]), depth, depth > NOISE_K * noise,
                      float(lrs[j]) if risen else None, half)


def suggest_max_lr(lrs, raw_losses, shape=None):
    """(max_lr, note): Smith's rule for 1cycle's max_lr, read from the raw losses of a sweep (see LRFindResult);
    `shape`: their curve_shape when the caller has it already."""
    shape = curve_shape(lrs, raw_losses) if shape is None else shape
    if shape is None:
        return None, 'too few steps to read the curve (fewer than 5 finite losses)'
    if shape.clear:
        note = None
        if shape.onset is None and shape.i_min >= len(_finite(lrs, raw_losses)[0]) - 2:
            note = (f'the loss still falls at the end of the sweep: max_lr is its last lr ({shape.lr_min:.2e}); '
                    f'a sweep to a higher end_lr may show where it stops')
        return shape.lr_min, note
    fell = (f'no clear descent: the loss fell by {shape.depth:.3g} from {shape.start:.3g}, less than '
            f'{NOISE_K}x its step-to-step noise ({shape.noise:.3g})' if shape.depth > 0 else
            f'no clear descent: the loss never fell below its start level ({shape.start:.3g})')
    if shape.onset is not None:
        return shape.onset / RISE_DIV, (f'{fell}; max_lr is the lr where the loss rises clearly '
                                        f'({shape.onset:.2e}) / {RISE_DIV:g}; steep, valley and minimum are None')
    return None, f'{fell}, nor a clear rise: no suggestion (try a wider sweep or more steps)'


@dataclass
class LRFindResult:
    """What lr_find measured and suggests (each suggestion None when the data cannot support it).

    `max_lr` is the suggestion for fit_one_cycle, Smith's rule read from the raw losses with a centred smoothing
    (no lag): where the loss clearly falls (by more than 3x its step-to-step noise), the lr at the bottom of the
    fall, "the maximum lr where the loss still decreases"; where it does not, a tenth of the lr from which it stays
    clearly above its earlier level ("when the loss begins to increase, a value 10 times less"); None when it neither
    falls nor rises clearly. Chosen by benchmarks/lr_suggestions.py (1cycle trained at each rule's pick on digits,
    MNIST-1D and the built-in set: worst-case regret 0.1 points against the best of a max_lr grid; steep 6.1,
    valley 19.6).
    'steep', 'valley' and 'minimum' read the smoothed `losses` as fastai does; they are None when the loss shows no
    clear descent, and never come from the flat start or from past the lowest loss. `note` says in words when the
    curve is not a clean descent (and why max_lr is what it is); `plateau` when the sweep stopped on a plateau.
    """
    lrs: list
    losses: list
    steep: float = None
    valley: float = None
    minimum: float = None
    diverged: bool = False
    suggestions: dict = field(default_factory=dict)
    max_lr: float = None
    note: str = None
    plateau: bool = False
    raw_losses: list = None

    def __repr__(self):
        fmt = lambda v: 'None' if v is None else f'{v:.2e}'  # noqa: E731
        note = '' if self.note is None else f', note={self.note!r}'
        return (f'LRFindResult({len(self.lrs)} steps, max_lr={fmt(self.max_lr)}, steep={fmt(self.steep)}, '
                f'valley={fmt(self.valley)}, minimum={fmt(self.minimum)}{note})')


def suggestions(lrs, losses, skip_start=None, skip_end=5, raw_losses=None, shape=None):
    """The suggestions {'max_lr', 'steep', 'valley', 'minimum'}: max_lr from `raw_losses` (default: `losses`) over
    the whole sweep; the others on the smoothed `losses` after dropping the first tenth (skip_start) and last
    `skip_end` points, within the descent (from the last point within the noise of the start level to the lowest
    loss), and None when the raw losses show no clear descent. `shape`: the raw losses' curve_shape when the caller
    has it already."""
    raw = losses if raw_losses is None else raw_losses
    shape = curve_shape(lrs, raw) if shape is None else shape
    out = {'max_lr': suggest_max_lr(lrs, raw, shape)[0], 'steep': None, 'valley': None, 'minimum': None}
    if shape is None or not shape.clear:
        return out
    n = len(lrs)
    skip_start = n // 10 if skip_start is None else skip_start
    if n - skip_start - skip_end < 3:
        skip_start = skip_end = 0
    lr, ls = _finite(lrs[skip_start:n - skip_end], losses[skip_start:n - skip_end])
    if not len(ls):
        return out
    low = int(np.argmin(ls))
    # the flat start ends where the loss last stood within the noise of its start level
    top = np.flatnonzero(ls[:low + 1] >= shape.start - NOISE_K * shape.noise)
    first = int(top[-1]) if len(top) else 0
    out.update(steep=suggest_steep(lr[first:low + 1], ls[first:low + 1]),
               valley=suggest_valley(lr[:low + 1], ls[:low + 1]), minimum=suggest_minimum(lr, ls))
    return out
