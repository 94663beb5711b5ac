"""lr_find: the exact restore of model, optimizer and learner, stopping on divergence, the suggestions and the plot,
and its arguments."""
import copy
from functools import partial

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

from minifast import Learner
from minifast.callbacks.lr_finder import suggest_minimum, suggest_steep, suggest_valley
from conftest import make_data, make_mlp
from helpers import _mlp_learner, same_state, snapshot
from resume_run import make_learner


# ---- lr_find --------------------------------------------------------------------------------------------------
def bn_dropout_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))


def state_of(learn):
    sd = {k: v.clone() for k, v in learn.model.state_dict().items()}
    opt = None if learn.opt is None else copy.deepcopy(learn.opt.state_dict())  # state_dict() aliases live tensors
    return sd, opt


def same_model(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lr_find_then_fit_is_bit_identical_to_fit_alone(capsys):
    data = make_data(n_train=160, n_valid=32)
    torch.manual_seed(123)
    plain = Learner(data, bn_dropout_model(), silent=True)
    plain.fit_one_cycle(2, 1e-2)
    torch.manual_seed(123)
    learn = Learner(data, bn_dropout_model(), silent=True)
    res = learn.lr_find(num_it=30)
    assert capsys.readouterr().out == ''  # silent, and no notebook: no fastai v1 hint either (see test_policies)
    assert learn.opt is None and len(res.lrs) > 5
    learn.fit_one_cycle(2, 1e-2)
    assert same_model(plain.model.state_dict(), learn.model.state_dict())
    assert plain.recorder.raw_losses == learn.recorder.raw_losses


def test_lr_find_restores_optimizer_state_and_hyper_parameters():
    learn = Learner(make_data(n_train=160), bn_dropout_model(), silent=True)
    learn.fit(1, 3e-3)
    sd, opt = state_of(learn)
    rng = torch.get_rng_state()
    learn.lr_find(num_it=20)
    sd2, opt2 = state_of(learn)
    assert same_model(sd, sd2) and torch.equal(rng, torch.get_rng_state())
    assert opt['param_groups'] == opt2['param_groups']
    assert all(torch.equal(opt['state'][k][n], opt2['state'][k][n]) for k in opt['state'] for n in opt['state'][k])


@pytest.mark.parametrize('exc', [RuntimeError, KeyboardInterrupt])
def test_lr_find_restores_after_an_error_mid_sweep(tmp_path, exc):
    learn = Learner(make_data(n_train=160), bn_dropout_model(), silent=True, path=tmp_path)
    learn.fit(1, 3e-3)
    sd, opt = state_of(learn)
    np_state = np.random.get_state()[1].copy()

    calls = []

    def loss_that_breaks(pred, y):  # user callbacks do not run during the sweep, so the loss breaks instead
        calls.append(1)
        if len(calls) == 6:
            raise exc('boom')
        return torch.nn.functional.cross_entropy(pred, y)

    learn.loss_func = loss_that_breaks
    with pytest.raises(exc, match='boom'):
        learn.lr_find(num_it=20)
    sd2, opt2 = state_of(learn)
    assert same_model(sd, sd2) and opt['param_groups'] == opt2['param_groups']
    assert np.array_equal(np_state, np.random.get_state()[1])
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_lr_find_stops_on_divergence():
    learn = Learner(make_data(n_train=800), make_mlp(), silent=True, opt_func=partial(torch.optim.SGD, momentum=0.9))
    res = learn.lr_find(start_lr=1e-4, end_lr=1e6, num_it=100)
    assert res.diverged and len(res.lrs) < 100
    assert all(v is None or v > 0 for v in (res.steep, res.valley, res.minimum))
    fig = learn.recorder.plot(suggestion=True, skip_start=0, skip_end=0)
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert any(lbl.startswith('steep') for lbl in labels)
    plt.close('all')


@pytest.mark.parametrize('num_it', [12, 30])
def test_plot_marks_the_suggestions_lr_find_returned(num_it):
    # plot() draws from step 10 by default, lr_find suggests from a tenth of the steps: the marks must still be
    # the returned values (smith picks max_lr from them and saves this plot beside it)
    learn = Learner(make_data(n_train=160), make_mlp(), silent=True)
    res = learn.lr_find(num_it=num_it, end_lr=100)
    fig = learn.recorder.plot(suggestion=True)
    marked = {ln.get_label().split(':')[0]: float(ln.get_xdata()[0]) for ln in fig.axes[0].lines[1:]}
    assert marked == {k: pytest.approx(v) for k, v in res.suggestions.items() if v is not None}
    plt.close('all')


def test_suggestions_on_a_known_curve():
    lrs = np.logspace(-6, 1, 200)
    x = np.log10(lrs)
    losses = 2 - 1 / (1 + np.exp(-3 * (x + 3))) + np.where(x > -0.5, (x + 0.5) ** 2 * 4, 0)  # steepest at 1e-3
    assert suggest_steep(lrs, losses) == pytest.approx(1e-3, rel=0.1)
    i_min = int(np.argmin(losses))
    assert suggest_minimum(lrs, losses) == pytest.approx(lrs[i_min] / 10)
    v = suggest_valley(lrs, losses)
    assert lrs[0] < v < lrs[i_min]  # inside the long fall
    nan = losses.copy()
    nan[150:] = np.nan
    assert suggest_steep(lrs, nan) == pytest.approx(1e-3, rel=0.1)
    assert suggest_steep(lrs[:2], losses[:2]) is None and suggest_valley([], []) is None
    assert suggest_minimum([1e-3], [np.nan]) is None


def test_lr_find_leaves_user_callbacks_files_and_learner_state_alone(tmp_path):
    from minifast import CSVLogger

    class Counter(nn.Module):  # a non-persistent buffer: not in state_dict, still restored
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)
            self.register_buffer('seen', torch.zeros(()), persistent=False)

        def forward(self, x):
            self.seen += 1
            return self.lin(x)

    learn = Learner(make_data(n_train=160), Counter(), silent=True, path=tmp_path, callback_fns=[CSVLogger])
    learn.fit(1)
    before = (tmp_path / 'history.csv').read_text()
    seen, attrs = learn.model.seen.clone(), (learn.epoch, learn.n_epoch, learn.train_iter)
    res = learn.lr_find(num_it=10, stop_div=False)
    assert (tmp_path / 'history.csv').read_text() == before  # the logger never saw the sweep
    assert torch.equal(learn.model.seen, seen) and (learn.epoch, learn.n_epoch, learn.train_iter) == attrs
    assert len(res.lrs) == 10 and res.lrs[-1] == pytest.approx(10)  # every step recorded, up to end_lr


@pytest.mark.parametrize('kw, msg', [
    (dict(start_lr=1, end_lr=1e-3), r'lr_find: the sweep needs 0 < start_lr < end_lr .*got start_lr=1, end_lr=0\.001'),
    (dict(start_lr=1e-3, end_lr=1e-3), r'lr_find: the sweep needs 0 < start_lr < end_lr'),
    (dict(start_lr=0), r'lr_find: the sweep needs 0 < start_lr < end_lr .*got start_lr=0'),
    (dict(start_lr=-1e-3), r'start_lr must be a finite number >= 0 .*got -0\.001'),
    (dict(end_lr=float('nan')), r'end_lr must be a finite number >= 0 .*got nan'),
    (dict(num_it=2.5), r'lr_find: num_it must be an integer of at least 2, got 2\.5'),
    (dict(num_it=1), r'lr_find: num_it must be an integer of at least 2, got 1')])
def test_bad_lr_find_arguments_fail_before_any_step(kw, msg):
    learn = _mlp_learner()
    snap = snapshot(learn.model)
    with pytest.raises(ValueError, match=msg):
        learn.lr_find(**kw)
    assert same_state(learn.model, snap) and learn.recorder.lrs == [] and learn.opt is None


def test_lr_find_records_no_non_finite_loss_with_the_gpu_default_guard(tmp_path):
    """README: 'lr_find stops at the first non-finite loss (also with stop_div=False)', also with the guard as it is
    on a GPU (check_every=32, simulated here on CPU), and records no non-finite loss."""
    from minifast.callbacks.tracking import DivergenceGuard
    learn = make_learner(tmp_path)
    learn.guard = DivergenceGuard(check_every=32)
    res = learn.lr_find(start_lr=1e-2, end_lr=1e12, num_it=100, stop_div=False)
    raw = learn.recorder.raw_losses
    assert res.diverged
    assert all(v == v and abs(v) != float('inf') for v in raw), [v for v in raw if not (v == v)][:3]
