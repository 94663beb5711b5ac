"""WeightSnapshots: copies of the model's weights at chosen epochs (the seed's GetWeights, built in)."""
import warnings
from pathlib import Path

from ..checks import int_value
from ..checkpoint import atomic_save, load_state
from ..core import Callback
from ..lock import acquire, release

__all__ = ['WeightSnapshots', 'sgdr_cycle_ends', 'clr_cycle_ends', 'state_dict_copy']


def state_dict_copy(model):
    """A CPU copy of `model.state_dict()` that later training cannot change (`.cpu()` alone aliases on CPU)."""
    return {k: v.detach().to('cpu', copy=True) for k, v in model.state_dict().items()}


def sgdr_cycle_ends(n_cycles, cycle_len, cycle_mult=2):
    """The 0-based epochs at which the cycles of `fit_sgdr(n_cycles, cycle_len, cycle_mult=...)` end."""
    ends, e = [], 0
    for i in range(n_cycles):
        e += cycle_len * cycle_mult ** i
        ends.append(e - 1)
    return ends


def clr_cycle_ends(epochs, step_size_up, step_size_down=None, steps_per_epoch=1):
    """The 0-based epochs of `fit_clr(epochs, ...)` whose last step ends a cycle (lr back at base_lr).

    Step sizes are in steps, as fit_clr takes them; a cycle that ends inside an epoch is not listed (Smith's advice,
    step sizes of whole epochs, makes every cycle end on an epoch boundary).
    """
    cycle = step_size_up + (step_size_up if step_size_down is None else step_size_down)
    return [e for e in range(epochs) if ((e + 1) * steps_per_epoch) % cycle == 0]


def _epochs(v, name):
    """The set of 0-based epochs in `v` (a list of ints; None for none), or a TypeError naming `name`."""
    if v is None:
        return set()
    if isinstance(v, (str, bytes)) or not hasattr(v, '__iter__'):  # save_list=5 meant [5]: say so
        raise TypeError(f'WeightSnapshots: {name} must be a list of epochs (0-based ints), e.g. [5, 7]; got {v!r}')
    bad = [e for e in v if int_value(e) is None]
    if bad:
        raise TypeError(f'WeightSnapshots: {name} must hold epochs as ints (0-based); got {bad[0]!r} in {v!r}')
    return {int_value(e) for e in v}


class WeightSnapshots(Callback):
    """Keep CPU copies of the model's state dict after chosen epochs: `learn.snapshots[epoch]` is one.

    Choose the epochs (0-based, as the epoch table counts them) with `save_list=[5, 7]`, `every_epoch=True`, or
    `cycle_ends=` a list of epochs (see `sgdr_cycle_ends`, `clr_cycle_ends`); the union is taken, and with none of
    them every epoch is kept. A snapshot is taken in after_epoch, so after that epoch's validation. With `path`, each
    snapshot is also written atomically to path/snapshot_{epoch}.pth (a plain state dict, loadable with
    minifast.checkpoint.load_state, which verifies its checksum, or torch.load(weights_only=True)). The mapping is
    reset at the start of each fit and set on the learner as `learn.snapshots` (also kept as `self.snapshots`).
    Usable in callback_fns= and callbacks=. With `path`, the folder is locked from before_fit to the end of the fit
    (see minifast.lock): another process's fit writing snapshots there stops at its before_fit with a
    FolderLockedError.
    """
    order = 60  # after the Recorder (50): the epoch's row is complete when the snapshot is taken

    def __init__(self, learn=None, save_list=None, every_epoch=False, cycle_ends=None, path=None):
        super().__init__(learn)
        self.every_epoch = every_epoch or (save_list is None and cycle_ends is None)
        self.epochs = _epochs(save_list, 'save_list') | _epochs(cycle_ends, 'cycle_ends')
        self.path = None if path is None else Path(path)
        self.snapshots, self.files = {}, {}
        self._locks = []  # the folders this callback holds, one per fit running it

    def before_fit(self, learn):
        if self.path is not None and learn.is_main:  # one process writes snapshot_{e}.pth files at a time
            self._locks.append(acquire(self.path, 'WeightSnapshots'))
        self.snapshots, self.files = {}, {}
        learn.snapshots = self.snapshots
        late = sorted(e for e in self.epochs if not 0 <= e < learn.n_epoch)
        if late and learn.is_main:  # else silently never taken, and the interpolation fails later with a KeyError
            warnings.warn(f'WeightSnapshots: epoch(s) {late} of save_list/cycle_ends are outside this '
                          f'{learn.n_epoch}-epoch fit (epochs count from 0: 0 to {learn.n_epoch - 1}); no snapshot '
                          f'will be taken there')

    def after_epoch(self, learn):
        e = learn.epoch
        if not (self.every_epoch or e in self.epochs):
            return
        sd = state_dict_copy(learn.model)
        self.snapshots[e] = sd
        if self.path is not None and learn.is_main:  # distributed: rank 0 writes, every rank keeps the copy
            self.files[e] = atomic_save(sd, self.path / f'snapshot_{e}.pth')

    def after_fit(self, learn):
        if self._locks:
            release(self._locks.pop())

    def state_dict(self):
        """What a checkpoint keeps so that a resumed fit has every snapshot: their files when they are written to
        `path` (the checkpoint stays small), else the snapshots themselves."""
        files = {e: str(f) for e, f in self.files.items()}
        return {'files': files, 'snapshots': {} if self.path is not None else self.snapshots}

    def load_state_dict(self, state):
        """Restore what `state_dict` returned (snapshots kept as files are read back, weights-only)."""
        self.files = {int(e): Path(f) for e, f in state['files'].items()}
        snaps = {int(e): sd for e, sd in state['snapshots'].items()}
        for e, f in self.files.items():
            if e not in snaps:
                snaps[e] = load_state(f)
        self.snapshots.clear()
        self.snapshots.update(snaps)

    def get_weights(self):
        """The snapshots {epoch: state dict} (the seed's GetWeights.get_weights)."""
        return self.snapshots
