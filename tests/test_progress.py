"""ProgressCallback (bars and the epoch table), no_bar/silent, ShowGraph, and interrupts."""
import matplotlib
matplotlib.use('Agg')

import copy  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from fastprogress import fastprogress as fp  # noqa: E402
from torch import nn  # noqa: E402

import minifast.callbacks.progress as progress_mod  # noqa: E402
from minifast import (Callback, CallbackException, CancelBatchException, DataBunch, Learner, ShowGraph,  # noqa: E402
                      accuracy, top_k_accuracy)

N_VALID = 70  # validation batches of 32, 32 and 6


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close('all')


def make_learner(tmp_path, valid=True, silent=False, metrics=(accuracy,), **kwargs):
    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    xv, yv = torch.randn(N_VALID, 8), torch.randint(0, 3, (N_VALID,))
    data = DataBunch.from_tensors(x, y, *((xv, yv) if valid else (None, None)), bs=32)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    kwargs.setdefault('device', 'cpu')  # tiny models; the same numbers on every machine
    return Learner(data, model, metrics=list(metrics), path=tmp_path, silent=silent, **kwargs)


def table_lines(out):
    """The printed lines as they end up on screen: the text after the last carriage return of each line."""
    return [line.split('\r')[-1] for line in out.split('\n') if line.split('\r')[-1].strip()]


def fmt(v):
    return f'{v:.6f}'


class LossLog(Callback):
    def __init__(self):
        self.losses = []

    def after_step(self, learn):
        self.losses.append(learn.loss.item())


class Interrupt(Callback):
    """Raises KeyboardInterrupt in after_batch of the 3rd training batch of epoch `epoch`."""

    def __init__(self, epoch=1):
        self.epoch, self.exc = epoch, None

    def after_batch(self, learn):
        if learn.training and learn.epoch == self.epoch and learn.iter == 2:
            self.exc = KeyboardInterrupt()
            raise self.exc


# ---- fake notebook bars ---------------------------------------------------------------------------------------
class FakeBar:
    """Stands in for fastprogress's NBProgressBar: records updates and how it was ended."""

    def __init__(self, gen, total=None, parent=None, leave=True, **kwargs):
        self.gen, self.parent, self.leave = gen, parent, leave
        self.total = len(gen) if total is None else total
        self.last_v, self.updates, self.events, self.comment = None, [], [], ''
        if parent is not None:
            parent.children.append(self)

    def update(self, v):
        self.updates.append(v)
        self.last_v = v
        if v >= self.total:  # like fastprogress: a bar that reaches its total ends itself
            self.on_iter_end()
            self.last_v = None

    def on_iter_end(self):
        self.events.append('end')

    def on_interrupt(self):
        self.events.append('interrupt')


class FakeMaster:
    """Stands in for fastprogress's NBMasterBar: records calls, table rows and graphs."""
    instances = []

    def __init__(self, gen, total=None, **kwargs):
        self.gen, self.calls, self.rows, self.graphs, self.children = gen, [], [], [], []
        FakeMaster.instances.append(self)

    def on_iter_begin(self):
        self.calls.append('begin')

    def write(self, line, table=False):
        assert table
        self.rows.append(list(line))

    def update(self, v):
        self.calls.append(('update', v))

    def on_iter_end(self):
        self.calls.append('end')

    def on_interrupt(self):
        self.calls.append('interrupt')

    def update_graph(self, graphs, x_bounds=None, y_bounds=None):
        self.graphs.append((copy.deepcopy([(list(x), list(y)) for x, y in graphs]), x_bounds, y_bounds))


@pytest.fixture
def notebook(monkeypatch):
    """Makes ProgressCallback believe it runs in a notebook, with recording fake bars."""
    FakeMaster.instances = []
    monkeypatch.setattr(fp, 'IN_NOTEBOOK', True)
    monkeypatch.setattr(progress_mod, 'master_bar', FakeMaster)
    monkeypatch.setattr(progress_mod, 'progress_bar', FakeBar)
    return FakeMaster.instances


# ---- silent / no_bar ------------------------------------------------------------------------------------------
def test_silent_prints_nothing(tmp_path, capsys):
    learn = make_learner(tmp_path, silent=True)
    learn.fit(2, lr=0.01)
    learn.validate()
    out, err = capsys.readouterr()
    assert out == '' and err == ''
    assert learn.progress.mbar is None and learn.progress.pbar is None


def test_silent_shows_no_bars_in_notebook(tmp_path, notebook):
    learn = make_learner(tmp_path, silent=True, callback_fns=[ShowGraph])
    learn.fit(2, lr=0.01)
    learn.validate()
    assert notebook == []
    assert len(learn.recorder.train_losses) == 2


def test_no_bar_prints_nothing_and_restores_silent(tmp_path, capsys):
    learn = make_learner(tmp_path)
    with learn.no_bar() as l:
        assert l is learn and learn.silent is True
        learn.fit(2, lr=0.01)
    assert learn.silent is False
    assert capsys.readouterr().out == ''
    learn.fit(1, lr=0.01)  # printing again afterwards
    assert 'train_loss' in capsys.readouterr().out


def test_no_bar_restores_silent_when_fit_raises(tmp_path, capsys):
    class Boom(Callback):
        def after_batch(self, learn):
            if learn.iter == 1:
                raise RuntimeError('boom')
    learn = make_learner(tmp_path)
    with pytest.raises(CallbackException, match='boom'):
        with learn.no_bar():
            learn.fit(2, lr=0.01, callbacks=Boom())
    assert learn.silent is False
    assert capsys.readouterr().out == ''
    silent = make_learner(tmp_path, silent=True)
    with silent.no_bar():
        pass
    assert silent.silent is True  # restores the previous value, not False


# ---- the epoch table ------------------------------------------------------------------------------------------
def test_epoch_table_printed(tmp_path, capsys):
    learn = make_learner(tmp_path, metrics=[accuracy, top_k_accuracy])
    learn.fit(3, lr=0.01)
    lines = table_lines(capsys.readouterr().out)
    assert lines[0].split() == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'top_k_accuracy', 'time']
    rows = [line.split() for line in lines[1:]]
    r = learn.recorder
    assert len(rows) == 3
    for e, row in enumerate(rows):
        assert len(row) == 6
        assert row[0] == str(e)
        assert row[1] == fmt(r.train_losses[e])
        assert row[2] == fmt(r.val_losses[e])
        assert row[3:5] == [fmt(v) for v in r.metrics[e]]
        assert re.fullmatch(r'\d\d:\d\d', row[5])


def test_epoch_table_without_validation_set(tmp_path, capsys):
    learn = make_learner(tmp_path, valid=False)
    learn.fit(2, lr=0.01)
    lines = table_lines(capsys.readouterr().out)
    assert lines[0].split() == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']
    rows = [line.split() for line in lines[1:]]
    assert len(rows) == 2
    for e, row in enumerate(rows):
        assert row[:4] == [str(e), fmt(learn.recorder.train_losses[e]), '#na#', '#na#']


def test_epoch_table_in_terminal_with_bars(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, 'isatty', lambda: True)
    learn = make_learner(tmp_path)
    learn.fit(2, lr=0.01)
    out = capsys.readouterr().out
    assert '[8/8' in out and '[3/3' in out  # the training and validation bars were drawn
    rows = [line.split() for line in table_lines(out)[1:]]
    r = learn.recorder
    assert [row[:3] for row in rows] == [[str(e), fmt(r.train_losses[e]), fmt(r.val_losses[e])] for e in range(2)]
    assert learn.progress.pbar is None and learn.progress.mbar is None


def test_notebook_bars_and_table(tmp_path, notebook):
    learn = make_learner(tmp_path)
    learn.fit(3, lr=0.01)
    (m,) = notebook
    assert list(m.gen) == [0, 1, 2]
    assert m.calls == ['begin', ('update', 0), ('update', 1), ('update', 2), 'end']
    r = learn.recorder
    assert m.rows[0] == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']
    assert [row[:4] for row in m.rows[1:]] == [[str(e), fmt(r.train_losses[e]), fmt(r.val_losses[e]),
                                                fmt(r.metrics[e][0])] for e in range(3)]
    assert [b.total for b in m.children] == [8, 3] * 3  # a training then a validation bar per epoch
    for b in m.children:
        assert b.parent is m and b.leave is False
        assert b.updates == list(range(b.total + 1))
        assert b.events == ['end']  # each bar ended exactly once
    assert learn.progress.mbar is None and learn.progress.pbar is None


def test_notebook_bar_comment_is_smoothed_loss(tmp_path, notebook):
    learn = make_learner(tmp_path)
    learn.progress.comment_every = -1  # refresh the comment at every batch
    learn.fit(2, lr=0.01)
    r = learn.recorder
    train_bars = notebook[0].children[::2]
    # set after each batch's update until the bar reaches its total (it has then ended): batches 7 and 15
    assert [b.comment for b in train_bars] == [f'{r.losses[6]:.4f}', f'{r.losses[14]:.4f}']
    assert [b.comment for b in notebook[0].children[1::2]] == ['', '']  # validation bars: no loss comment


def test_bar_comment_before_first_step(tmp_path, notebook):
    class SkipFirstSteps(Callback):  # e.g. gradient accumulation
        def after_loss(self, learn):
            if learn.training and learn.train_iter < 2:
                raise CancelBatchException()
    learn = make_learner(tmp_path)
    learn.progress.comment_every = -1  # as when the first batch takes longer than comment_every (GPU warm-up)
    learn.fit(1, lr=0.01, callbacks=SkipFirstSteps())
    assert len(learn.recorder.raw_losses) == 6


# ---- ShowGraph ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('valid', [True, False])
def test_show_graph_outside_notebook_does_not_fail(tmp_path, capsys, valid):
    learn = make_learner(tmp_path, valid=valid, callback_fns=[ShowGraph])
    learn.fit(2, lr=0.01)
    assert len(learn.recorder.train_losses) == 2
    assert 'train_loss' in capsys.readouterr().out


def _check_table_rows(out, learn, n_epochs):
    rows = [line.split() for line in table_lines(out)[1:]]
    r = learn.recorder
    assert len(rows) == n_epochs
    for e, row in enumerate(rows):
        assert row[:4] == [str(e), fmt(r.train_losses[e]), fmt(r.val_losses[e]), fmt(r.metrics[e][0])]


def test_show_graph_keeps_table_intact_in_logs(tmp_path, capsys):
    learn = make_learner(tmp_path, callback_fns=[ShowGraph])
    learn.fit(3, lr=0.01)
    _check_table_rows(capsys.readouterr().out, learn, 3)


def test_show_graph_keeps_table_intact_in_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, 'isatty', lambda: True)
    learn = make_learner(tmp_path, callback_fns=[ShowGraph])
    learn.fit(3, lr=0.01)
    _check_table_rows(capsys.readouterr().out, learn, 3)


def test_show_graph_in_notebook_passes_recorder_losses(tmp_path, notebook):
    learn = make_learner(tmp_path, callback_fns=[ShowGraph])
    learn.fit(3, lr=0.01)
    (m,) = notebook
    r = learn.recorder
    assert len(m.graphs) == 3  # once per epoch
    for e, (graphs, x_bounds, y_bounds) in enumerate(m.graphs):
        n = 8 * (e + 1)
        assert len(graphs) == 2
        (tx, ty), (vx, vy) = graphs
        assert tx == list(range(n)) and ty == pytest.approx(r.losses[:n])
        assert vx == [8 * (i + 1) for i in range(e + 1)] and vy == pytest.approx(r.val_losses[:e + 1])
        assert x_bounds == (0, 24)
        ys = r.losses[:n] + r.val_losses[:e + 1]
        assert y_bounds[0] == pytest.approx(min(ys)) and y_bounds[1] >= max(ys)
    assert m.names == ['train', 'valid']


def test_show_graph_in_notebook_without_validation(tmp_path, notebook):
    learn = make_learner(tmp_path, valid=False, callback_fns=[ShowGraph])
    learn.fit(2, lr=0.01)
    (m,) = notebook
    assert len(m.graphs) == 2
    graphs, _, _ = m.graphs[-1]
    assert len(graphs) == 1
    assert graphs[0] == (list(range(16)), pytest.approx(learn.recorder.losses))
    assert m.names == ['train']


# ---- interrupts -----------------------------------------------------------------------------------------------
def test_keyboard_interrupt_in_notebook(tmp_path, notebook):
    learn = make_learner(tmp_path)
    stop, log = Interrupt(epoch=1), LossLog()
    with pytest.raises(KeyboardInterrupt) as ei:
        learn.fit(2, lr=0.01, callbacks=[stop, log])
    assert ei.value is stop.exc and learn.exception is stop.exc
    assert learn.progress.mbar is None and learn.progress.pbar is None
    (m,) = notebook
    assert m.calls[-1] == 'end'
    assert [b.total for b in m.children] == [8, 3, 8]
    assert m.children[-1].events == ['interrupt']  # the bar running when interrupted
    assert len(m.rows) == 2  # header and epoch 0: no row for the interrupted epoch
    r = learn.recorder
    assert len(r.raw_losses) == len(r.lrs) == len(r.losses) == 8 + 3
    assert r.raw_losses == log.losses
    assert r.nb_batches == [8] and len(r.train_losses) == 1
    learn.fit(1, lr=0.01)  # a new fit works
    assert learn.exception is None
    assert len(r.raw_losses) == 8 and r.nb_batches == [8]
    assert len(notebook) == 2 and len(notebook[1].rows) == 2


def test_keyboard_interrupt_in_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, 'isatty', lambda: True)
    learn = make_learner(tmp_path)
    stop = Interrupt(epoch=0)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, lr=0.01, callbacks=stop)
    assert learn.exception is stop.exc
    assert learn.progress.mbar is None and learn.progress.pbar is None
    assert len(learn.recorder.raw_losses) == 3 and learn.recorder.train_losses == []
    capsys.readouterr()
    learn.fit(1, lr=0.01)
    rows = [line.split() for line in table_lines(capsys.readouterr().out)[1:]]
    assert len(rows) == 1 and rows[0][1] == fmt(learn.recorder.train_losses[0])


# ---- lr_find's sweep: a bar, no table; the fastai v1 hint only where it can be followed ---------------------------
HINT = 'LR Finder is complete, type learn.recorder.plot() to see the graph.'


def test_lr_find_in_a_script_prints_no_epoch_table_and_no_hint(tmp_path, capsys):
    """A script or the `minifast` command (stdout not a terminal): the sweep used to print an epoch table of `#na#`
    rows and the notebook hint; now nothing, and the next fit's table is back."""
    learn = make_learner(tmp_path)
    res = learn.lr_find(num_it=10)
    # what is left: lr_find's note on the curve, when it has one (a 10-step sweep often shows no clear descent)
    assert capsys.readouterr().out == ('' if res.note is None else f'lr_find: {res.note}\n')
    learn.fit(1, lr=0.01)
    lines = table_lines(capsys.readouterr().out)
    assert lines[0].split()[:3] == ['epoch', 'train_loss', 'valid_loss'] and len(lines) == 2


def test_lr_find_in_a_notebook_shows_a_bar_and_the_hint_but_no_table(tmp_path, notebook, capsys):
    learn = make_learner(tmp_path)
    learn.lr_find(num_it=10)
    (sweep,) = notebook
    assert sweep.rows == []  # no header, no `#na#` rows
    assert sweep.children and sweep.children[0].updates, 'no progress bar during the sweep'
    assert capsys.readouterr().out.strip().splitlines()[0] == HINT
    learn.fit(1, lr=0.01)
    assert notebook[-1].rows[0][:3] == ['epoch', 'train_loss', 'valid_loss'] and len(notebook[-1].rows) == 2
    assert learn.progress.table is True


def test_lr_find_hint_at_an_interactive_prompt_but_not_when_silent(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, 'ps1', '>>> ', raising=False)
    make_learner(tmp_path).lr_find(num_it=10)
    assert HINT in capsys.readouterr().out.strip().splitlines()
    make_learner(tmp_path, silent=True).lr_find(num_it=10)
    assert capsys.readouterr().out == ''


def test_lr_find_interrupted_restores_the_table(tmp_path):
    from minifast import GradientClipping
    learn = make_learner(tmp_path)

    class Stop(GradientClipping):  # the sweep keeps only callbacks that shape a step
        def after_batch(self, learn):
            raise KeyboardInterrupt

    learn.add_cb(Stop(clip=1e9))
    with pytest.raises(KeyboardInterrupt):
        learn.lr_find(num_it=10)
    assert learn.progress.table is True
