"""Progress bars and the epoch table (fastprogress), and ShowGraph's live loss curves in notebooks."""
import contextlib
import sys
import time

from fastprogress import fastprogress as fp
from fastprogress.fastprogress import format_time, master_bar, progress_bar

from ..core import Callback

__all__ = ['ProgressCallback', 'ShowGraph', 'no_bar', 'interactive']


@contextlib.contextmanager
def no_bar(learn):
    """Context manager that silences the learner's progress bars and epoch table (Learner.no_bar)."""
    old, learn.silent = learn.silent, True
    try:
        yield learn
    finally:
        learn.silent = old


def _live():
    """True where bars can redraw in place: a notebook, or a terminal."""
    return fp.IN_NOTEBOOK or sys.stdout.isatty()


def interactive():
    """True in a notebook or an interactive Python prompt: where a hint to type something can be followed."""
    return bool(fp.IN_NOTEBOOK or hasattr(sys, 'ps1'))


class _PlainTable:
    """Stands in for the master bar where nothing redraws (logs, files): prints the epoch table and nothing else."""

    def __init__(self):
        self.widths = None

    def write(self, line, table=True):
        if self.widths is None:
            self.widths = [max(len(n), 8) for n in line]
        print('  '.join(str(v).ljust(w) for v, w in zip(line, self.widths)).rstrip(), flush=True)

    def on_iter_begin(self):
        pass

    on_iter_end = on_iter_begin

    def update(self, *args, **kwargs):
        pass

    update_graph = update


class ProgressCallback(Callback):
    """Master bar over epochs, a child bar over batches and one table row per epoch; quiet when `learn.silent`.

    The bar's own update is a counter compare; the smoothed loss shown beside it is read at most every
    `comment_every` seconds, so the bar costs no per-step host synchronisation. Outside a notebook, when stdout
    is not a terminal (CI logs, files), only the epoch table is printed. In distributed training only rank 0 shows
    anything. With `table` False (lr_find's sweep) only the bars are shown, and nothing where they cannot redraw.
    """
    order = 60

    def __init__(self, comment_every=0.5):
        self.comment_every, self.mbar, self.pbar, self._outer = comment_every, None, None, []
        self.table = True

    @contextlib.contextmanager
    def bars_only(self):
        """Within: progress bars but no epoch table (lr_find's sweep, whose rows would be `#na#` but for a train
        loss its plot shows better)."""
        old, self.table = self.table, False
        try:
            yield
        finally:
            self.table = old

    def before_fit(self, learn):
        self.mbar = self.pbar = None
        self._outer = []
        if learn.silent or not learn.is_main or not (self.table or _live()):
            return
        self.mbar = master_bar(range(learn.n_epoch)) if _live() else _PlainTable()
        self.mbar.on_iter_begin()
        if self.table:
            names = ['epoch', 'train_loss', 'valid_loss', *learn.recorder.metrics_names, 'time']
            self.mbar.write(names, table=True)

    def before_epoch(self, learn):
        if self.mbar is not None:
            self.mbar.update(learn.epoch)

    def _start_bar(self, learn):
        self._outer.append(self.pbar)  # a validate() called from a callback nests inside the training bar
        self.pbar = None
        if learn.silent or not learn.is_main or not _live():
            return
        n = len(learn.dl) if hasattr(learn.dl, '__len__') else None
        if n:
            self.pbar = progress_bar(range(n), parent=self.mbar, leave=False)
            self.pbar.update(0)
            self._last = time.monotonic()

    before_train = before_validate = _start_bar

    def after_batch(self, learn):
        pb = self.pbar
        if pb is None:
            return
        pb.update(learn.iter + 1)
        if learn.training and pb.last_v is not None:
            now = time.monotonic()
            if now - self._last > self.comment_every:
                loss = learn.recorder.smooth_loss  # None until the first optimizer step
                self._last = now
                if loss is not None:
                    pb.comment = f'{loss:.4f}'

    def _end_bar(self, learn):
        if self.pbar is not None and self.pbar.last_v is not None:
            self.pbar.on_iter_end()
        self.pbar = self._outer.pop() if self._outer else None

    after_train = after_validate = _end_bar

    def after_epoch(self, learn):
        if self.mbar is None or not self.table:
            return
        r = learn.recorder
        fmt = lambda v: '#na#' if v is None or v != v else f'{v:.6f}'  # noqa: E731  (nan: not computed)
        row = [str(learn.epoch), fmt(r.train_losses[-1]), fmt(r.val_losses[-1])]
        mets = r.metrics[-1]
        row += [fmt(v) for v in mets] + ['#na#'] * (len(r.metrics_names) - len(mets))
        self.mbar.write(row + [format_time(r.times[-1])], table=True)

    def after_fit(self, learn):
        pbar, mbar, self.pbar, self.mbar, self._outer = self.pbar, self.mbar, None, None, []
        # dropped first: a bar whose closing fails (a display gone, a second Ctrl-C) must not outlive this fit
        try:
            if pbar is not None:
                if learn.exception is not None:
                    pbar.on_interrupt()
                elif pbar.last_v is not None:
                    pbar.on_iter_end()
        finally:
            if mbar is not None:
                mbar.on_iter_end()


class ShowGraph(Callback):
    """Redraws train and validation loss in the progress bar's graph after each epoch (notebooks only)."""
    order = 70

    def after_epoch(self, learn):
        mbar = learn.progress.mbar
        if mbar is None or not fp.IN_NOTEBOOK:  # the console bar has no graph, and its `names` are table columns
            return
        r = learn.recorder
        losses = r.losses
        if not losses:
            return
        graphs = [(list(range(len(losses))), losses)]
        ends, val = [], []
        total = 0
        for n, v in zip(r.nb_batches, r.val_losses):
            total += n
            if v is not None:
                ends.append(total)
                val.append(v)
        if val:
            graphs.append((ends, val))
        per_epoch = max(r.nb_batches[-1], 1)
        x_bounds = (0, max(learn.n_epoch * per_epoch, len(losses)))
        ys = losses + val
        y_bounds = (min(ys), max(ys) * 1.05 if max(ys) > 0 else 0.)
        mbar.names = ['train', 'valid'][:len(graphs)]
        mbar.update_graph(graphs, x_bounds, y_bounds)
