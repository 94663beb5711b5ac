"""CSVLogger: one row per epoch in learn.path/filename.csv, equal to the Recorder's history."""
import matplotlib
matplotlib.use('Agg')

import csv  # noqa: E402
from functools import partial  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from minifast import Callback, CallbackException, CSVLogger, DataBunch, Learner, accuracy, top_k_accuracy  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close('all')


def make_learner(path, valid=True, metrics=(accuracy, top_k_accuracy), **kwargs):
    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    xv, yv = torch.randn(70, 8), torch.randint(0, 3, (70,))
    data = DataBunch.from_tensors(x, y, *((xv, yv) if valid else (None, None)), bs=32)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    kwargs.setdefault('device', 'cpu')  # tiny models; the same numbers on every machine
    return Learner(data, model, metrics=list(metrics), path=path, silent=True, **kwargs)


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.reader(f))


def logger_of(learn):
    (cb,) = [c for c in learn.callbacks if isinstance(c, CSVLogger)]
    return cb


def check_rows(rows, recorder, first_epoch=0):
    """rows (dicts of strings) against the recorder's per-epoch history."""
    assert len(rows) == len(recorder.train_losses)
    for e, row in enumerate(rows):
        assert row['epoch'] == str(first_epoch + e)
        assert float(row['train_loss']) == pytest.approx(recorder.train_losses[e], rel=0, abs=1e-9)
        v = recorder.val_losses[e]
        if v is None:
            assert row['valid_loss'] == ''
        else:
            assert float(row['valid_loss']) == pytest.approx(v, rel=0, abs=1e-9)
        for name, m in zip(recorder.metrics_names, recorder.metrics[e] or [None] * len(recorder.metrics_names)):
            if m is None:
                assert row[name] == ''
            else:
                assert float(row[name]) == pytest.approx(m, rel=0, abs=1e-9)
        assert float(row['time']) == pytest.approx(recorder.times[e], abs=6e-4)


def test_csv_logger_writes_history(tmp_path):
    learn = make_learner(tmp_path, callback_fns=[CSVLogger])
    cb = logger_of(learn)
    assert cb.learn is learn
    assert cb.path() == learn.path / 'history.csv' == tmp_path / 'history.csv'
    learn.fit(3, lr=0.01)
    lines = read_csv(tmp_path / 'history.csv')
    assert lines[0] == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'top_k_accuracy', 'time']
    assert len(lines) == 1 + 3
    rows = [dict(zip(lines[0], line)) for line in lines[1:]]
    check_rows(rows, learn.recorder)
    assert len(set(learn.recorder.train_losses)) == 3


def test_read_logged_file(tmp_path):
    learn = make_learner(tmp_path, callback_fns=[CSVLogger])
    learn.fit(2, lr=0.01)
    rows = logger_of(learn).read_logged_file()
    assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows)
    assert list(rows[0]) == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'top_k_accuracy', 'time']
    check_rows(rows, learn.recorder)


def test_without_validation_set(tmp_path):
    learn = make_learner(tmp_path, valid=False, metrics=[accuracy], callback_fns=[CSVLogger])
    learn.fit(2, lr=0.01)
    rows = logger_of(learn).read_logged_file()
    assert [(r['valid_loss'], r['accuracy']) for r in rows] == [('', ''), ('', '')]
    check_rows(rows, learn.recorder)


def test_partial_filename_and_append(tmp_path):
    learn = make_learner(tmp_path, callback_fns=[partial(CSVLogger, filename='h2', append=True)])
    cb = logger_of(learn)
    assert cb.path() == tmp_path / 'h2.csv'
    learn.fit(2, lr=0.01)
    first = [list(learn.recorder.train_losses), list(learn.recorder.val_losses)]
    learn.fit(1, lr=0.01)
    lines = read_csv(tmp_path / 'h2.csv')
    assert [line[0] for line in lines] == ['epoch', '0', '1', '0']  # one header, rows appended
    rows = cb.read_logged_file()
    assert len(rows) == 3
    assert [float(r['train_loss']) for r in rows[:2]] == pytest.approx(first[0], abs=1e-9)
    assert [float(r['valid_loss']) for r in rows[:2]] == pytest.approx(first[1], abs=1e-9)
    check_rows(rows[2:], learn.recorder)
    assert not (tmp_path / 'history.csv').exists()


def test_append_to_existing_file(tmp_path):
    header = 'epoch,train_loss,valid_loss,accuracy,top_k_accuracy,time\n'
    (tmp_path / 'history.csv').write_text(header + '0,1.0,1.0,0.5,0.5,0.001\n')
    learn = make_learner(tmp_path, callback_fns=[partial(CSVLogger, append=True)])
    learn.fit(2, lr=0.01)
    text = (tmp_path / 'history.csv').read_text()
    assert text.startswith(header + '0,1.0,1.0,0.5,0.5,0.001\n')
    assert text.count('epoch') == 1
    rows = logger_of(learn).read_logged_file()
    assert len(rows) == 3
    check_rows(rows[1:], learn.recorder)


def test_append_to_empty_file_writes_header(tmp_path):
    (tmp_path / 'history.csv').write_text('')
    learn = make_learner(tmp_path, callback_fns=[partial(CSVLogger, append=True)])
    learn.fit(1, lr=0.01)
    lines = read_csv(tmp_path / 'history.csv')
    assert lines[0][0] == 'epoch' and len(lines) == 2


def test_no_append_overwrites(tmp_path):
    (tmp_path / 'history.csv').write_text('old,stuff\n1,2\n3,4\n5,6\n7,8\n')
    learn = make_learner(tmp_path, callback_fns=[CSVLogger])
    learn.fit(2, lr=0.01)
    learn.fit(1, lr=0.01)
    lines = read_csv(tmp_path / 'history.csv')
    assert lines[0] == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'top_k_accuracy', 'time']
    assert len(lines) == 2  # only the last fit's epoch
    check_rows(logger_of(learn).read_logged_file(), learn.recorder)


def test_creates_missing_folder(tmp_path):
    learn = make_learner(tmp_path / 'a' / 'b', callback_fns=[CSVLogger])
    learn.fit(1, lr=0.01)
    assert (tmp_path / 'a' / 'b' / 'history.csv').is_file()
    check_rows(logger_of(learn).read_logged_file(), learn.recorder)


class GrabFile(Callback):
    order = 60  # after CSVLogger's after_epoch

    def __init__(self):
        self.files = []

    def after_epoch(self, learn):
        self.files.append(logger_of(learn).file)


def test_file_closed_after_fit(tmp_path):
    learn = make_learner(tmp_path, callback_fns=[CSVLogger])
    grab = GrabFile()
    learn.fit(2, lr=0.01, callbacks=grab)
    assert len(grab.files) == 2 and grab.files[0] is grab.files[1]
    assert grab.files[0].closed
    assert logger_of(learn).file is None


@pytest.mark.parametrize('exc', [RuntimeError, KeyboardInterrupt])
def test_file_closed_after_fit_raises(tmp_path, exc):
    class Boom(Callback):
        def after_batch(self, learn):
            if learn.epoch == 1 and learn.iter == 2:
                raise exc('boom')
    learn = make_learner(tmp_path, callback_fns=[CSVLogger])
    grab = GrabFile()
    with pytest.raises(CallbackException if exc is RuntimeError else KeyboardInterrupt):
        learn.fit(3, lr=0.01, callbacks=[grab, Boom()])
    assert grab.files[0].closed and logger_of(learn).file is None
    rows = logger_of(learn).read_logged_file()
    assert len(rows) == 1  # the finished epoch was written (flushed) before the error
    check_rows(rows, learn.recorder)
