"""The one snapshot/restore primitive: whatever changes a learner temporarily (lr_find, warmup, the resume rollback,
the first-batch check, the loss-landscape analyses) takes a `Snapshot` first and restores it afterwards, also on an
error or Ctrl-C; a Ctrl-C pressed during the restore itself is held back until it is done (`holding_sigint`)."""
import contextlib
import signal
import threading

import torch
from torch import nn

from .determinism import rng_state, set_rng_state

__all__ = ['Snapshot', 'preserved', 'holding_sigint', 'deep_clone', 'LiveCopy']

PARTS = ('weights', 'buffers', 'grads', 'modes', 'trainable', 'momenta', 'opt', 'scaler', 'stepper', 'rng')
MODEL_PARTS = ('weights', 'buffers', 'grads', 'modes', 'trainable', 'momenta', 'rng')  # a bare model has these


@contextlib.contextmanager
def holding_sigint():
    """Holds a Ctrl-C back while the body runs (putting a model back: a second, impatient Ctrl-C must not leave
    it half restored), then hands it to the handler that was in charge. Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if held:
            if callable(old):
                old(signal.SIGINT, held[0])
            elif old != signal.SIG_IGN:  # SIG_DFL, or None for a handler installed outside Python
                raise KeyboardInterrupt


def deep_clone(obj):
    """A copy of nested dicts, lists and tuples in which every tensor is cloned (an optimizer's state_dict)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: deep_clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(deep_clone(v) for v in obj)
    return obj


class Snapshot:
    """A copy of what a learner's training changes, taken by `Snapshot.take(learn, parts)` and put back in place by
    `restore()`.

    Parts: 'weights' (the model's state dict: parameters and persistent buffers), 'buffers' (every buffer, the
    non-persistent ones too), 'grads' (the gradients, as tensors or None), 'modes' (each module's train/eval mode),
    'trainable' (each parameter's requires_grad), 'momenta' (each BatchNorm layer's momentum, which a BatchNorm
    recompute sets to None), 'opt' (the optimizer object, its state and hyper-parameters, and the learner's
    weight-decay stepper; none: the next fit builds a new one), 'scaler' (the fp16 GradScaler's state), 'stepper'
    (the stepper's accumulation state), 'rng' (torch, CUDA, numpy and random). `attrs` names learner attributes to
    keep as they are (by reference); 'state' there is the loop's per-pass state. `learn` may also be a bare model
    (an nn.Module), for the parts in MODEL_PARTS.
    """

    def __init__(self, learn, parts, attrs, saved):
        self.learn, self.parts, self.attrs, self.saved = learn, parts, attrs, saved

    @classmethod
    def take(cls, learn, parts=PARTS, attrs=()):
        """Copy `parts` of `learn` (see the class) and the learner attributes `attrs`."""
        bad = sorted(set(parts) - set(PARTS))
        if bad:
            raise ValueError(f'Snapshot.take: unknown parts {bad}; the parts are {PARTS}')
        bare = isinstance(learn, nn.Module)
        if bare and (set(parts) - set(MODEL_PARTS) or attrs):
            raise ValueError(f'Snapshot.take: a bare model has only the parts {MODEL_PARTS} and no attributes to '
                             f'keep; got parts {tuple(parts)} and attrs {tuple(attrs)} (give the learner)')
        model, saved = _model(learn), {}
        if 'weights' in parts:
            saved['weights'] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if 'buffers' in parts:
            saved['buffers'] = {k: b.detach().clone() for k, b in model.named_buffers()}
        if 'grads' in parts:
            saved['grads'] = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
        if 'modes' in parts:
            saved['modes'] = [m.training for m in model.modules()]
        if 'trainable' in parts:
            saved['trainable'] = [p.requires_grad for p in model.parameters()]
        if 'momenta' in parts:
            saved['momenta'] = [(m, m.momentum) for m in model.modules()
                                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if 'opt' in parts:
            opt = learn.opt
            saved['opt'] = None if opt is None else (opt, deep_clone(opt.state_dict()), learn.stepper.decay)
        if 'scaler' in parts:
            saved['scaler'] = learn.stepper.state_dict()
        if 'stepper' in parts:
            saved['stepper'] = {k: v for k, v in vars(learn.stepper).items() if k not in ('scaler', 'decay')}
        if 'rng' in parts:
            saved['rng'] = rng_state()
        return cls(learn, tuple(parts), {k: getattr(learn, k, None) for k in attrs}, saved)

    def discard(self, parts=None):
        """Forget what was taken (of `parts` only, when given): a later `restore` (the end of `preserved`) does not
        put it back."""
        if parts is None:
            self.saved, self.attrs = {}, {}
        else:
            self.saved = {k: v for k, v in self.saved.items() if k not in parts}

    def restore(self):
        """Put every part back in place (the tensors are copied in: the model keeps its own tensors). A Ctrl-C
        pressed meanwhile is held back until everything is back, then handed on (`holding_sigint`)."""
        with holding_sigint():
            self._put_back()

    def _put_back(self):
        learn, s = self.learn, self.saved
        model = _model(learn)
        if 'rng' in s:
            set_rng_state(s['rng'])  # first: nothing below may leave the RNG streams moved
        for k, v in self.attrs.items():
            setattr(learn, k, v)
        with torch.no_grad():
            if 'weights' in s:
                for k, v in model.state_dict(keep_vars=True).items():
                    v.copy_(s['weights'][k])
            if 'buffers' in s:
                for k, b in model.named_buffers():
                    if k in s['buffers']:
                        b.copy_(s['buffers'][k])
        if 'grads' in s:
            for p, g in zip(model.parameters(), s['grads']):
                p.grad = g
        if 'modes' in s:
            for m, mode in zip(model.modules(), s['modes']):
                m.training = mode
        if 'trainable' in s:
            for p, train in zip(model.parameters(), s['trainable']):
                p.requires_grad_(train)
        for m, momentum in s.get('momenta', ()):
            m.momentum = momentum
        if 'opt' in s:
            if s['opt'] is None:
                learn.opt = learn.stepper.decay = None  # the next fit builds a fresh optimizer
            else:
                opt, state, decay = s['opt']
                opt.load_state_dict(state)  # moments and per-group hyper-parameters (lr, betas, wd) as they were
                learn.opt, learn.stepper.decay = opt, decay
        if 'stepper' in s:
            vars(learn.stepper).update(s['stepper'])
        if 'scaler' in s:
            learn.stepper.load_state_dict(s['scaler'])  # e.g. a sweep's overflows must not lower the loss scale


def _model(learn):
    """The model of a learner, or `learn` itself when it is a bare model."""
    return learn if isinstance(learn, nn.Module) else learn.model


@contextlib.contextmanager
def preserved(learn, parts=PARTS, attrs=()):
    """Run the body, then restore `parts` and `attrs` of `learn` (see `Snapshot`), also on an error or Ctrl-C; a
    Ctrl-C pressed during the restore waits until it is done (then raises, or goes to the handler in charge).
    Yields the snapshot."""
    snap = Snapshot.take(learn, parts, attrs)
    try:
        yield snap
    finally:
        snap.restore()


class LiveCopy:
    """A copy of the model's and optimizer's state kept on their device and refreshed in place: one foreach copy
    per `refresh`, into the tensors of the previous copy (no new memory once the optimizer's state exists), and no
    host sync. DivergenceGuard keeps the last verified weights in one; `restore` puts them back. `step` is the
    learner's train_iter at the last refresh."""

    def __init__(self):
        self._key = self._ts = self._saved = self.step = None

    def live(self, learn):
        """(the model's state tensors, [(param, key, tensor)] of the optimizer's state): what a snapshot copies.
        Kept between checks, and rebuilt when the optimizer's state grows (its first step creates it)."""
        opt = learn.opt
        key = (id(learn.model), id(opt), None if opt is None else id(opt.state),  # load_state_dict: a new state
               -1 if opt is None else sum(len(st) for st in opt.state.values()))
        if key != self._key:
            model_ts = list(learn.model.state_dict().values())  # they share storage with the parameters and buffers
            opt_ts = [] if opt is None else [(p, k, v) for p, st in opt.state.items() for k, v in st.items()
                                              if isinstance(v, torch.Tensor)]
            self._key, self._ts = key, (model_ts, opt_ts, [] if opt is None else list(opt.state))
        return self._ts

    def refresh(self, learn):
        """Copy the model's and optimizer's state into the snapshot (one foreach copy, into the buffers of the last
        snapshot when the state has the same tensors; values that are not tensors, such as step counts kept as
        numbers, by value)."""
        live = self.live(learn)
        ts = live[0] + [v for _, _, v in live[1]]
        other = [] if learn.opt is None else [(st, k, v) for p in live[2] for st in (learn.opt.state[p],)
                                              for k, v in st.items() if not isinstance(v, torch.Tensor)]
        with torch.no_grad():
            if self._saved is not None and self._saved[0] is live:
                torch._foreach_copy_(self._saved[1], ts)
                self._saved = (live, self._saved[1], other)
            else:
                self._saved = (live, [t.detach().clone() for t in ts], other)
        self.step = learn.train_iter

    def restore(self, learn):
        """Put the snapshot back in place; optimizer state created after it (a first step) is dropped."""
        (model_ts, opt_ts, had), saved, other = self._saved
        n = len(model_ts)
        with torch.no_grad():
            torch._foreach_copy_(model_ts, saved[:n])
            if learn.opt is not None:  # looked up now: a learn.load during the fit replaces the state's tensors
                state = learn.opt.state
                for (p, k, _), v in zip(opt_ts, saved[n:]):
                    cur = state[p].get(k)
                    if isinstance(cur, torch.Tensor) and cur.shape == v.shape and cur.dtype == v.dtype:
                        cur.copy_(v)
                    else:
                        state[p][k] = v.clone()
        if learn.opt is not None:
            by_id = {id(st): p for p, st in learn.opt.state.items()}
            for st, k, v in other:
                p = by_id.get(id(st))
                (learn.opt.state[p] if p is not None else st)[k] = v
            had = {id(p) for p in had}
            for p in [p for p in learn.opt.state if id(p) not in had]:
                del learn.opt.state[p]
