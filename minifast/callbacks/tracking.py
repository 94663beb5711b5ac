"""Tracking callbacks: Checkpoint (full, resumable training state on disk) and DivergenceGuard (stop on a non-finite
loss, keeping the last finite weights)."""
import math
import re
from numbers import Integral
from pathlib import Path

import torch

from ..accel import all_finite
from ..checkpoint import atomic_save
from ..distributed import all_reduce_
from ..lock import acquire, release
from ..core import Callback, CancelEpochException, CancelTrainException, DivergenceError
from ..resume import CHECKPOINT_FILE, list_checkpoints, training_state
from ..state import LiveCopy

__all__ = ['Checkpoint', 'DivergenceGuard', 'monitored_value', 'monitored_values', 'monitor_mode']


def monitor_mode(monitor, mode='auto'):
    """'min' or 'max': with 'auto', min for names holding 'loss' or 'error', max otherwise (accuracy...)."""
    if mode not in ('auto', 'min', 'max'):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode != 'auto':
        return mode
    return 'min' if ('loss' in monitor or 'error' in monitor) else 'max'


def _monitor_names(learn):
    return ['train_loss', 'valid_loss', *learn.recorder.metrics_names]


def check_monitor(learn, monitor, who):
    """Raise, listing the names that exist, unless `monitor` is one of train_loss, valid_loss or a metric's name."""
    names = _monitor_names(learn)
    if monitor not in names:
        raise ValueError(f"{who}: monitor {monitor!r} is not recorded; the names are {', '.join(map(repr, names))}")
    if monitor != 'train_loss' and learn.data.valid_dl is None:
        raise ValueError(f'{who}: monitor {monitor!r} is computed on the validation set, and this learner has none '
                         f"(data.valid_dl is None); monitor 'train_loss' instead")


def monitored_values(recorder, monitor):
    """The recorded value of `monitor` at each epoch so far (None where it was not computed, e.g. a cancelled
    validation)."""
    if monitor == 'train_loss':
        return list(recorder.train_losses)
    if monitor == 'valid_loss':
        return list(recorder.val_losses)
    i = recorder.metrics_names.index(monitor)
    return [row[i] if i < len(row) else None for row in recorder.metrics]


def monitored_value(learn, monitor):
    """This epoch's value of `monitor` from the Recorder (nan when it was not computed, e.g. a cancelled validation)."""
    v = monitored_values(learn.recorder, monitor)[-1]
    return float('nan') if v is None else float(v)


class Checkpoint(Callback):
    """Write the full training state (see minifast.resume) to `path` during fit, so that
    `fit(..., resume=path)` (any fit method) continues exactly where it stopped.

    Args:
        path: the folder (relative to learn.path); files are named {name}_{seq}_epoch{E}_step{S}.pth.
        every: 'epoch' (after each epoch's validation), 'improvement' (after an epoch whose `monitor` improved on
            the best so far) or a number of training steps.
        monitor: 'valid_loss', 'train_loss' or a metric's name; the best value is kept as `self.best`.
        keep_last: how many of the newest files to keep in the folder (None: all); in 'improvement' mode the best is
            always kept.
        mode: 'auto' (min for losses and errors, max otherwise), 'min' or 'max'.

    A completed fit also writes a final 'finished' state unless its last epoch's checkpoint already is one, and a
    Ctrl-C taken at a batch boundary (minifast defers it there) writes the state at that boundary. Writes are atomic
    (a temporary file in the same folder, then os.replace), and with the learner's divergence check on, only weights
    verified finite are written. Usable in callback_fns= and callbacks=. In distributed training every rank makes the
    same decisions (the values it monitors are reduced across ranks) and rank 0 writes the files.

    The folder is written by one process at a time: from before_fit to the end of the fit (however it ends) this
    process holds the folder's lock (see minifast.lock), and a fit of another process into that folder stops at its
    before_fit, before it trains or writes anything, with a FolderLockedError naming the folder and this PID.
    """
    order = 90  # after the Recorder, loggers and snapshots: the epoch's row and their state are complete

    def __init__(self, learn=None, path='checkpoints', every='epoch', monitor='valid_loss', keep_last=2, mode='auto',
                 name='ckpt'):
        super().__init__(learn)
        if not (every in ('epoch', 'improvement') or (isinstance(every, Integral) and not isinstance(every, bool)
                                                      and every >= 1)):
            raise ValueError(f"Checkpoint: every must be 'epoch', 'improvement' or a number of steps >= 1, got "
                             f'{every!r}')
        if keep_last is not None and (not isinstance(keep_last, Integral) or keep_last < 1):
            raise ValueError(f'Checkpoint: keep_last must be a positive integer or None, got {keep_last!r}')
        if not isinstance(name, str) or not name or '/' in name:
            raise ValueError(f'Checkpoint: name must be a non-empty file name prefix, got {name!r}')
        self.path, self.every, self.monitor, self.keep_last, self.name = Path(path), every, monitor, keep_last, name
        self.mode = monitor_mode(monitor, mode)
        self.best, self.best_file, self.last_file, self.files = None, None, None, []
        self._locks = []  # the folders this callback holds, one per fit running it (a fit inside a fit: two)

    def folder(self, learn=None):
        """The checkpoint folder: `path`, relative to learn.path unless absolute."""
        learn = learn or self.learn
        return self.path if self.path.is_absolute() else learn.path / self.path

    resume_folder = folder  # where fit(..., resume=True) resumes from

    def before_fit(self, learn):
        self.learn = learn
        if self.monitor is not None and (self.every == 'improvement' or learn.data.valid_dl is not None
                                         or self.monitor == 'train_loss'):
            check_monitor(learn, self.monitor, 'Checkpoint')
        if learn.is_main:  # before anything is written: another process's files must not be pruned or resumed
            self._locks.append(acquire(self.folder(learn), 'Checkpoint'))
        self.best, self.best_file, self.last_file, self.files = None, None, None, []
        self._last_where = self._last_step = None

    def _improved(self, v):
        if math.isnan(v):
            return False
        return self.best is None or (v < self.best if self.mode == 'min' else v > self.best)

    def after_batch(self, learn):
        if (learn.training and not isinstance(self.every, str) and learn.stepping
                and (learn.train_iter + 1) % self.every == 0):  # with accumulation: only where a step ended
            cancel = learn.pending_cancel  # raised by an earlier hook of this after_batch, after the hooks run
            if isinstance(cancel, CancelEpochException):
                return  # the epoch ends here, unvalidated: no point inside it to resume into
            # a cancelled training phase is over: a resumed run goes straight to this epoch's validation
            self._write(learn, 'batch', batch=learn.n_iter if isinstance(cancel, CancelTrainException) else None)

    def after_epoch(self, learn):
        improved = False
        if learn.data.valid_dl is not None or self.monitor == 'train_loss':
            v = monitored_value(learn, self.monitor)
            improved = self._improved(v)
            if improved:
                self.best = v
        if self.every == 'epoch' or (self.every == 'improvement' and improved):
            self._write(learn, 'epoch', best=improved)

    def after_fit(self, learn):
        try:
            self._write_at_end(learn)
        finally:  # also when the fit or this write failed: the folder is free once this fit is over
            if self._locks:
                release(self._locks.pop())

    def _write_at_end(self, learn):
        e = learn.exception
        if learn.is_main and not self._locks:
            return  # this fit never took the folder (its before_fit did not run or was refused): write nothing
        if e is None:
            last_epoch_done = self._last_where == ('epoch', learn.epoch) and learn.epoch + 1 >= learn.n_epoch
            if not last_epoch_done:  # a step checkpoint at the very end is replaced by the finished state
                same = self._last_step == learn.train_iter and self.last_file is not None
                self._write(learn, 'end', self.last_file if same else None)
        elif isinstance(e, KeyboardInterrupt) and learn.ctrl_c.boundary is not None:
            # a Ctrl-C deferred to a batch boundary: after a training batch, or in validation (training is done)
            all_batches = learn.batches_per_epoch() if learn.ctrl_c.boundary == 'valid' else None
            self._write(learn, 'boundary', batch=all_batches)

    def _write(self, learn, where, file=None, batch=None, best=False):
        if learn.check_finite:
            learn.guard.verify(learn)  # raises DivergenceError (nothing written) unless the weights are finite
        step = learn.train_iter + (1 if where == 'batch' else 0)
        if not learn.is_main:  # distributed: rank 0 writes; the others only follow where it is
            self._last_where, self._last_step = (where, learn.epoch), step
            return
        folder = self.folder(learn)
        if file is None:
            files = list_checkpoints(folder)
            seq = 1 + max((int(CHECKPOINT_FILE.search(p.name).group(1)) for p in files), default=-1)
            file = folder / f'{self.name}_{seq:05d}_epoch{learn.epoch}_step{step}.pth'
        if best:
            self.best_file = file  # before the state is taken, so the file records itself as the best
        atomic_save(training_state(learn, where, batch=batch), file)
        self.last_file, self._last_where, self._last_step = file, (where, learn.epoch), step
        if file not in self.files:
            self.files.append(file)
        self._prune(folder)

    def _prune(self, folder):
        if self.keep_last is None:
            return
        mine = re.compile(rf'^{re.escape(self.name)}_\d+_epoch\d+_step\d+\.pth$')
        files = [p for p in list_checkpoints(folder) if mine.match(p.name)]
        keep = set(files[-self.keep_last:]) | ({self.best_file} if self.every == 'improvement' else set())
        for p in files:
            if p not in keep:
                p.unlink(missing_ok=True)

    def state_dict(self):
        """The best monitored value so far and its file (restored on resume)."""
        return {'best': self.best, 'best_file': None if self.best_file is None else str(self.best_file)}

    def load_state_dict(self, state):
        """Restore what `state_dict` returned."""
        self.best = state['best']
        self.best_file = None if state['best_file'] is None else Path(state['best_file'])


def _all_finite(ts):
    """Whether every floating-point tensor in `ts` is finite (one host read)."""
    ts = [t for t in ts if t.is_floating_point() or t.is_complex()]
    if not ts:
        return True
    if all(t.device == ts[0].device for t in ts):
        return bool(all_finite(ts))
    return bool(torch.stack([torch.isfinite(t).all() for t in ts]).all())


def _weights_finite(model):
    return _all_finite(model.state_dict().values())


class DivergenceGuard(Callback):
    """Stops fit with DivergenceError when a training loss is not finite, leaving the last finite weights.

    The learner carries one (learn.guard) and runs it while `learn.check_finite` (Learner(check_finite=True), the
    default). On CPU each loss is checked before its backward pass (`check_every=1`): the step that would have used
    it never runs, so the model keeps the weights the loss was computed from when they are finite. On a GPU a per-step
    check would stall the device, so by default the check is every 32 steps (one host sync each): the weights,
    parameters and optimizer state are copied on the device at each check that passes, and a failed check restores
    that copy, which is then at most `check_every` steps older than the first non-finite loss. The weights are also
    checked (and copied) at the end of each epoch's training and before every checkpoint, so no checkpoint or
    snapshot holds non-finite weights. The copy costs the memory of the model and optimizer state once more.

    In distributed training the ranks decide together (their losses differ): on CPU each step's finite flag is
    reduced across ranks (a one-number all_reduce), on a GPU the first bad step at each check; all ranks stop at the
    same step.
    """
    order = -10

    def __init__(self, check_every=None):
        if check_every is not None and (not isinstance(check_every, Integral) or check_every < 1):
            raise ValueError(f'DivergenceGuard: check_every must be a positive integer, got {check_every!r}')
        self.check_every = check_every

    def before_fit(self, learn):
        self.every = self.check_every or (1 if learn.device.type == 'cpu' else 32)
        self._world = learn.dist.world
        self._losses, self._steps = [], []  # checking every n steps: the losses (on the device) since the last check
        self._good = LiveCopy()  # the last verified weights and optimizer state
        self._good.refresh(learn)
        # checking every step: the buffers (BatchNorm statistics) as they were after the last finite loss's forward,
        # since the forward that yields a non-finite loss has already folded it into them
        self._bufs = list(learn.model.buffers()) if self.every == 1 else []
        self._shadow = [b.detach().clone() for b in self._bufs]

    def after_loss(self, learn):
        if not learn.training:
            return
        loss = learn.loss.detach()
        if self.every == 1:  # on CPU, reading a scalar loss costs about a microsecond
            finite = math.isfinite(loss.item()) if loss.ndim == 0 else bool(torch.isfinite(loss).all())
            if self._world > 1:  # every rank must stop at the same step, or the others hang in backward
                finite = self._all_finite(finite, learn.device)
            if not finite:
                value = float(loss.float().flatten()[0])
                self._diverged(learn, learn.train_iter, None if math.isfinite(value) else value)
            if self._bufs:
                torch._foreach_copy_(self._shadow, self._bufs)
            return
        self._losses.append(loss if loss.ndim == 0 else loss.float().sum())  # no kernel in the common case
        self._steps.append(learn.train_iter)
        if (learn.train_iter + 1) % self.every == 0 and learn.stepping:  # accumulation: at the step's last batch
            self.verify(learn)

    @staticmethod
    def _all_finite(finite, device):
        return bool(all_reduce_(torch.tensor([int(finite)], dtype=torch.int32, device=device), 'min')[0])

    def after_train(self, learn):
        self.verify(learn)

    def verify(self, learn):
        """Raise DivergenceError (after restoring the last verified weights) if a non-finite loss was seen since the
        last check or the weights are not finite; otherwise remember the current weights as verified."""
        weights = [t for t in self._good.live(learn)[0] if t.is_floating_point() or t.is_complex()]
        flags = []  # device scalars, read together: the lagged check costs one host sync
        if self.every > 1:
            losses, steps, self._losses, self._steps = self._losses, self._steps, [], []
            if self._world > 1 or losses:  # every rank reduces, also one that saw no batch
                bad = self._first_bad(losses, learn.device)
                if self._world > 1:  # the earliest bad step of any rank (-1: none); ranks run the same steps
                    big = torch.iinfo(torch.long).max
                    first = all_reduce_(torch.where(bad < 0, big, bad), 'min')
                    bad = torch.where(first == big, -1, first)
                flags.append(bad)
        dev = flags[0].device if flags else weights[0].device if weights else None
        on_dev = bool(weights) and all(t.device == dev for t in weights)
        if on_dev:
            flags.append(all_finite(weights).long())
        vals = torch.stack(flags).tolist() if flags else []
        i = vals[0] if self.every > 1 and (self._world > 1 or losses) else -1
        if i >= 0:  # (another rank's step when this one saw no batch: ranks run the same steps)
            self._diverged(learn, steps[i] if i < len(steps) else None, None)
        if not (vals[-1] if on_dev else _all_finite(weights)):
            self._diverged(learn, None, None)
        self._good.refresh(learn)

    @staticmethod
    def _first_bad(losses, device):
        """The index of the first non-finite loss in `losses` as a device scalar, -1 if all are finite."""
        if not losses:
            return torch.full((), -1, dtype=torch.long, device=device)
        bad = ~torch.isfinite(torch.stack(losses))  # stack promotes mixed dtypes (fp16 and fp32 losses)
        return torch.where(bad.any(), bad.int().argmax(), -1)

    def _diverged(self, learn, step, value):
        exact = False
        if self.every == 1 and step is not None:
            with torch.no_grad():
                for b, v in zip(self._bufs, self._shadow):
                    b.copy_(v)
            exact = _weights_finite(learn.model)
        if exact:
            kept = 'the model holds the weights that loss was computed from (the last finite ones)'
        else:
            self._good.restore(learn)
            kept = (f'the weights and optimizer state were restored to those verified finite after '
                    f'{self._good.step} steps of this fit')
        try:
            n = learn.steps_per_epoch()  # steps per epoch (with accumulation: optimizer steps)
        except TypeError:
            n = learn.n_iter or 1
        if step is None:
            where = f'the weights became non-finite by step {learn.train_iter} of this fit (epoch {learn.epoch})'
            epoch = batch = None
        else:
            epoch, batch = (learn.epoch, learn.iter) if self.every == 1 else divmod(step, n)
            if self.every > 1:  # with accumulation: the first batch of that step
                batch *= learn.stepper.n_acc
            what = 'not finite' if value is None else f'{value}'
            where = f'the training loss is {what} at epoch {epoch}, batch {batch} (step {step} of this fit)'
        learn.diverged = {'epoch': epoch, 'batch': batch, 'step': step}
        raise DivergenceError(f'training diverged: {where}; {kept}. Lower the learning rate (learn.lr_find() shows '
                              f'where the loss blows up), or pass check_finite=False to the Learner to train on '
                              f'regardless.', epoch=epoch, batch=batch, step=step)
