"""The Learner and its one training loop: fit -> epochs -> batches -> one batch, and validate.

What is not the loop has one owner each: the callback system (`core`), precision, accumulation and the step
(`stepper`), distributed training (`distributed`), the resume point (`resume`), snapshot and restore (`state`),
Ctrl-C (`interrupt`), the fit policies and lr_find (`policies`, bound here as methods).
"""
import contextlib
from operator import attrgetter
from pathlib import Path

import torch
import torch.nn.functional as F

from . import accel, export as exporting, inference, interpret as interp, optim, policies, resume as resuming, tta
from .callbacks.gradients import GradientAccumulation, GradientClipping
from .callbacks.mixup import mixup
from .callbacks.progress import ProgressCallback, no_bar
from .callbacks.recorder import Recorder
from .callbacks.tracking import DivergenceGuard
from .callbacks.v1 import v1_hooks, v1_stop_epoch_hook
from .checks import (check_batch, check_data, check_finite_inputs, check_fit, check_learner_args,
                     check_learner_options, check_metrics, check_wd)
from .core import (EVENTS, Callback, CallbackException, CancelBatchException, CancelEpochException,
                   CancelFitException, CancelTrainException, CancelValidateException, DivergenceError, Hooks, as_list,
                   check_hooks)
from .determinism import rng_state
from .device import resolve_device
from .distributed import check_device, strategy
from .interrupt import DeferredInterrupt
from .metrics import Evaluation, metric_error
from .optim import AdamW
from .state import Snapshot
from .stepper import Stepper
from .summary import model_summary

__all__ = ['Learner', 'LoopState', 'Callback', 'EVENTS', 'CancelBatchException', 'CancelTrainException',
           'CancelValidateException', 'CancelEpochException', 'CancelFitException', 'CallbackException',
           'DivergenceError']


class LoopState:
    """What one pass of the loop (a fit, or a validate) changes on the learner: validate() swaps in a fresh one and
    puts the fit's back, so it can run inside a fit. Its fields read as learner attributes (learn.xb, learn.loss...)."""
    __slots__ = ('hooks', 'dl', 'training', 'iter', 'n_iter', 'xb', 'yb', 'pred', 'loss', 'vals', 'val_metrics',
                 'first_batch', 'exception', 'last_metrics', 'stop_epoch', 'skip_validate', 'stop_training')

    def __init__(self, hooks=None):
        self.hooks, self.dl, self.training, self.iter, self.n_iter = hooks, None, False, 0, 0
        self.xb = self.yb = self.pred = self.loss = self.exception = None
        self.vals, self.val_metrics, self.first_batch, self.last_metrics = [], [], True, []
        self.stop_epoch = self.skip_validate = self.stop_training = False  # fastai v1 callbacks' requests


def _state_attr(name):
    return property(attrgetter(f'state.{name}'), lambda self, v: setattr(self.state, name, v),
                    doc=f'The loop state\'s `{name}` (see LoopState).')


def _accumulation(cbs):
    """The number of batches per optimizer step that `cbs` ask for (a GradientAccumulation's n_step; 1: none)."""
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
                 layer_groups=None, splitter=None, layer_decay=None, layer_decay_rule='timm', head_wd=None,
                 train_bn=True, training_mode=None, check_finite=True, check_inputs=False, distributed=None,
                 ddp_kwargs=None, sync_bn=False):
        check_data(data)
        check_learner_args(model, loss_func, opt_func)
        check_learner_options(path, model_dir, layer_groups, splitter, layer_decay, layer_decay_rule, head_wd)
        self.data, self.metrics = data, check_metrics(metrics)
        self.dist = strategy(distributed, ddp_kwargs)
        self.device, self.is_main = resolve_device(device), self.dist.is_main
        if bf16 and fp16:
            raise ValueError('Learner: give bf16=True or fp16=True, not both')
        self.silent, self.cudnn_benchmark, self.stepper = silent, cudnn_benchmark, Stepper(self.device)
        accel.compile_options(compile)  # a bad value fails here, not at the first fit
        self.compile, self.compiled = compile, {}
        self.stepper.set_precision('bf16' if bf16 else 'fp16' if fp16 else 'fp32')
        self.model = model.to(self.device)
        if self.dist.world > 1:
            check_device(self.device)
            if sync_bn:
                self.model = accel.sync_batchnorm(self.model, self.device)
        self.channels_last = accel.wants_channels_last(self.model, self.device) if channels_last is None \
            else bool(channels_last)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_func = F.cross_entropy if loss_func is None else loss_func
        self.opt_func, self.wd, self.true_wd, self.bn_wd = opt_func, check_wd(wd, 'Learner'), true_wd, bn_wd
        # path=None: the data's folder, as fastai v1 does (and '.' for data without one)
        self.path, self.model_dir = Path(path if path is not None else getattr(data, 'path', None) or '.'), model_dir
        # given groups go through split_model too, so lists of modules are accepted as a splitter's are
        self.layer_groups = optim.split_model(self.model, splitter if layer_groups is None else
                                              (lambda m: list(layer_groups)))
        self.layer_decay, self.layer_decay_rule, self.head_wd = layer_decay, layer_decay_rule, head_wd
        self.train_bn, self.opt = train_bn, None
        self.epoch = self.n_epoch = self.train_iter = 0
        self.state, self.ctrl_c = LoopState(), DeferredInterrupt()
        self.recorder, self.progress, self.guard = Recorder(), ProgressCallback(), DivergenceGuard()
        self.check_finite, self.check_inputs = check_finite, check_inputs
        self.interrupted, self.diverged, self.fit_args, self.phase = False, None, None, None
        self.resuming = self.resumed_epoch = self.epoch_rng = None
        # the modules that run the training / evaluation forward during a fit (compiled, DDP-wrapped); None: self.model
        self.fwd = self.fwd_eval = None
        self.callbacks = []
        for cb in as_list(callbacks):
            self.add_cb(cb)
        for fn in as_list(callback_fns):
            if not callable(fn):
                raise TypeError(f'callback_fns= got a {type(fn).__name__} instance; it takes classes or functions '
                                f'learn -> callback (callback_fns=[{type(fn).__name__}]); pass instances in '
                                f'callbacks=[...]')
            self.add_cb(fn(self))
        if training_mode is not None:
            self.set_training_mode(training_mode)

    # the loop state, read and written as learner attributes
    hooks, dl, training, iter, n_iter = (_state_attr(n) for n in ('hooks', 'dl', 'training', 'iter', 'n_iter'))
    xb, yb, pred, loss = (_state_attr(n) for n in ('xb', 'yb', 'pred', 'loss'))
    exception, last_metrics = _state_attr('exception'), _state_attr('last_metrics')

    @property
    def pending_cancel(self):
        """The cancel an earlier hook of the current closing event raised; it is raised when the event's hooks end."""
        return None if self.state.hooks is None else self.state.hooks.pending_cancel

    @property
    def stepping(self):
        """Whether the current training batch ends an optimizer step (always, without gradient accumulation)."""
        return self.stepper.stepping

    # precision (see Stepper)
    bf16, fp16 = property(attrgetter('stepper.bf16')), property(attrgetter('stepper.fp16'))

    to_bf16, to_fp16, to_fp32 = accel.to_bf16, accel.to_fp16, accel.to_fp32

    # ---- callbacks -----------------------------------------------------------------------------------------
    def add_cb(self, cb):
        """Register a callback for every later fit/validate; its hook names are checked now."""
        if isinstance(cb, type):
            raise TypeError(f'add_cb got the class {cb.__name__}; pass an instance, or use '
                            f'callback_fns=[{cb.__name__}]')
        check_hooks(cb)
        self.callbacks.append(cb)
        return cb

    def remove_cb(self, cb):
        """Unregister a callback."""
        if cb in self.callbacks:
            self.callbacks.remove(cb)

    no_bar, mixup = no_bar, mixup  # mixup: fastai v1's learn.mixup(alpha=0.4) adds a MixUp callback

    def _new_state(self, extra=()):
        """A fresh loop state whose hook table holds the built-in and registered callbacks and `extra`."""
        guard = [self.guard] if self.check_finite else []
        hooks = Hooks([self.recorder, self.progress, *guard, *self.callbacks, *extra], adapt=v1_hooks)
        if hooks.adapted:
            hooks.table['after_batch'].append(('fastai v1 stop_epoch', v1_stop_epoch_hook))
        return LoopState(hooks)

    def __call__(self, event):
        self.state.hooks(self, event)

    def _with_events(self, f, name, cancel):
        try:
            self(f'before_{name}')
            f()
        except cancel:
            pass
        self(f'after_{name}')

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
        epochs, callbacks = check_fit(self, epochs), as_list(callbacks)
        for cb in callbacks:  # before anything is set up: a class given here would fail only at its first event
            check_hooks(cb)
        if clip is not None:
            callbacks.append(GradientClipping(clip=clip))
        optim.prepare_opt(self, lr, self.wd if wd is None else wd)
        state = self._new_state(callbacks)
        self.stepper.begin(_accumulation(state.hooks.cbs))
        self.state = state
        self.n_epoch, self.train_iter, self.epoch, self.interrupted, self.diverged = epochs, 0, 0, False, None
        self.ctrl_c.boundary = None
        self.fit_args = {'lr': [g['lr'] for g in self.opt.param_groups], 'wd': self.wd if wd is None else wd}
        try:
            point = resuming.load_for_resume(self, resume) if resume is not None and resume is not False else None
        except BaseException:
            self.state.hooks = None
            raise
        try:
            with self.ctrl_c.deferring(), accel.cudnn_benchmark(self):
                self._run_fit(point)
            if self.ctrl_c.requested:  # Ctrl-C after the last batch boundary: fit completed, then stop
                self.ctrl_c.requested, self.interrupted = False, True
                raise KeyboardInterrupt
        finally:
            self.state.hooks = self.resuming = self.resumed_epoch = self.fwd = self.fwd_eval = None

    def _run_fit(self, point):
        hooks = self.state.hooks
        try:
            try:
                for self.epoch in range(resuming.begin(self, point, self._before_fit), self.n_epoch):
                    self._with_events(self._do_epoch, 'epoch', CancelEpochException)
                    if self.state.stop_training:
                        break
            except CancelFitException:
                pass
        except BaseException as e:
            self.exception, self.interrupted = e, isinstance(e, KeyboardInterrupt)
            hooks.close(self, 'after_fit', e)
            self.dist.drop(self)
            raise
        try:
            self('after_fit')
        except BaseException as e:  # the later after_fit hooks must still close bars and files
            self.exception, self.interrupted = e, isinstance(e, KeyboardInterrupt)
            hooks.close(self, 'after_fit', e, after_failed=True)
            raise
        self.dist.barrier()  # rank 0's files (checkpoints, logs) exist before any rank goes on

    def _before_fit(self):
        """Set up this fit's forward modules, then before_fit."""
        self.dist.sync_rng()  # every rank draws rank 0's permutations (a resumed run then sets the checkpoint's RNG)
        self.fwd = self.dist.setup(self)  # built before before_fit; copies rank 0's weights to every rank
        self.setup_forward()  # torch.compile (of the DDP wrapper when there is one)
        self.opt.zero_grad()  # gradients left by an interrupted step must not leak into this fit's first step
        self('before_fit')

    def setup_forward(self):
        """The forward modules of this fit: with `compile`, torch.compile'd wrappers of the model (made once and
        kept), which share its parameters; `learn.model` itself stays the plain module."""
        base = self.model if self.fwd is None else self.fwd
        if self.compiled:  # keep only the wrappers of what runs now (not an old model or DDP wrapper)
            self.compiled = {k: v for k, v in self.compiled.items() if v[0] is base or v[0] is self.model}
        fwd, fwd_eval = accel.compile_module(self, base), accel.compile_module(self, self.model)
        self.fwd, self.fwd_eval = (None if fwd is self.model else fwd), (None if fwd_eval is self.model else fwd_eval)

    def _do_epoch(self):
        self.resumed_epoch = None  # read by the Recorder's before_epoch of a resumed epoch
        self.last_metrics = []  # a cancelled epoch must not report the previous epoch's validation
        self.dl, self.training, self.phase = self.dist.loader(self.data.train_dl, True), True, 'train'
        self.model.train()
        self._with_events(self._all_batches, 'train', CancelTrainException)
        self.dist.sync_buffers(self)  # each rank's last forward updated its own BatchNorm statistics
        valid_dl, self.phase = self.data.valid_dl, 'valid'
        skip = valid_dl is None or self.state.skip_validate  # a fastai v1 callback returned {'skip_validate': True}
        self.last_metrics = [] if skip else self._validate(valid_dl, self.metrics)
        self.phase = None

    def _validate(self, dl, metrics):
        s = self.state
        s.dl, s.training, s.vals = self.dist.loader(dl, False), False, []
        s.val_metrics = Evaluation(metrics, self.device)  # torchmetrics objects: reset and on the device
        self.model.eval()
        with torch.no_grad():
            self._with_events(self._all_batches, 'validate', CancelValidateException)
        reduce = None if self.dist.world == 1 else self.dist.reduce  # sums and counts over every rank's share
        return s.val_metrics.values(s.vals, self.device, reduce)

    def _all_batches(self):
        s = self.state
        s.n_iter = len(s.dl) if hasattr(s.dl, '__len__') else None
        s.iter, s.first_batch, batches, start = -1, True, s.dl, 0
        if s.training:
            if self.resuming is not None:  # a resumed epoch: skip the batches the checkpoint had done
                batches, start = resuming.replay(self, s.dl)
                s.iter = start - 1
            else:
                self.epoch_rng = rng_state()  # fixes this epoch's data order: a checkpoint can replay it
            if self.stepper.n_acc > 1:
                self._accumulate_batches(batches, start)
                batches = ()
        for s.iter, b in enumerate(batches, start):
            self._one_batch(b)
        if s.training and s.iter == -1:
            raise ValueError('the training DataLoader yielded no batches (data.train_dl is empty)')

    def _accumulate_batches(self, batches, start):
        """The training batches under gradient accumulation: a step after every n_acc batches and after the last
        batch of the epoch; the batches that do not step skip DDP's gradient all_reduce (no_sync)."""
        s, stepper = self.state, self.stepper
        n, last = stepper.n_acc, s.n_iter - 1
        try:
            for s.iter, b in enumerate(batches, start):
                stepper.stepping = (s.iter + 1) % n == 0 or s.iter == last
                with contextlib.nullcontext() if stepper.stepping else self.dist.no_sync():
                    self._one_batch(b)
                if stepper.stepping:
                    stepper.acc_loss = None  # the group is over (stepped, or cancelled and cleared)
        finally:
            stepper.end_group(self.opt)

    def prepare_batch(self, b):
        """A batch from a loader as (inputs tuple, targets) on the learner's device (and memory format)."""
        dev = self.device
        xb = (_to(b[0], dev),) if len(b) == 2 else _to(b[:-1], dev)  # (x, y) is the common case: no slicing
        if self.channels_last:
            xb = tuple(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x for x in xb)
        return xb, _to(b[-1], dev)

    def _one_batch(self, b):
        s, stepper = self.state, self.stepper
        s.xb, s.yb = self.prepare_batch(b)
        if self.check_inputs:
            check_finite_inputs(s.xb, self.epoch, s.iter)
        try:
            s.hooks(self, 'before_batch')
            self._do_one_batch()
        except CancelBatchException:
            stepper.cancelled(self.opt, s.training)
        except BaseException:  # another cancel, an error or Ctrl-C after clipping unscaled (fp16): close that step
            if stepper.unscaled:
                stepper.drop_step(self.opt)
            raise
        try:
            s.hooks(self, 'after_batch')
        finally:
            if s.training and stepper.stepping:  # train_iter counts optimizer steps
                self.train_iter += 1
        if self.ctrl_c.requested and (stepper.stepping or not s.training):
            # a deferred Ctrl-C: this batch is complete (with accumulation: its group too): stop where a Checkpoint
            # can save this point: after this training batch, or (interrupted in the epoch's validation) after the
            # epoch's training; elsewhere (a validate() inside a training hook) nowhere
            self.ctrl_c.stop_here('train' if s.training else 'valid' if self.phase == 'valid' else None)

    def _do_one_batch(self):
        s, stepper, run = self.state, self.stepper, self.state.hooks  # (hooks called directly: the hot path)
        model = self.fwd if s.training else self.fwd_eval
        model = self.model if model is None else model
        # the first training batch's checks run after its forward: BatchNorm statistics are put back if they fail
        before = Snapshot.take(self, ('buffers',)) if s.first_batch and s.training else None
        if stepper.amp:
            with stepper.autocast():
                s.pred = model(*s.xb)
        else:
            s.pred = model(*s.xb)
        run(self, 'after_pred')
        if s.first_batch:
            self._check_first_batch(before)
        if stepper.amp:
            with stepper.autocast():
                s.loss = self.loss_func(s.pred, s.yb)
        else:
            s.loss = self.loss_func(s.pred, s.yb)
        run(self, 'after_loss')
        if not s.training:
            try:
                mets = s.val_metrics(s.pred, s.yb)
            except Exception as e:  # a bare shape or dtype error would not say which metric
                raise metric_error(s.val_metrics.metrics, s.pred, s.yb, s.iter, e) from e
            s.vals.append((s.yb.shape[0], (s.loss.detach(), *mets)))
            return
        if not stepper.backward(self):
            return
        run(self, 'after_backward')
        stepper.step(self.opt)
        run(self, 'after_step')
        self.opt.zero_grad()

    def _check_first_batch(self, before):
        """The first batch of a pass: its targets against the model's output (`check_batch`); `before` (the buffers
        before a training forward) is put back if the check fails."""
        self.state.first_batch = False
        try:
            check_batch(self)
        except Exception:
            if before is not None:
                before.restore()
            raise

    def batches_per_epoch(self):
        """Batches in a training epoch: len(data.train_dl), or of this rank's share of it in distributed training
        (the same on every rank). TypeError for a loader without a length."""
        return len(self.dist.loader(self.data.train_dl, True))

    def steps_per_epoch(self, callbacks=None):
        """Optimizer steps in a training epoch: the batches, or with gradient accumulation ceil(batches / n_step).
        Outside a fit (or given `callbacks`, those of the coming call) the accumulation is read from learn.callbacks
        and `callbacks`. TypeError for a loader without a length."""
        n = self.batches_per_epoch()
        k = self.stepper.n_acc if self.state.hooks is not None and callbacks is None else \
            _accumulation([*self.callbacks, *as_list(callbacks)])
        return -(-n // k)

    # ---- optimizer, layer groups and freezing ------------------------------------------------------------------
    def create_opt(self, lr=3e-3, wd=None):
        """Build `learn.opt` from `opt_func` with one group per layer group (two when bn_wd=False)."""
        return optim.create_opt(self, lr, wd)

    def split(self, split_on):
        """Set the layer groups: a function model -> modules, cut indices of a Sequential, or {module name:
        settings}; the optimizer is rebuilt at the next fit."""
        optim.split(self, split_on)
        return self

    freeze_to, freeze, unfreeze = optim.freeze_to, optim.freeze, optim.unfreeze
    set_training_mode, param_summary = optim.set_training_mode, optim.param_summary

    # ---- fit policies and the LR range test (minifast.policies) -----------------------------------------------
    fit_one_cycle, fit_sgdr, fit_clr = policies.fit_one_cycle, policies.fit_sgdr, policies.fit_clr
    fit_step, fit_exp, fit_warmup_cosine = policies.fit_step, policies.fit_exp, policies.fit_warmup_cosine
    fit_flat_cos, fit_fc, fit_phases = policies.fit_flat_cos, policies.fit_flat_cos, policies.fit_phases
    lr_find, warmup = policies.lr_find, accel.warmup

    # ---- evaluation ------------------------------------------------------------------------------------------
    def validate(self, dl=None, callbacks=None, metrics=None):
        """Loss and metrics over `dl` (default: the validation set) as [loss, *metric values] (Python floats)."""
        dl = self.data.valid_dl if dl is None else dl
        if dl is None:
            raise ValueError('validate() needs a DataLoader: this learner has no validation set '
                             '(data.valid_dl is None)')
        metrics = self.metrics if metrics is None else check_metrics(metrics)
        saved, was_training = self.state, self.model.training
        self.state = state = self._new_state(as_list(callbacks))
        try:
            return self._validate(dl, metrics)
        except BaseException as e:
            self.exception = e
            state.hooks.close(self, 'after_validate', e)
            raise
        finally:  # validate may run inside a fit (from a callback): leave the fit's state as it was
            self.state = saved
            self.model.train(was_training)

    get_preds, predict, predict_files = inference.get_preds, inference.predict, inference.predict_files
    export, summary = exporting.export, model_summary
    interpret, show_results, TTA, tta_only = interp.interpret, interp.show_results, tta.TTA, tta.tta_only

    # ---- persistence -----------------------------------------------------------------------------------------
    def model_file(self, name):
        """The file of `name`: path/model_dir/name.pth, or `name` itself when it ends in .pth."""
        p = Path(name)
        return p if p.suffix == '.pth' else self.path / self.model_dir / f'{name}.pth'

    save, load = resuming.save, resuming.load
