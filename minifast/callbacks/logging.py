"""CSVLogger: one row per epoch in path/filename.csv."""
import csv
import io

from ..core import Callback

__all__ = ['CSVLogger']


class CSVLogger(Callback):
    """Writes epoch, train_loss, valid_loss, each metric and time to learn.path/`filename`.csv, flushed per epoch
    (in distributed training by rank 0 only)."""
    order = 55

    def __init__(self, learn=None, filename='history', append=False):
        super().__init__(learn)
        self.filename, self.append, self.file = filename, append, None

    def path(self, learn=None):
        """The CSV file's path."""
        learn = learn or self.learn
        return learn.path / f'{self.filename}.csv'

    def before_fit(self, learn):
        self.learn = learn
        if not learn.is_main:  # another rank writes the file
            self.file, self._offset, self._text = None, 0, ''
            return
        p = self.path(learn)
        p.parent.mkdir(parents=True, exist_ok=True)
        header = ['epoch', 'train_loss', 'valid_loss', *learn.recorder.metrics_names, 'time']
        new = not (self.append and p.exists() and p.stat().st_size > 0)
        self.file = open(p, 'w' if new else 'a', newline='')
        self._offset, self._text = self.file.tell(), ''  # where this fit's rows begin, and what it wrote
        if new:
            self._row(header)

    def _row(self, row):
        if self.file is None:
            return
        buf = io.StringIO()
        csv.writer(buf).writerow(row)
        self.file.write(buf.getvalue())
        self.file.flush()
        self._text += buf.getvalue()

    def after_epoch(self, learn):
        r = learn.recorder
        mets = r.metrics[-1] + [''] * (len(r.metrics_names) - len(r.metrics[-1]))
        val = '' if r.val_losses[-1] is None else r.val_losses[-1]
        self._row([learn.epoch, r.train_losses[-1], val, *mets, f'{r.times[-1]:.3f}'])

    def state_dict(self):
        """Where this fit's rows start in the file and the rows written so far (a checkpoint keeps them)."""
        return {'offset': self._offset, 'text': self._text}

    def load_state_dict(self, state):
        """Resuming: the file again holds what it held at the checkpoint (rows of epochs run after it go)."""
        if self.file is None:  # not the rank that writes
            self._offset, self._text = state['offset'], state['text']
            return
        self.file.close()
        with open(self.path(), 'r+' if self.path().exists() else 'w', newline='') as f:
            f.truncate(state['offset'])
            f.seek(state['offset'])
            f.write(state['text'])
        self.file = open(self.path(), 'a', newline='')
        self._offset, self._text = state['offset'], state['text']

    def after_fit(self, learn):
        if self.file is not None:
            self.file.close()
            self.file = None

    def read_logged_file(self):
        """The logged rows as a list of dicts (column name -> string)."""
        with open(self.path(), newline='') as f:
            return list(csv.DictReader(f))
