"""The LR range test: an exponential learning-rate sweep that leaves the learner exactly as it found it."""
import math
import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..determinism import rng_state, set_rng_state
from ..learner import Callback, CancelBatchException, CancelFitException, CancelValidateException, DivergenceError
from ..optim import group_lrs, set_hyper
from .recorder import ema_step

__all__ = ['LRFinder', 'LRFindResult', 'lr_find', 'suggest_steep', 'suggest_valley', 'suggest_minimum']


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


_LEARNER_STATE = ('epoch', 'n_epoch', 'train_iter', 'callbacks', 'interrupted', 'diverged', '_epoch_rng')


def _snapshot(learn):
    from ..learner import _LOOP_STATE
    model = learn.model
    return {
        'learner': {k: getattr(learn, k, None) for k in (*_LOOP_STATE, *_LEARNER_STATE)},
        'params': {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()},
        'buffers': {k: b.detach().clone() for k, b in model.named_buffers()},  # non-persistent ones too
        'grads': [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        'modes': [m.training for m in model.modules()],
        'opt': None if learn.opt is None else (learn.opt, _deep_clone(learn.opt.state_dict()), learn._wd),
        'rng': rng_state(),
        'scaler': None if getattr(learn, '_scaler', None) is None else learn._scaler.state_dict(),  # fp16
    }


def _deep_clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _deep_clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_deep_clone(v) for v in obj)
    return obj


def _restore(learn, snap):
    set_rng_state(snap['rng'])  # first: nothing below may leave the RNG streams moved
    for k, v in snap['learner'].items():
        setattr(learn, k, v)
    model = learn.model
    with torch.no_grad():
        for k, v in model.state_dict(keep_vars=True).items():
            v.copy_(snap['params'][k])
        for k, b in model.named_buffers():
            if k in snap['buffers']:
                b.copy_(snap['buffers'][k])
    for p, g in zip(model.parameters(), snap['grads']):
        p.grad = g
    for m, mode in zip(model.modules(), snap['modes']):
        m.training = mode
    if snap['opt'] is None:
        learn.opt = learn._wd = None  # the next fit builds a fresh optimizer, as it would have without lr_find
    else:
        opt, state, wd = snap['opt']
        opt.load_state_dict(state)  # moments and per-group hyper-parameters (lr, betas, wd) as they were
        learn.opt, learn._wd = opt, wd
    if snap.get('scaler') is not None and getattr(learn, '_scaler', None) is not None:
        learn._scaler.load_state_dict(snap['scaler'])  # the sweep's overflows must not lower the fit's loss scale


def lr_find(learn, start_lr=1e-7, end_lr=10, num_it=100, stop_div=True, wd=None):
    """Learner.lr_find's implementation (see its docstring)."""
    from .schedule import _steps_per_epoch
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
    epochs = math.ceil(num_it / n)
    finder = LRFinder(start_lr, end_lr, num_it, stop_div)
    snap = _snapshot(learn)
    interrupted = False
    try:
        # the sweep runs with the Recorder and the finder only: the user's callbacks (loggers, checkpoints,
        # early stopping) must neither see it nor write anything; those that shape a step (gradient accumulation
        # and clipping) stay, so each sweep step is a step as the fit would take it
        from .gradients import GradientAccumulation, GradientClipping
        learn.callbacks = [cb for cb in learn.callbacks if isinstance(cb, (GradientAccumulation, GradientClipping))]
        try:
            learn.fit(epochs, start_lr, wd=wd, callbacks=[finder])
        except DivergenceError:  # a non-finite loss ends the sweep (with or without stop_div); it is recorded
            finder.diverged = True
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        _restore(learn, snap)
        if interrupted:  # everything else is as before the sweep; the flag says the sweep was cut short
            learn.interrupted = True
    rec = learn.recorder
    lrs, losses = rec.lrs, rec.losses
    sug = suggestions(lrs, losses)
    if learn.is_main:
        print('LR Finder is complete, type learn.recorder.plot() to see the graph.')
    return LRFindResult(lrs, losses, diverged=finder.diverged, suggestions=sug, **sug)


def lr_find_distributed(learn, start_lr=1e-7, end_lr=10, num_it=100, stop_div=True, wd=None):
    """lr_find in distributed training: rank 0 sweeps alone (one process at the per-process batch size, over the
    whole training set) while the others wait; its result and Recorder history are then broadcast, so every rank
    returns the same LRFindResult and can plot it. An error on rank 0 is raised on every rank."""
    from ..distributed import broadcast_object
    res = err = rec = None
    if learn.is_main:
        try:
            with learn._local():
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
