"""The Learner, the callback events, the cancel exceptions and the one training loop."""
import contextlib
import difflib
import os
import signal
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_save, load_state, check_state_dict
from .device import resolve_device
from . import accel, optim
from .checks import check_batch, check_data, check_fit, check_learner_args, check_metrics, check_wd, metric_name
from .determinism import rng_state, set_rng_state
from .optim import AdamW, set_hyper

__all__ = ['Learner', 'Callback', 'EVENTS', 'CancelBatchException', 'CancelTrainException',
           'CancelValidateException', 'CancelEpochException', 'CancelFitException', 'CallbackException',
           'DivergenceError']

EVENTS = ('before_fit', 'before_epoch', 'before_train', 'before_batch', 'after_pred', 'after_loss',
          'after_backward', 'after_step', 'after_batch', 'after_train', 'before_validate', 'after_validate',
          'after_epoch', 'after_fit')


# What one pass of the loop changes on the learner; validate() restores it, so it can be called from a callback.
_LOOP_STATE = ('_hooks', 'dl', 'training', 'iter', 'n_iter', 'xb', 'yb', 'pred', 'loss', '_vals', '_val_metrics',
               '_first_batch', 'exception', 'last_metrics', '_v1_stop_epoch', '_v1_skip_validate', '_stop_training',
               'pending_cancel', 'stepping', '_n_acc', '_acc_loss', '_acc_count', '_step_bs', '_unscaled', '_fit_cbs')


class CancelBatchException(Exception):
    """Raised in a batch hook: skip the rest of this batch (backward/step/zero_grad not yet done); after_batch runs."""


class CancelTrainException(Exception):
    """Stop this epoch's training phase; after_train, validation and after_epoch still run."""


class CancelValidateException(Exception):
    """Stop the current validation pass; after_validate runs, with metrics over the batches seen so far."""


class CancelEpochException(Exception):
    """Skip the rest of this epoch (validation included); after_epoch runs and the next epoch starts."""


class CancelFitException(Exception):
    """Stop fit; after_fit runs and fit returns normally."""


class CallbackException(RuntimeError):
    """An error raised inside a callback hook; the message names the callback and the event."""


class DivergenceError(RuntimeError):
    """Training stopped on a non-finite loss (or weights); `epoch`, `batch` and `step` say where."""

    def __init__(self, msg, epoch=None, batch=None, step=None):
        super().__init__(msg)
        self.epoch, self.batch, self.step = epoch, batch, step


_CANCELS = (CancelBatchException, CancelTrainException, CancelValidateException, CancelEpochException,
            CancelFitException, CallbackException)
_HOOK_PREFIXES = ('before_', 'after_', 'on_')
# Events that close a level: a cancel raised by one hook still lets the later hooks of that event run, so the
# Recorder, progress bar and loggers see every batch/epoch that happened; the cancel is raised after them.
_CLOSING = frozenset({'after_batch', 'after_train', 'after_validate', 'after_epoch', 'after_fit'})


class Callback:
    """Base class of callbacks: define methods named after `EVENTS`, each taking the learner, e.g. after_batch(learn).

    fastai v1 hooks (on_train_begin(**kwargs) ... on_train_end) are accepted too. `order` sorts callbacks (lower
    runs first); a method whose name starts with before_/after_/on_ but is no known event is an error.
    """
    order = 0

    def __init__(self, learn=None):
        if learn is not None:
            self.learn = learn


def _cb_order(cb):
    o = getattr(cb, 'order', 0)
    return o if o else getattr(cb, '_order', 0)


def _unwrapped(sd, model):
    """`sd` without the key prefix of a wrapper it was saved from (DDP/DataParallel's 'module.', torch.compile's
    '_orig_mod.'), when every key has it and the model's keys do not: learn.model is always the plain module."""
    if not isinstance(sd, dict) or not sd:
        return sd
    own = model.state_dict().keys()
    stripped = True
    while stripped:  # wrappers nest: torch.compile of a DDP model saves '_orig_mod.module.'
        stripped = False
        for prefix in ('module.', '_orig_mod.'):
            if all(isinstance(k, str) and k.startswith(prefix) for k in sd) and \
                    not any(k.startswith(prefix) for k in own):
                sd, stripped = {k[len(prefix):]: v for k, v in sd.items()}, True
    return sd


def _check_hooks(cb):
    from .callbacks.v1 import V1_EVENTS
    if isinstance(cb, type):  # its hooks would be called unbound, and fail only when their event first comes
        n = cb.__name__
        raise TypeError(f'callbacks= got the class {n}; pass an instance ({n}(learn) or {n}()), or '
                        f'callback_fns=[{n}]')
    known = set(EVENTS) | set(V1_EVENTS)
    if not isinstance(cb, Callback) and not any(callable(getattr(cb, e, None)) for e in known):
        raise TypeError(f'{cb!r:.60} ({type(cb).__name__}) is not a callback: a callback subclasses minifast.Callback '
                        f'(or is a fastai v1 callback with on_* methods)')
    for name in dir(type(cb)):
        if name.startswith(_HOOK_PREFIXES) and name not in known and callable(getattr(type(cb), name)):
            near = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ''
            raise ValueError(f"{type(cb).__name__}.{name} looks like a callback hook but '{name}' is not an event "
                             f"(see minifast.EVENTS){hint}")


def _as_list(x):
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _accumulation(cbs):
    """The number of batches per optimizer step that `cbs` ask for (a GradientAccumulation's n_step; 1: none)."""
    from .callbacks.gradients import GradientAccumulation
    accs = [cb for cb in cbs if isinstance(cb, GradientAccumulation)]
    if len(accs) > 1:
        raise ValueError(f'fit: {len(accs)} GradientAccumulation callbacks; give one (n_step batches per step)')
    return accs[0].n_step if accs else 1


def _to(b, device):
    if isinstance(b, torch.Tensor):
        return b if b.device == device else b.to(device, non_blocking=True)
    return tuple(_to(o, device) for o in b)


class Learner:
    """Trains `model` on `data` (anything with `train_dl` and `valid_dl`) through one loop extended by callbacks."""

    def __init__(self, data, model, loss_func=None, opt_func=AdamW, metrics=None, callbacks=None,
                 callback_fns=None, wd=1e-2, true_wd=True, bn_wd=True, path='.', model_dir='models', device=None,
                 bf16=False, fp16=False, channels_last=None, compile=False, cudnn_benchmark=None, silent=False,
                 layer_groups=None, splitter=None, layer_decay=None,
                 train_bn=True, training_mode=None, check_finite=True, check_inputs=False, distributed=None,
                 ddp_kwargs=None, sync_bn=False):
        from .callbacks.recorder import Recorder
        from .callbacks.progress import ProgressCallback
        from .callbacks.tracking import DivergenceGuard
        check_data(data)
        check_learner_args(model, loss_func, opt_func)
        self.data, self.metrics = data, check_metrics(metrics)
        self._init_distributed(distributed, ddp_kwargs)
        self.device = resolve_device(device)
        if bf16 and fp16:
            raise ValueError('Learner: give bf16=True or fp16=True, not both')
        self.silent, self.cudnn_benchmark = silent, cudnn_benchmark
        self.bf16, self.fp16, self._scaler = False, False, None  # set by to_bf16 / to_fp16 below
        accel.compile_options(compile)  # a bad value fails here, not at the first fit
        self.compile, self._compiled = compile, {}
        if bf16:
            self.to_bf16()
        elif fp16:
            self.to_fp16()
        self.model = model.to(self.device)
        if self._world > 1:
            self.model = self._setup_distributed_model(sync_bn)
        self.channels_last = accel.wants_channels_last(self.model, self.device) if channels_last is None \
            else bool(channels_last)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_func = F.cross_entropy if loss_func is None else loss_func
        self.opt_func, self.wd, self.true_wd, self.bn_wd = opt_func, check_wd(wd, 'Learner'), true_wd, bn_wd
        for name, v in (('path', path), ('model_dir', model_dir)):
            if not (isinstance(v, (str, os.PathLike)) or (name == 'path' and v is None)):
                raise TypeError(f'Learner: {name} must be a folder (a str or Path), got {v!r}')
        # path=None: the data's folder, as fastai v1 does (and '.' for data without one)
        self.path = Path(path if path is not None else getattr(data, 'path', None) or '.')
        self.model_dir = model_dir
        if layer_groups is not None and splitter is not None:
            raise ValueError('Learner: give layer_groups or splitter, not both')
        if layer_groups is not None and not isinstance(layer_groups, (list, tuple, nn.ModuleList)):
            raise TypeError(f'Learner: layer_groups must be a list of layer groups (modules or lists of modules), '
                            f'got {layer_groups!r}')
        # given groups go through split_model too, so lists of modules are accepted as a splitter's are
        self.layer_groups = optim.split_model(self.model, splitter if layer_groups is None else
                                              (lambda m: list(layer_groups)))
        if layer_decay is not None and not (isinstance(layer_decay, (int, float)) and 0 <= layer_decay <= 1):
            raise ValueError(f'Learner: layer_decay must be a number in [0, 1], got {layer_decay!r}')
        self.layer_decay, self.train_bn = layer_decay, train_bn
        self.opt = self._wd = None
        self.epoch = self.n_epoch = self.iter = self.n_iter = self.train_iter = 0
        # gradient accumulation (GradientAccumulation): batches per optimizer step, whether the current training batch
        # ends a step, and the running loss, batch count and item count of the current group
        self.stepping, self._n_acc, self._acc_loss, self._acc_count, self._step_bs = True, 1, None, 0, None
        self._unscaled = False  # fp16: the gradients of this step were unscaled already (GradientClipping)
        self.training, self.exception, self.last_metrics, self._hooks = False, None, [], None
        self.xb = self.yb = self.pred = self.loss = self.dl = None
        self.recorder, self.progress, self.guard = Recorder(), ProgressCallback(), DivergenceGuard()
        self.check_finite, self.check_inputs = check_finite, check_inputs
        self.interrupted, self.diverged, self._boundary, self._interrupt_requested = False, None, None, False
        self.pending_cancel, self._phase, self._fit_args = None, None, None
        self._fit_cbs = self._epoch_rng = self._skip = self._resumed_epoch = self._buffers = None
        # the modules that run the training / evaluation forward during a fit (compiled, DDP-wrapped); None: self.model
        self._fwd = self._fwd_eval = None
        self.callbacks = []
        for cb in _as_list(callbacks):
            self.add_cb(cb)
        for fn in _as_list(callback_fns):
            if not callable(fn):
                raise TypeError(f'callback_fns= got a {type(fn).__name__} instance; it takes classes or functions '
                                f'learn -> callback (callback_fns=[{type(fn).__name__}]); pass instances in '
                                f'callbacks=[...]')
            self.add_cb(fn(self))
        if training_mode is not None:
            optim.set_training_mode(self, training_mode, train_bn)

    # ---- callbacks -----------------------------------------------------------------------------------------
    def add_cb(self, cb):
        """Register a callback for every later fit/validate; its hook names are checked now."""
        if isinstance(cb, type):
            raise TypeError(f'add_cb got the class {cb.__name__}; pass an instance, or use '
                            f'callback_fns=[{cb.__name__}]')
        _check_hooks(cb)
        self.callbacks.append(cb)
        return cb

    def remove_cb(self, cb):
        """Unregister a callback."""
        if cb in self.callbacks:
            self.callbacks.remove(cb)

    @contextlib.contextmanager
    def no_bar(self):
        """Context manager that silences progress bars and the epoch table."""
        old, self.silent = self.silent, True
        try:
            yield self
        finally:
            self.silent = old

    def _build_hooks(self, extra=()):
        from .callbacks.v1 import v1_hooks, v1_stop_epoch_hook
        guard = [self.guard] if self.check_finite else []
        cbs = [self.recorder, self.progress, *guard, *self.callbacks, *extra]
        # one instance given twice (in learn.callbacks and in fit's callbacks=) must not see every event twice
        cbs = sorted({id(cb): cb for cb in cbs}.values(), key=_cb_order)
        n_acc = _accumulation(cbs)
        hooks, any_v1 = {e: [] for e in EVENTS}, False
        for cb in cbs:
            _check_hooks(cb)
            for e in EVENTS:
                fn = getattr(cb, e, None)
                if fn is not None:
                    hooks[e].append((f'{type(cb).__name__}.{e}', fn))
            for e, name, fn in v1_hooks(cb):
                hooks[e].append((name, fn))
                any_v1 = True
        if any_v1:
            hooks['after_batch'].append(('fastai v1 stop_epoch', v1_stop_epoch_hook))
        self._hooks, self._v1_stop_epoch, self._stop_training, self._fit_cbs = hooks, False, False, cbs
        self._v1_skip_validate = False
        self._n_acc, self.stepping, self._acc_loss, self._acc_count, self._unscaled = n_acc, True, None, 0, False

    def __call__(self, event):
        cancel = None
        try:
            for name, fn in self._hooks[event]:
                try:
                    fn(self)
                except _CANCELS as e:
                    if event not in _CLOSING or isinstance(e, CallbackException):
                        raise
                    cancel = cancel or e
                    self.pending_cancel = cancel  # later hooks of this event can see that it will end a level
                except DivergenceError:
                    raise
                except Exception as e:
                    raise CallbackException(f'{name} raised {type(e).__name__}: {e}') from e
        except BaseException:  # (no cost on the way through: the loop stays as lean as without it)
            self._failed_hook = (name, fn)  # fit runs the after_fit hooks after a failing one (they close bars, files)
            raise
        if cancel is not None:
            self.pending_cancel = None
            raise cancel

    def _with_events(self, f, name, cancel):
        try:
            self(f'before_{name}')
            f()
        except cancel:
            pass
        self(f'after_{name}')

    def _cleanup(self, event, start=0):
        """Run `event` hooks (from the `start`-th) while an error escapes: every hook runs, and their own errors only
        warn."""
        for name, fn in self._hooks[event][start:]:
            try:
                fn(self)
            except Exception as e:  # the escaping exception matters more
                warnings.warn(f'{name} raised {type(e).__name__}: {e} while handling {self.exception!r}')

    # ---- the loop --------------------------------------------------------------------------------------------
    def fit(self, epochs, lr=3e-3, wd=None, callbacks=None, resume=None, clip=None):
        """Train for `epochs` epochs.

        Args:
            epochs: number of passes over `data.train_dl`.
            lr: learning rate: a number, one number per layer group, or slice(start, end) (spread geometrically).
            wd: weight decay (decoupled when `true_wd`); None keeps `learn.wd`.
            callbacks: callbacks for this call only (an instance or a list); removed when fit ends.
            resume: a checkpoint folder (its newest file), a checkpoint file, or True (the folder of this fit's
                Checkpoint callback): continue that run exactly (weights, optimizer, schedule position, RNG, data
                order within the epoch, Recorder and callback state). The call must repeat the interrupted call's
                arguments; a different schedule length or a finished run is an error. A folder without
                checkpoints starts from the beginning (with a warning).
            clip: clip the gradients to this total norm before each step (a GradientClipping for this call).

        Ctrl-C (KeyboardInterrupt) takes effect at the end of the current batch (press it twice to stop at once):
        the learner is left consistent, `learn.interrupted` is set, and a Checkpoint callback saves that point.
        A non-finite training loss stops fit with DivergenceError (see Learner's check_finite).
        """
        epochs = check_fit(self, epochs)
        callbacks = _as_list(callbacks)
        for cb in callbacks:  # before anything is set up: a class given here would fail only at its first event
            _check_hooks(cb)
        if clip is not None:
            from .callbacks.gradients import GradientClipping
            callbacks.append(GradientClipping(clip=clip))
        self._prepare_opt(lr, self.wd if wd is None else wd)
        self._build_hooks(callbacks)
        self.n_epoch, self.train_iter, self.exception, self.last_metrics = epochs, 0, None, []
        self.epoch, self.interrupted, self.diverged, self._boundary, self.pending_cancel = 0, False, None, None, None
        self._fit_args = {'lr': [g['lr'] for g in self.opt.param_groups], 'wd': self.wd if wd is None else wd}
        try:
            state = None
            if resume is not None and resume is not False:
                from .resume import load_for_resume
                state = load_for_resume(self, resume)
        except BaseException:
            self._hooks = self._fit_cbs = self._fwd = self._fwd_eval = None
            raise
        try:
            with self._deferred_interrupt(), accel.cudnn_benchmark(self):
                try:
                    try:
                        start = self._begin_fit(state)
                        for self.epoch in range(start, self.n_epoch):
                            self._with_events(self._do_epoch, 'epoch', CancelEpochException)
                            if self._stop_training:
                                break
                    except CancelFitException:
                        pass
                except BaseException as e:
                    self.exception, self.interrupted = e, isinstance(e, KeyboardInterrupt)
                    self._cleanup('after_fit')
                    if self._world > 1:
                        self._drop_ddp()
                    raise
                else:
                    try:
                        self('after_fit')
                    except BaseException as e:  # the later after_fit hooks must still close bars and files
                        self.exception, self.interrupted = e, isinstance(e, KeyboardInterrupt)
                        self._cleanup('after_fit', start=self._hooks['after_fit'].index(self._failed_hook) + 1)
                        raise
                    if self._world > 1:  # rank 0's files (checkpoints, logs) exist before any rank goes on
                        from .distributed import barrier
                        barrier()
            if self._interrupt_requested:  # Ctrl-C after the last batch boundary: fit completed, then stop
                self._interrupt_requested, self.interrupted = False, True
                raise KeyboardInterrupt
        finally:
            self._hooks = self._fit_cbs = self._skip = self._resumed_epoch = self._fwd = self._fwd_eval = None

    def _drop_ddp(self):
        """Forget the DDP wrapper after a fit that stopped on an error: it may have stopped between a forward and
        its backward, and that wrapper's gradient hooks would then start an all_reduce in the next backward on this
        rank alone (a rank-0 lr_find), which hangs every rank. The next fit builds a new one."""
        ddp, self._ddp = getattr(self, '_ddp', None), None
        if ddp is not None:
            self._compiled = {k: v for k, v in self._compiled.items() if v[0] is not ddp[1]}
            reducer = getattr(ddp[1], 'reducer', None)
            if reducer is not None and hasattr(reducer, '_remove_autograd_hooks'):
                reducer._remove_autograd_hooks()  # do not wait for the wrapper to be collected

    def _setup_forward(self):
        """The forward modules of this fit: with `compile`, torch.compile'd wrappers of the model (made once and
        kept), which share its parameters; `learn.model` itself stays the plain module."""
        base = self.model if self._fwd is None else self._fwd
        if self._compiled:  # keep only the wrappers of what runs now (not an old model or DDP wrapper)
            self._compiled = {k: v for k, v in self._compiled.items() if v[0] is base or v[0] is self.model}
        self._fwd = accel.compile_module(self, base)
        self._fwd_eval = accel.compile_module(self, self.model)
        if self._fwd is self.model:
            self._fwd = None
        if self._fwd_eval is self.model:
            self._fwd_eval = None

    def warmup(self):
        """Run one training forward and backward and the validation forwards (a full batch, and the last partial
        batch's size) outside any fit, then put everything back: weights, gradients, BatchNorm statistics, RNG
        states and train/eval mode. With `compile`, this is where torch.compile compiles (minutes for a deep
        model); on CUDA it also autotunes cuDNN. Call it before timing epochs. Returns the learner."""
        from .checks import check_data
        check_data(self.data)
        params, modules = list(self.model.parameters()), list(self.model.modules())
        grads, modes, rng = [p.grad for p in params], [m.training for m in modules], rng_state()
        bufs = [b.detach().clone() for b in self.model.buffers()]
        for p in params:  # the warm-up backward writes fresh gradients; the ones there are put back untouched
            p.grad = None
        if self._world > 1:  # under torchrun the fit compiles the DDP wrapper: warm that one (every rank calls this)
            from .distributed import ddp_wrap
            self._fwd = ddp_wrap(self)
        self._setup_forward()

        def forward(model, xb, yb):
            with accel.autocast(self):
                return self.loss_func(model(*xb), yb)
        try:
            with accel.cudnn_benchmark(self):
                xb, yb = self._prepare_batch(next(iter(self.data.train_dl)))
                self.model.train()
                forward(self.model if self._fwd is None else self._fwd, xb, yb).backward()
                valid = self.data.valid_dl
                if valid is not None:
                    self.model.eval()
                    xb, yb = self._prepare_batch(next(iter(valid)))
                    n, bs = len(getattr(valid, 'dataset', ())), len(yb)
                    sizes = [bs] + ([n % bs] if n and n % bs and n > bs else [])
                    with torch.no_grad():
                        for k in sizes:
                            forward(self.model if self._fwd_eval is None else self._fwd_eval,
                                    tuple(x[:k] for x in xb), yb[:k])
            if self.device.type == 'cuda':
                torch.cuda.synchronize(self.device)
        finally:
            with torch.no_grad():
                for b, v in zip(self.model.buffers(), bufs):
                    b.copy_(v)
            for p, g in zip(params, grads):
                p.grad = g
            for m, mode in zip(modules, modes):
                m.training = mode
            set_rng_state(rng)
            self._fwd = self._fwd_eval = None
        return self

    # ---- precision -------------------------------------------------------------------------------------------
    def to_bf16(self):
        """Mixed precision with bfloat16: forward and loss under torch.autocast (matrix products and convolutions in
        bf16, BatchNorm and the weights in fp32); no loss scaling is needed. Returns the learner."""
        self.bf16, self.fp16, self._scaler = True, False, None
        return self

    def to_fp16(self, init_scale=2. ** 16, growth_interval=2000):
        """Mixed precision with float16: autocast plus a dynamic loss scale (torch.amp.GradScaler); steps whose
        gradients overflow are skipped and the scale lowered. Gradients seen in `after_backward` are scaled.
        Returns the learner."""
        self.bf16, self.fp16 = False, True
        self._scaler = torch.amp.GradScaler(self.device.type, init_scale=init_scale, growth_interval=growth_interval)
        return self

    def to_fp32(self):
        """Back to full precision. Returns the learner."""
        self.bf16 = self.fp16 = False
        self._scaler = None
        return self

    def _begin_fit(self, state):
        """before_fit, with a resumed run's state put back around it; returns the epoch to start at."""
        from .resume import restore_callbacks, restore_model_opt
        before = None
        if state is not None:  # put back if before_fit or a callback's saved state fails (a callback refusing it)
            from .callbacks.lr_finder import _deep_clone
            before = ({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                      _deep_clone(self.opt.state_dict()), None if self._scaler is None else self._scaler.state_dict(),
                      [p.requires_grad for p in self.model.parameters()])
        try:
            if state is not None:
                restore_model_opt(self, state)
            if self._world > 1:
                from .distributed import ddp_wrap, sync_rng
                sync_rng()  # every rank draws rank 0's permutations (a resumed run then sets the checkpoint's RNG)
                self._fwd = ddp_wrap(self)  # built before before_fit; copies rank 0's weights to every rank
            self._setup_forward()  # torch.compile (of the DDP wrapper when there is one)
            self.opt.zero_grad()  # gradients left by an interrupted step must not leak into this fit's first step
            self('before_fit')
            if state is not None:  # after before_fit, which resets the Recorder and the callbacks
                restore_callbacks(self, state)
        except BaseException:
            if before is not None:
                self.model.load_state_dict(before[0])
                self.opt.load_state_dict(before[1])
                if before[2] is not None:
                    self._scaler.load_state_dict(before[2])
                for p, train in zip(self.model.parameters(), before[3]):
                    p.requires_grad_(train)
            raise
        if state is None:
            return 0
        pos = state['position']
        self.train_iter = pos['train_iter']
        set_rng_state(state['rng'])
        if pos['where'] == 'epoch':
            return pos['epoch'] + 1
        self._skip = (pos['batch'], state['epoch_rng'], state['rng'])
        rec = state['callbacks'].get('Recorder')
        self._resumed_epoch = None if rec is None else {'start': rec['epoch_start'], 'elapsed': rec['epoch_elapsed']}
        return pos['epoch']

    @contextlib.contextmanager
    def _deferred_interrupt(self):
        """While fitting in the main thread, the first Ctrl-C only sets a flag that the loop turns into
        KeyboardInterrupt at the next batch boundary; a second Ctrl-C interrupts at once."""
        self._interrupt_requested = False
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            yield  # another handler is in charge (or a nested fit): leave it alone
            return

        def defer(signum, frame):
            self._interrupt_requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)

        signal.signal(signal.SIGINT, defer)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def fit_one_cycle(self, cyc_len, max_lr=3e-3, moms=(0.95, 0.85), div_factor=25., pct_start=0.3, final_div=None,
                      wd=None, callbacks=None, tot_epochs=None, start_epoch=None, resume=None, clip=None):
        """Train with Smith's 1cycle policy (fastai v1 semantics; every step equals torch's OneCycleLR).

        Args:
            cyc_len: epochs to train.
            max_lr: peak learning rate (a number, one per layer group, or slice(start, end) / slice(end)).
            moms: (max, min) momentum (beta1 for Adam): moms[0] -> moms[1] while the lr rises, back as it falls.
            div_factor: the lr starts at max_lr / div_factor.
            pct_start: fraction of the steps spent warming up.
            final_div: the lr ends at max_lr / final_div (default div_factor * 1e4).
            wd: weight decay (None keeps learn.wd).
            callbacks: callbacks for this call only.
            tot_epochs, start_epoch: lay the cycle over tot_epochs and start at start_epoch (to continue a run).
            resume: continue an interrupted call exactly from a Checkpoint folder or file (see `fit`).
            clip: clip the gradients to this total norm before each step (see `fit`).
        """
        from .callbacks.schedule import fit_one_cycle
        fit_one_cycle(self, cyc_len, max_lr, moms, div_factor, pct_start, final_div, wd, callbacks, tot_epochs,
                      start_epoch, resume, clip)

    def fit_sgdr(self, n_cycles, cycle_len, lr=3e-3, cycle_mult=2, eta_min=0., wd=None, callbacks=None, resume=None,
                 clip=None):
        """Cosine annealing with warm restarts: n_cycles cycles of cycle_len * cycle_mult**i epochs (torch's
        CosineAnnealingWarmRestarts stepped per batch)."""
        from .callbacks.schedule import fit_sgdr
        fit_sgdr(self, n_cycles, cycle_len, lr, cycle_mult, eta_min, wd, callbacks, resume, clip)

    def fit_clr(self, epochs, base_lr, max_lr, step_size_up, step_size_down=None, mode='triangular', gamma=1.,
                cycle_momentum=True, base_momentum=0.8, max_momentum=0.9, wd=None, callbacks=None, resume=None,
                clip=None):
        """Cyclical learning rates ('triangular', 'triangular2', 'exp_range'; step sizes in steps; torch's
        CyclicLR)."""
        from .callbacks.schedule import fit_clr
        fit_clr(self, epochs, base_lr, max_lr, step_size_up, step_size_down, mode, gamma, cycle_momentum,
                base_momentum, max_momentum, wd, callbacks, resume, clip)

    def fit_step(self, epochs, lr, step_size, gamma=0.1, wd=None, callbacks=None, resume=None, clip=None):
        """Step decay: lr * gamma every step_size epochs (torch's StepLR)."""
        from .callbacks.schedule import fit_step
        fit_step(self, epochs, lr, step_size, gamma, wd, callbacks, resume, clip)

    def fit_exp(self, epochs, lr, gamma, wd=None, callbacks=None, resume=None, clip=None):
        """Exponential decay: lr * gamma**epoch (torch's ExponentialLR)."""
        from .callbacks.schedule import fit_exp
        fit_exp(self, epochs, lr, gamma, wd, callbacks, resume, clip)

    def fit_warmup_cosine(self, epochs, lr=3e-3, warmup_epochs=1, warmup_lr=None, min_lr=0., wd=None,
                          callbacks=None, resume=None, clip=None):
        """Linear warm-up from warmup_lr (default lr/100) to lr, then cosine to min_lr, per step (timm-style)."""
        from .callbacks.schedule import fit_warmup_cosine
        fit_warmup_cosine(self, epochs, lr, warmup_epochs, warmup_lr, min_lr, wd, callbacks, resume, clip)

    def fit_fc(self, epochs, lr=3e-3, pct_start=0.75, div_final=1e5, wd=None, callbacks=None, resume=None, clip=None):
        """Flat then cosine: lr for pct_start of the steps, then cosine to lr / div_final."""
        from .callbacks.schedule import fit_fc
        fit_fc(self, epochs, lr, pct_start, div_final, wd, callbacks, resume, clip)

    def fit_phases(self, phases, lr=3e-3, wd=None, callbacks=None, resume=None, clip=None):
        """Train through TrainingPhase objects, each annealing 'lr', 'mom' and 'wd' its own way."""
        from .callbacks.schedule import fit_phases
        fit_phases(self, phases, lr, wd, callbacks, resume, clip)

    def lr_find(self, start_lr=1e-7, end_lr=10, num_it=100, stop_div=True, wd=None):
        """LR range test: one step per learning rate, exponentially from start_lr to end_lr; restores everything.

        Args:
            start_lr, end_lr: the sweep's ends (numbers, or one per layer group).
            num_it: steps in the sweep (over as many epochs as that needs; no validation). A GradientAccumulation or
                GradientClipping in learn.callbacks stays for the sweep: a step is then n_step batches.
            stop_div: stop once the smoothed loss exceeds 4x its best, or any loss is not finite.
            wd: weight decay during the sweep (None keeps learn.wd).

        Model parameters and buffers, optimizer state and hyper-parameters, and the RNG states (torch, CUDA, numpy,
        random) are restored afterwards, also when the sweep is interrupted, and nothing is written to disk. The
        sweep stays in `learn.recorder` for `learn.recorder.plot(suggestion=True)`; the returned LRFindResult holds
        the 'steep', 'valley' and 'minimum' suggestions.
        """
        from .callbacks.lr_finder import lr_find, lr_find_distributed
        if self._world > 1:  # the sweep runs on rank 0 alone; every rank returns its result
            return lr_find_distributed(self, start_lr, end_lr, num_it, stop_div, wd)
        return lr_find(self, start_lr, end_lr, num_it, stop_div, wd)

    def _do_epoch(self):
        self._resumed_epoch = None  # read by the Recorder's before_epoch of a resumed epoch
        self.last_metrics = []  # a cancelled epoch must not report the previous epoch's validation
        self.dl, self.training, self._phase = self._loader(self.data.train_dl, True), True, 'train'
        self.model.train()
        self._with_events(self._all_batches, 'train', CancelTrainException)
        if self._world > 1:  # each rank's last forward updated its own BatchNorm statistics: take rank 0's again
            from .distributed import broadcast_buffers
            broadcast_buffers(self)
        valid_dl = self.data.valid_dl
        self._phase = 'valid'
        skip = valid_dl is None or self._v1_skip_validate  # a fastai v1 callback returned {'skip_validate': True}
        self.last_metrics = [] if skip else self._validate(valid_dl, self.metrics)
        self._phase = None

    def _validate(self, dl, metrics):
        self.dl, self.training = self._loader(dl, False), False
        self.model.eval()
        self._val_metrics, self._vals = metrics, []
        with torch.no_grad():
            self._with_events(self._all_batches, 'validate', CancelValidateException)
        return self._reduce_vals(metrics)

    def _reduce_vals(self, metrics):
        if self._world > 1:  # sums and counts over every rank's share, in one all_reduce
            from .distributed import reduce_vals
            return reduce_vals(self, metrics)
        if not self._vals:
            return [float('nan')] * (1 + len(metrics))
        bs = torch.tensor([v[0] for v in self._vals], dtype=torch.float32, device=self.device)
        as_t = lambda x: torch.as_tensor(x, device=self.device).float().reshape(())  # noqa: E731
        cols = torch.stack([torch.stack([as_t(v[1]), *map(as_t, v[2])]) for v in self._vals])  # (batches, 1+metrics)
        return ((cols * bs[:, None]).sum(0) / bs.sum()).tolist()  # the one host sync of a validation pass

    def _all_batches(self):
        self.n_iter = len(self.dl) if hasattr(self.dl, '__len__') else None
        self.iter, self._first_batch = -1, True
        batches, start = self.dl, 0
        if self.training:
            if self._skip is not None:
                batches, start = self._skip_batches()
                self.iter = start - 1
            else:
                self._epoch_rng = rng_state()  # fixes this epoch's data order: a checkpoint can replay it
            if self._n_acc > 1:
                self._accumulate_batches(batches, start)
                batches = ()
        for self.iter, b in enumerate(batches, start):
            self._one_batch(b)
        if self.training and self.iter == -1:
            raise ValueError('the training DataLoader yielded no batches (data.train_dl is empty)')

    def _accumulate_batches(self, batches, start):
        """The training batches under gradient accumulation: a step after every n_step batches and after the last
        batch of the epoch. In distributed training the batches that do not step skip DDP's gradient all_reduce
        (its no_sync())."""
        n, last = self._n_acc, self.n_iter - 1
        ddp = self._ddp[1] if self._world > 1 and self._ddp is not None else None
        try:
            for self.iter, b in enumerate(batches, start):
                self.stepping = (self.iter + 1) % n == 0 or self.iter == last
                if ddp is None or self.stepping:
                    self._one_batch(b)
                else:
                    with ddp.no_sync():
                        self._one_batch(b)
                if self.stepping:
                    self._acc_loss = None  # the group is over (stepped, or cancelled and cleared)
        finally:
            if self._acc_loss is not None:  # left inside a group (CancelTrain/CancelEpoch, an error): its gradients
                self.opt.zero_grad()        # must not reach the next step
            self.stepping, self._acc_loss = True, None

    def _skip_batches(self):
        """A resumed epoch: replay its data order from the RNG state of its start, pass the batches the checkpoint
        had done, then put back the RNG state of the checkpoint."""
        k, epoch_rng, rng = self._skip
        self._skip, self._epoch_rng = None, epoch_rng
        if getattr(self.dl, 'persistent_workers', False) and getattr(self.dl, 'num_workers', 0) > 0:
            warnings.warn('resume: the training DataLoader has persistent_workers=True; its workers carry their RNG '
                          'across epochs, so random augmentation done in them differs from the uninterrupted run '
                          '(the data order is still the same)')
        set_rng_state(epoch_rng)
        it = iter(self.dl)
        for i in range(k):
            try:
                next(it)
            except StopIteration:
                raise ValueError(f'resume: the training DataLoader ended after {i} batches, but the checkpoint had '
                                 f'done {k} batches of epoch {self.epoch}') from None
        set_rng_state(rng)
        return it, k

    def _prepare_batch(self, b):
        dev = self.device
        xb = (_to(b[0], dev),) if len(b) == 2 else _to(b[:-1], dev)  # (x, y) is the common case: no slicing
        if self.channels_last:
            xb = tuple(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x for x in xb)
        return xb, _to(b[-1], dev)

    def _one_batch(self, b):
        self.xb, self.yb = self._prepare_batch(b)
        if self.check_inputs:
            from .checks import check_finite_inputs
            check_finite_inputs(self.xb, self.epoch, self.iter)
        try:
            self('before_batch')
            self._do_one_batch()
        except CancelBatchException:
            if self.training and (self._unscaled or (self._n_acc > 1 and self.stepping)):
                self._cancelled_step()
        except BaseException:  # another cancel, an error or Ctrl-C after clipping unscaled (fp16): close that step
            if self._unscaled:
                self._cancelled_step()
            raise
        try:
            self('after_batch')
        finally:
            if self.training and self.stepping:  # train_iter counts optimizer steps
                self.train_iter += 1
        if self._interrupt_requested and (self.stepping or not self.training):
            # a deferred Ctrl-C: this batch is complete (with accumulation: its group too), stop here
            # where a Checkpoint can save this point: after this training batch, or (interrupted in the epoch's
            # validation) after the epoch's training; elsewhere (a validate() inside a training hook) nowhere
            self._interrupt_requested = False
            self._boundary = 'train' if self.training else 'valid' if self._phase == 'valid' else None
            raise KeyboardInterrupt

    def _do_one_batch(self):
        if self._first_batch and self.training:  # restored if the first batch's checks fail after the forward
            self._buffers = [b.detach().clone() for b in self.model.buffers()]
        model = self._fwd if self.training else self._fwd_eval
        model = self.model if model is None else model
        if self.bf16 or self.fp16:
            with torch.autocast(self.device.type, dtype=torch.bfloat16 if self.bf16 else torch.float16):
                self.pred = model(*self.xb)
        else:
            self.pred = model(*self.xb)
        self('after_pred')
        if self._first_batch:
            self._check_first_batch()
        if self.bf16 or self.fp16:
            with torch.autocast(self.device.type, dtype=torch.bfloat16 if self.bf16 else torch.float16):
                self.loss = self.loss_func(self.pred, self.yb)
        else:
            self.loss = self.loss_func(self.pred, self.yb)
        self('after_loss')
        if not self.training:
            try:
                mets = [m(self.pred, self.yb) for m in self._val_metrics]
            except Exception as e:  # a bare shape or dtype error would not say which metric
                raise self._metric_error(e) from e
            self._vals.append((self.yb.shape[0], self.loss.detach(), mets))
            return
        if self._n_acc > 1:
            if not self._accumulate():
                return
        elif self._scaler is None:
            self.loss.backward()
        else:  # fp16: gradients are scaled in after_backward; the step is skipped when they overflowed
            self._scaler.scale(self.loss).backward()
        self('after_backward')
        if self._scaler is None:
            self._wd.step()
        else:
            self._scaled_step()
        self('after_step')
        self.opt.zero_grad()

    def _metric_error(self, e):
        """The error of a metric that raised on this validation batch, naming it (found by calling each again)."""
        for m in self._val_metrics:
            try:
                m(self.pred, self.yb)
            except Exception:
                break
        return RuntimeError(f'metric {metric_name(m)} raised {type(e).__name__} on validation batch {self.iter} '
                            f'(predictions of shape {tuple(getattr(self.pred, "shape", ()))}, targets of shape '
                            f'{tuple(getattr(self.yb, "shape", ()))}): {e}')

    def _accumulate(self):
        """Gradient accumulation: the backward of this batch's loss divided by the number of batches in its group
        (n_step, or fewer in the last group of an epoch), so the gradients become the mean over the group's batches.
        True for the group's last batch, whose gradients are then complete: `loss` is set to the mean of the group's
        (undivided) losses and the caller runs after_backward and the step; False for the others (done here)."""
        n, i = self._n_acc, self.iter
        k = min(n, self.n_iter - (i - i % n))  # batches in this group
        loss = self.loss.detach()
        if i % n == 0 or self._acc_loss is None:  # a new group
            self._acc_loss, self._acc_count, self._step_bs = loss, 1, len(self.yb)
        else:
            self._acc_loss, self._acc_count, self._step_bs = self._acc_loss + loss, self._acc_count + 1, \
                self._step_bs + len(self.yb)
        scaled = self.loss / k
        (scaled if self._scaler is None else self._scaler.scale(scaled)).backward()
        if not self.stepping:
            return False
        if self._acc_count < k:  # batches of the group were cancelled before their backward: the mean is over the rest
            with torch.no_grad():
                grads = [p.grad for p in self.model.parameters() if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, k / self._acc_count)
        self.loss = self._acc_loss / self._acc_count
        return True

    def _cancelled_step(self):
        """A batch that would have stepped was cancelled: with accumulation its group's gradients are dropped (they
        must not reach the next group's step), and gradients already unscaled for clipping (fp16) are dropped and the
        scaler's record of them closed, or the next step would treat scaled gradients as unscaled."""
        if self._unscaled:
            self._scaler.update()  # unscale_ recorded this step's overflow check: update() consumes it
            self._unscaled = False
        self.opt.zero_grad()

    def _scaled_step(self):
        scaler, wd = self._scaler, self._wd
        if not wd.native:  # L2 / decoupled decay by hand must see true gradients
            if not self._unscaled:  # GradientClipping may have unscaled them already
                scaler.unscale_(self.opt)
            keep = None
            if wd.true_wd:  # the decay multiplies the weights: not on a step the scaler skips (read on the device)
                grads = [p.grad for g in self.opt.param_groups for p in g['params'] if p.grad is not None]
                if grads:
                    keep = accel.all_finite(grads)
            wd._decay(keep)
        scaler.step(self.opt)  # fused optimizers take the scale and the overflow flag in-kernel: no host sync
        scaler.update()
        self._unscaled = False

    def _check_first_batch(self):
        try:
            check_batch(self)
        except Exception:
            if self.training and self._buffers is not None:  # the forward updated BatchNorm statistics: undo it
                with torch.no_grad():
                    for b, v in zip(self.model.buffers(), self._buffers):
                        b.copy_(v)
            raise
        finally:
            self._buffers = None

    # ---- distributed data parallel (torchrun) ------------------------------------------------------------------
    def _init_distributed(self, distributed, ddp_kwargs):
        """Join torchrun's process group (see minifast.distributed); sets `_world` (1: one process) and `is_main`."""
        from .distributed import init_distributed, rank
        if distributed not in (None, True, False):
            raise ValueError(f'Learner: distributed must be None (automatic under torchrun), True or False, got '
                             f'{distributed!r}')
        if ddp_kwargs is not None and not isinstance(ddp_kwargs, dict):
            raise TypeError(f'Learner: ddp_kwargs must be a dict of DistributedDataParallel arguments, got '
                            f'{type(ddp_kwargs).__name__}')
        self.ddp_kwargs, self._ddp, self._shards = dict(ddp_kwargs or {}), None, {}
        self._world = init_distributed(distributed)
        # the process that prints and writes files; every process when training is not distributed
        self.is_main = self._world == 1 or rank() == 0

    def _setup_distributed_model(self, sync_bn):
        from .distributed import check_device
        check_device(self.device)
        if not sync_bn:
            return self.model
        if self.device.type != 'cuda':
            raise ValueError(f'Learner(sync_bn=True): SyncBatchNorm works on CUDA devices only, and this process '
                             f'trains on {self.device}; leave sync_bn off (each rank then normalises with its own '
                             f'batch statistics)')
        return nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

    def _loader(self, dl, train):
        """`dl`, or in distributed training this rank's share of it (built once per fit)."""
        if self._world == 1:
            return dl
        key = (id(dl), train)
        got = self._shards.get(key)
        if got is None or got[0] is not dl:
            from .distributed import rank, shard_loader
            got = self._shards[key] = (dl, shard_loader(dl, rank(), self._world, train))
        return got[1]

    def _train_batches(self):
        """Batches in a training epoch: len(data.train_dl), or of this rank's share of it in distributed training
        (the same on every rank). TypeError for a loader without a length."""
        return len(self._loader(self.data.train_dl, True))

    def _train_len(self, callbacks=None):
        """Optimizer steps in a training epoch: the batches (`_train_batches`), or with gradient accumulation
        ceil(batches / n_step). Outside a fit (or given `callbacks`, those of the coming call) the accumulation is
        read from learn.callbacks and `callbacks`. TypeError for a loader without a length."""
        n = self._train_batches()
        k = self._n_acc if self._hooks is not None and callbacks is None else \
            _accumulation([*self.callbacks, *_as_list(callbacks)])
        return -(-n // k)

    @contextlib.contextmanager
    def _local(self):
        """Train as a single process while in this block (lr_find on rank 0): no DDP wrapper, sharding, reductions
        or RNG sync."""
        old, shards, self._world = self._world, self._shards, 1
        try:
            yield self
        finally:
            self._world, self._shards = old, shards

    # ---- optimizer -------------------------------------------------------------------------------------------
    def create_opt(self, lr=3e-3, wd=None):
        """Build `learn.opt` from `opt_func` with one group per layer group (two when bn_wd=False)."""
        return optim.create_opt(self, lr, wd)

    def _prepare_opt(self, lr, wd):
        check_wd(wd, 'fit')
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError('fit: every parameter of the model is frozen (requires_grad=False); call '
                             'learn.unfreeze() or learn.freeze_to(n) with n < the number of layer groups '
                             f'({len(self.layer_groups)})')
        if self.opt is not None:
            bad = [i for i, g in enumerate(self.opt.param_groups) if 'layer_group' not in g]
            if bad:
                raise ValueError(f'fit: optimizer parameter group(s) {bad} were not made by the learner (no '
                                 f'layer_group); rebuild the optimizer with learn.create_opt() or learn.split(...)')
        if self.opt is None:
            self.create_opt(lr, wd)
        else:
            set_hyper(self.opt, 'lr', optim.group_lrs(self, lr))
            set_hyper(self.opt, 'wd', wd)

    # ---- layer groups and freezing ----------------------------------------------------------------------------
    def split(self, split_on):
        """Set the layer groups: a function model -> modules, cut indices of a Sequential, or {module name:
        settings}; the optimizer is rebuilt at the next fit."""
        optim.split(self, split_on)
        return self

    def freeze_to(self, n):
        """Freeze the layer groups before n (norm layers still train when learn.train_bn)."""
        optim.freeze_to(self, n, self.train_bn)

    def freeze(self):
        """Train only the last layer group (the head)."""
        optim.freeze(self, self.train_bn)

    def unfreeze(self):
        """Train every layer group."""
        optim.unfreeze(self)

    def set_training_mode(self, mode):
        """'head_only' (freeze) or 'full' (unfreeze)."""
        optim.set_training_mode(self, mode, self.train_bn)

    def param_summary(self):
        """A table of the parameter groups: modules, parameter counts, trainable, lr, wd."""
        return optim.param_summary(self)

    # ---- evaluation ------------------------------------------------------------------------------------------
    def validate(self, dl=None, callbacks=None, metrics=None):
        """Loss and metrics over `dl` (default: the validation set) as [loss, *metric values] (Python floats)."""
        dl = self.data.valid_dl if dl is None else dl
        if dl is None:
            raise ValueError('validate() needs a DataLoader: this learner has no validation set '
                             '(data.valid_dl is None)')
        metrics = self.metrics if metrics is None else check_metrics(metrics)
        saved, was_training = {k: getattr(self, k, None) for k in _LOOP_STATE}, self.model.training
        self._build_hooks(_as_list(callbacks))
        self.exception = None
        try:
            return self._validate(dl, metrics)
        except BaseException as e:
            self.exception = e
            self._cleanup('after_validate')
            raise
        finally:  # validate may run inside a fit (from a callback): leave the fit's state as it was
            for k, v in saved.items():
                setattr(self, k, v)
            self.model.train(was_training)

    def get_preds(self, dl=None, activ=None):
        """(predictions, targets) over `dl` (default: validation set), on CPU; softmax applied for cross-entropy."""
        dl = self.data.valid_dl if dl is None else dl
        if activ is None:
            activ = (lambda o: o.softmax(-1)) if self._is_ce() else (lambda o: o)
        preds, targs = [], []
        was_training = self.model.training  # put back, as validate does: a callback may call this mid-epoch
        self.model.eval()
        try:
            with torch.no_grad(), accel.autocast(self):  # as validation runs
                for b in dl:
                    xb, _ = self._prepare_batch(b)
                    preds.append(activ(self.model(*xb).float()).cpu())
                    targs.append(b[-1].cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(preds), torch.cat(targs)

    def predict(self, x):
        """Predict one item (no batch dimension; raw, as in data.valid_ds): (label, class index, probabilities) for
        classification. Data with a `preprocess` method (images) converts and normalises the item first."""
        was_training = self.model.training  # put back, as validate does: a callback may call this mid-epoch
        self.model.eval()
        xs = x if isinstance(x, (tuple, list)) else (x,)
        pre = getattr(self.data, 'preprocess', None)  # e.g. images: uint8 -> float, normalised like validation
        try:
            with torch.no_grad(), accel.autocast(self):  # as get_preds and validation run (bf16/fp16)
                xs = [t.unsqueeze(0).to(self.device) for t in xs]
                if pre is not None:
                    xs = [pre(t) for t in xs]
                out = self.model(*xs)[0].float().cpu()
        finally:
            self.model.train(was_training)
        if not self._is_ce():
            return out, out, out
        probs = out.softmax(-1)
        idx = int(probs.argmax())
        classes = getattr(self.data, 'classes', None)
        return (classes[idx] if classes is not None else idx), idx, probs

    def _is_ce(self):
        return self.loss_func is F.cross_entropy or isinstance(self.loss_func, nn.CrossEntropyLoss)

    # ---- persistence -----------------------------------------------------------------------------------------
    def _model_file(self, name):
        p = Path(name)
        return p if p.suffix == '.pth' else self.path / self.model_dir / f'{name}.pth'

    def save(self, name, with_opt=True):
        """Save the learner's full state to path/model_dir/name.pth (or to `name` when it ends in .pth), atomically:
        model, optimizer (unless with_opt=False), the Recorder's history, the RNG states and, during a fit, the
        position and the callbacks' state. Returns the file's path. `learn.load` reads the weights (and optimizer);
        torch.load(file, weights_only=True)['model'] is the model's state dict.

        In distributed training call it on every rank: rank 0 writes, and outside a fit the others wait until the
        file is there (so a `learn.load` on any rank then finds it)."""
        from .resume import training_state
        file = self._model_file(name)
        # a finished state only after a fit that completed; during a fit, or after one that stopped on an error or
        # an interrupt, the file holds no point a fit can resume from (Checkpoint writes those)
        done = self._hooks is None and self.exception is None
        if self.is_main:
            atomic_save(training_state(self, 'end' if done else None, with_opt=with_opt), file)
        if self._world > 1 and self._hooks is None:
            from .distributed import barrier
            barrier()
        return file

    def load(self, name, with_opt=None, strict=True):
        """Load path/model_dir/name.pth (a file from learn.save, a Checkpoint file, or a plain state dict) into the
        model, and into the optimizer unless with_opt=False. A file that does not match leaves the learner
        untouched; files are read with torch's weights-only loader (no code in a file runs)."""
        from .resume import model_state
        file = self._model_file(name)
        state = load_state(file, self.device)
        model_sd = _unwrapped(model_state(state), self.model)
        check_state_dict(self.model, model_sd, file, strict)
        opt_sd = state.get('opt') if isinstance(state, dict) and model_sd is not state else None
        if opt_sd is not None and with_opt is not False:
            if self.opt is None:
                self.create_opt()
            before = self.opt.state_dict()
            try:  # torch checks the groups before changing anything, so a mismatch leaves the optimizer as it was
                self.opt.load_state_dict(opt_sd)
            except (ValueError, KeyError) as e:
                raise ValueError(f'{os.fspath(file)}: optimizer state does not match this learner: {e}') from e
            # torch checks only the groups' sizes: another optimizer's state (AdamW's in an SGD) loads, and the next
            # step fails on a setting it lacks ('momentum'). Settings newer torch versions added are filled in by
            # the optimizer's own loading, so only another kind of optimizer lacks any.
            lacking = sorted({k for g in self.opt.param_groups for k in self.opt.defaults if k not in g})
            if lacking:
                self.opt.load_state_dict(before)
                raise ValueError(f'{os.fspath(file)}: its optimizer state is not one of this learner\'s '
                                 f'{type(self.opt).__name__} (it lacks the settings {lacking}); the learner was left '
                                 f'unchanged. load(..., with_opt=False) loads the weights only')
        self.model.load_state_dict(model_sd, strict=strict)
        return self
