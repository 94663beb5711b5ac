"""Ctrl-C (KeyboardInterrupt) inside the interpolation analysis, lr_find and a fit with live progress bars: the
model, optimizer, RNG and learner come back as they were (or, for fit, the bars are closed and the history kept),
and the learner can train again."""
import copy
import signal

import matplotlib
matplotlib.use('Agg')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import minifast.callbacks.progress as progress_mod  # noqa: E402
from minifast import Callback, Learner, accuracy  # noqa: E402
from minifast.landscape import (average_weights, evaluate_weights, interpolate_losses,  # noqa: E402
                                loss_surface, recompute_bn)
from minifast.state import holding_sigint  # noqa: E402

from conftest import make_data  # noqa: E402

N_TRAIN_BATCHES, N_VALID_BATCHES = 3, 2  # make_data(): 48 training items in batches of 16, 20 valid items


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny tensors: on a busy machine intra-op threads cost ~50 ms per BatchNorm call, one thread ~30 us."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Tripwire(nn.Module):
    """A small BatchNorm + dropout MLP whose forward raises KeyboardInterrupt on its `trip_at`-th call (counted from
    the moment trip_at is set with `arm`)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=0.3), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(16, 3))
        self.register_buffer('scratch', torch.zeros(2), persistent=False)  # not in state_dict
        self.calls, self.trip_at, self.second_ctrl_c, self.sent, self.tripped = 0, None, False, False, False

    def arm(self, k, second_ctrl_c=False):
        """`second_ctrl_c`: after tripping, the next change of this module's train/eval mode (the first thing a
        restore of the modes does) sends a real SIGINT, as an impatient user pressing Ctrl-C again would."""
        self.calls, self.trip_at, self.second_ctrl_c, self.sent, self.tripped = 0, k, second_ctrl_c, False, False

    def __setattr__(self, name, value):
        if name == 'training' and self.__dict__.get('second_ctrl_c') and self.__dict__.get('tripped'):
            self.__dict__['second_ctrl_c'] = False
            self.__dict__['sent'] = True
            signal.raise_signal(signal.SIGINT)
        super().__setattr__(name, value)

    def forward(self, x):
        self.calls += 1
        if self.trip_at is not None and self.calls == self.trip_at:
            self.__dict__['tripped'] = True
            raise KeyboardInterrupt(f'forward call {self.calls}')
        if self.training:  # a buffer outside state_dict that a train-mode forward writes
            self.scratch += 1
        return self.net(x)


def make_learner(silent=True, **kw):
    learn = Learner(make_data(), Tripwire(), metrics=[accuracy], silent=silent, device='cpu', **kw)
    learn.model.net[0].bias.requires_grad_(False)  # a frozen parameter must stay frozen
    return learn


def everything(learn):
    """What an interrupted analysis must leave exactly as it was."""
    m = learn.model
    return {
        'params': {k: p.detach().clone() for k, p in m.named_parameters()},
        'buffers': {k: b.detach().clone() for k, b in m.named_buffers()},
        'modes': [x.training for x in m.modules()],
        'requires_grad': [p.requires_grad for p in m.parameters()],
        'momenta': [x.momentum for x in m.modules() if isinstance(x, nn.BatchNorm1d)],
        'rng': torch.get_rng_state(),
        'opt': None if learn.opt is None else copy.deepcopy(learn.opt.state_dict()),  # the live tensors otherwise
    }


def assert_tensors_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f'{what} {k}'


def assert_unchanged(learn, before):
    now = everything(learn)
    assert_tensors_equal(now['params'], before['params'], 'parameter')
    assert_tensors_equal(now['buffers'], before['buffers'], 'buffer')
    for key in ('modes', 'requires_grad', 'momenta'):
        assert now[key] == before[key], key
    assert torch.equal(now['rng'], before['rng'])
    if before['opt'] is None:
        assert learn.opt is None
    else:
        assert now['opt']['param_groups'] == before['opt']['param_groups']
        s0, s1 = before['opt']['state'], now['opt']['state']
        assert s0.keys() == s1.keys()
        for i in s0:
            assert_tensors_equal({k: torch.as_tensor(v) for k, v in s1[i].items()},
                                 {k: torch.as_tensor(v) for k, v in s0[i].items()}, f'opt state {i}')
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def trained_learner():
    """Two endpoints w2 (after one epoch) and w1 (after two), a live optimizer, and mixed module modes."""
    learn = make_learner()
    learn.fit(1, 1e-2)
    w2 = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.fit(1, 1e-2)
    w1 = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.model.train()
    learn.model.net[2].eval()  # a mixed mode must come back as it was
    return learn, w1, w2


ANALYSES = {
    'interpolate_recompute': lambda learn, w1, w2: interpolate_losses(learn, w1, w2, alphas=[0.5]),
    'interpolate_interpolate': lambda learn, w1, w2: interpolate_losses(learn, w1, w2, alphas=[-0.5, 0.5],
                                                                        bn='interpolate'),
    'surface_filter': lambda learn, w1, w2: loss_surface(learn, w1, steps=2, dl='valid'),
    'surface_plane': lambda learn, w1, w2: loss_surface(learn, w1, dir1=w2, dir2=learn.model, steps=2,
                                                        bn='interpolate'),
    'recompute_bn': lambda learn, w1, w2: recompute_bn(learn.model, learn.data.train_dl),
    'average_weights': lambda learn, w1, w2: average_weights([w1, w2], learn=learn),
    'evaluate_weights': lambda learn, w1, w2: evaluate_weights(learn, w2, bn='recompute'),
}


@pytest.mark.parametrize('name', list(ANALYSES))
def test_interrupted_analysis_restores_model_rng_and_learner_can_fit(name):
    run = ANALYSES[name]
    learn, w1, w2 = trained_learner()
    model = learn.model
    model.arm(None)
    before = everything(learn)
    run(learn, w1, w2)  # count the forward calls of a whole run
    n_calls = model.calls
    assert n_calls >= N_TRAIN_BATCHES
    if name != 'recompute_bn':  # the analyses restore everything after a normal run too; a direct recompute_bn not
        assert_unchanged(learn, before)
    else:
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(before['buffers'][k])
        torch.set_rng_state(before['rng'])
    # the first call (in a BN recompute, when there is one), the second, the first evaluation call, the middle of
    # the sweep, and the very last forward call of the run
    for k in sorted({1, 2, N_TRAIN_BATCHES + 1, n_calls // 2, n_calls}):
        if k > n_calls:
            continue
        model.arm(k)
        with pytest.raises(KeyboardInterrupt, match=f'forward call {k}$'):
            run(learn, w1, w2)
        assert model.calls == k
        assert_unchanged(learn, before)
    model.arm(None)
    assert learn.callbacks == [] and learn.opt is not None
    learn.fit(1, 1e-2)
    assert not torch.equal(model.net[4].weight, before['params']['net.4.weight'])
    assert len(learn.recorder.raw_losses) == N_TRAIN_BATCHES


def test_interrupted_analysis_then_same_result_as_uninterrupted():
    """An interrupt leaves nothing behind that changes a later analysis: it gives the same numbers as before."""
    learn, w1, w2 = trained_learner()
    ref = interpolate_losses(learn, w1, w2, alphas=np.linspace(-1, 2, 4))
    learn.model.arm(7)
    with pytest.raises(KeyboardInterrupt):
        interpolate_losses(learn, w1, w2, alphas=np.linspace(-1, 2, 4))
    learn.model.arm(None)
    again = interpolate_losses(learn, w1, w2, alphas=np.linspace(-1, 2, 4))
    for dl in ('valid', 'train'):
        np.testing.assert_array_equal(again.values[dl], ref.values[dl])


@pytest.mark.parametrize('name', ['interpolate_recompute', 'surface_filter', 'recompute_bn', 'average_weights',
                                  'evaluate_weights'])
def test_second_ctrl_c_during_the_restore_is_held_until_it_is_done(name):
    learn, w1, w2 = trained_learner()
    handler = signal.getsignal(signal.SIGINT)
    before = everything(learn)
    learn.model.arm(2, second_ctrl_c=True)
    with pytest.raises(KeyboardInterrupt):
        ANALYSES[name](learn, w1, w2)
    assert learn.model.sent  # the SIGINT arrived while the modes were being put back
    assert_unchanged(learn, before)
    assert signal.getsignal(signal.SIGINT) is handler


def _let_handlers_run():
    """Python runs a signal's handler at its next check for pending calls; a Python-level call is one."""
    (lambda: None)()


def test_holding_sigint_passes_the_held_ctrl_c_on():
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own: a Ctrl-C raises KeyboardInterrupt
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with holding_sigint():
                signal.raise_signal(signal.SIGINT)
                _let_handlers_run()
                done.append(1)  # not interrupted here
        assert done == [1] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, handler)
    seen = []
    signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))  # e.g. fit's deferring handler
    try:
        with holding_sigint():
            signal.raise_signal(signal.SIGINT)
            _let_handlers_run()
        assert seen == [signal.SIGINT]
        with holding_sigint():  # nothing held: nothing passed on
            pass
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, handler)


# ---- lr_find ---------------------------------------------------------------------------------------------------
class Marker(Callback):
    """A user callback: it must be back in learn.callbacks after lr_find and must not see the sweep."""

    def __init__(self):
        self.batches = 0

    def after_batch(self, learn):
        self.batches += 1


def lr_find_state(learn):
    s = everything(learn)
    s['loop'] = (learn.epoch, learn.n_epoch, learn.train_iter)
    s['callbacks'] = (learn.callbacks, list(learn.callbacks))
    s['opt_obj'] = learn.opt
    return s


@pytest.mark.parametrize('with_opt', [False, True])
@pytest.mark.parametrize('k', [1, 2, 5, 10])  # first step, second, a later epoch (3 steps an epoch), the last
def test_interrupted_lr_find_restores_learner(with_opt, k):
    marker = Marker()
    learn = make_learner(callbacks=[marker])
    if with_opt:
        learn.fit(1, 1e-2)
    learn.model.train()
    learn.model.net[2].eval()
    marker.batches = 0
    before = lr_find_state(learn)
    learn.model.arm(k)
    with pytest.raises(KeyboardInterrupt):
        learn.lr_find(num_it=10)
    assert learn.model.calls == k
    assert_unchanged(learn, before)
    assert learn.opt is before['opt_obj']
    assert (learn.epoch, learn.n_epoch, learn.train_iter) == before['loop']
    assert learn.callbacks is before['callbacks'][0] and learn.callbacks == before['callbacks'][1] == [marker]
    assert marker.batches == 0  # the user's callbacks did not see the sweep
    assert len(learn.recorder.raw_losses) == k - 1  # the steps done before the interrupt, for a look at the sweep
    assert learn.hooks is None
    learn.model.arm(None)
    learn.fit(1, 1e-2)
    assert marker.batches == N_TRAIN_BATCHES + N_VALID_BATCHES
    assert len(learn.recorder.raw_losses) == N_TRAIN_BATCHES
    assert not torch.equal(learn.model.net[4].weight, before['params']['net.4.weight'])


def test_lr_find_after_interrupted_lr_find_is_the_same_sweep(capsys):
    learn = make_learner()
    learn.fit(1, 1e-2)
    ref = learn.lr_find(num_it=8)
    learn.model.arm(4)
    with pytest.raises(KeyboardInterrupt):
        learn.lr_find(num_it=8)
    learn.model.arm(None)
    again = learn.lr_find(num_it=8)
    assert again.lrs == ref.lrs and again.losses == ref.losses


# ---- progress bars -----------------------------------------------------------------------------------------------
class StopAt(Callback):
    """Raises KeyboardInterrupt in after_batch of training batch `it` of epoch `epoch`."""

    def __init__(self, epoch, it):
        self.epoch, self.it = epoch, it

    def after_batch(self, learn):
        if learn.training and learn.epoch == self.epoch and learn.iter == self.it:
            raise KeyboardInterrupt('stop')


class ValidateInside(Callback):
    """Calls learn.validate() from after_batch of training batch `it` of epoch `epoch` (arming the model first)."""

    def __init__(self, epoch, it, trip_at):
        self.epoch, self.it, self.trip_at = epoch, it, trip_at

    def after_batch(self, learn):
        if learn.training and learn.epoch == self.epoch and learn.iter == self.it:
            learn.model.arm(self.trip_at)
            learn.validate()


@pytest.fixture(params=['live', 'table'])
def bar_mode(request, monkeypatch):
    """'live': real fastprogress console bars (as in a terminal); 'table': the plain epoch table (logs, files)."""
    monkeypatch.setattr(progress_mod, '_live', lambda: request.param == 'live')
    return request.param


def epoch_rows(out):
    """The epoch-table rows printed (the text after the last carriage return of each line), header dropped."""
    lines = [line.split('\r')[-1].split() for line in out.split('\n')]
    return [r for r in lines if r and r[0].isdigit()]


def check_after_interrupt(learn, cb, n_steps, capsys):
    p = learn.progress
    assert p.pbar is None and p.mbar is None and p._outer == []
    assert isinstance(learn.exception, KeyboardInterrupt)
    assert cb not in learn.callbacks and learn.callbacks == []
    assert learn.hooks is None
    assert len(learn.recorder.raw_losses) == len(learn.recorder.lrs) == n_steps
    capsys.readouterr()
    learn.model.arm(None)
    learn.fit(1, 1e-2)
    out = capsys.readouterr().out
    assert learn.exception is None
    rows = epoch_rows(out)
    assert len(rows) == 1 and rows[0][0] == '0'
    assert float(rows[0][1]) == pytest.approx(learn.recorder.train_losses[0], abs=1e-6)
    assert 'valid_loss' in out and p.pbar is None and p.mbar is None
    assert len(learn.recorder.raw_losses) == N_TRAIN_BATCHES


def test_interrupt_from_callback_closes_bars(bar_mode, capsys):
    learn = make_learner(silent=False)
    cb = StopAt(epoch=1, it=1)
    with pytest.raises(KeyboardInterrupt, match='stop'):
        learn.fit(3, 1e-2, callbacks=[cb])
    out = capsys.readouterr().out
    assert len(epoch_rows(out)) == 1  # epoch 0's row; none for the interrupted epoch
    # the interrupting after_batch is a closing event: the Recorder still saw that step
    check_after_interrupt(learn, cb, N_TRAIN_BATCHES + 2, capsys)


@pytest.mark.parametrize('k', [1, N_TRAIN_BATCHES + 1, N_TRAIN_BATCHES + N_VALID_BATCHES])
def test_interrupt_from_model_forward_closes_bars(bar_mode, capsys, k):
    """In the first training batch, the first validation batch, and the last validation batch of epoch 0."""
    learn = make_learner(silent=False)
    cb = Marker()
    learn.model.arm(k)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, 1e-2, callbacks=cb)
    assert epoch_rows(capsys.readouterr().out) == []
    check_after_interrupt(learn, cb, min(k - 1, N_TRAIN_BATCHES), capsys)


@pytest.mark.parametrize('trip_at', [1, 2])
def test_interrupt_in_validate_called_inside_fit_closes_bars(bar_mode, capsys, trip_at):
    learn = make_learner(silent=False)
    cb = ValidateInside(epoch=0, it=1, trip_at=trip_at)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, 1e-2, callbacks=[cb])
    assert learn.model.calls == trip_at
    # the step of the batch whose after_batch called validate() was done and recorded (the Recorder runs first)
    check_after_interrupt(learn, cb, 2, capsys)


def test_interrupted_standalone_validate_closes_its_bar(bar_mode, capsys):
    learn = make_learner(silent=False)
    learn.fit(1, 1e-2)
    learn.model.arm(2)
    with pytest.raises(KeyboardInterrupt):
        learn.validate()
    p = learn.progress
    assert p.pbar is None and p.mbar is None and p._outer == []
    learn.model.arm(None)
    loss, acc = learn.validate()
    assert np.isfinite(loss) and p.pbar is None
    learn.fit(1, 1e-2)
    assert len(epoch_rows(capsys.readouterr().out)) == 2


class BrokenBar:
    """A bar whose closing raises (a display that went away): after_fit must still drop the bars."""

    def __init__(self, *args, **kwargs):
        self.last_v, self.comment = None, ''

    def update(self, v):
        self.last_v = v

    def on_iter_begin(self):
        pass

    def write(self, *args, **kwargs):
        pass

    def on_interrupt(self):
        raise RuntimeError('display gone')

    on_iter_end = on_interrupt


def test_bars_dropped_even_when_closing_them_fails(monkeypatch, capsys):
    monkeypatch.setattr(progress_mod, '_live', lambda: True)
    monkeypatch.setattr(progress_mod, 'master_bar', BrokenBar)
    monkeypatch.setattr(progress_mod, 'progress_bar', BrokenBar)
    learn = make_learner(silent=False)
    with pytest.warns(UserWarning, match='display gone'):
        with pytest.raises(KeyboardInterrupt):
            learn.fit(2, 1e-2, callbacks=StopAt(epoch=0, it=1))
    p = learn.progress
    assert p.pbar is None and p.mbar is None and p._outer == []
