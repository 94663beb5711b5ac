"""Schedules against torch's schedulers, fit_one_cycle, and the LR finder's exact restore and suggestions."""
import copy
from functools import partial

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

from minifast import Learner, annealing_cos, annealing_exp, annealing_linear, one_cycle_schedule
from minifast.callbacks.lr_finder import suggest_minimum, suggest_steep, suggest_valley
from conftest import make_data, make_mlp, torch_applied


def torch_one_cycle(opt_factory, total, max_lr, moms, div, pct, final_div):
    """lr and momentum that torch's OneCycleLR applies at each of `total` steps."""
    return torch_applied(opt_factory, max_lr, lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=total, pct_start=pct, anneal_strategy='cos', cycle_momentum=True,
        base_momentum=moms[1], max_momentum=moms[0], div_factor=div, final_div_factor=final_div / div), total)


@pytest.mark.parametrize('n_train,epochs,pct,div,final_div', [
    (48, 1, 0.3, 25., None),      # 3 steps: phase one ends before step 0
    (112, 1, 0.25, 10., 1e3),     # 7 steps, odd
    (48, 3, 0.3, 25., None),      # 9 steps over 3 epochs
    (80, 4, 0.5, 5., 100.),
])
@pytest.mark.parametrize('opt', ['adamw', 'sgd'])
def test_fit_one_cycle_equals_torch_one_cycle_lr(n_train, epochs, pct, div, final_div, opt):
    factory = (partial(torch.optim.AdamW, betas=(0.9, 0.99)) if opt == 'adamw'
               else partial(torch.optim.SGD, momentum=0.9))
    learn = Learner(make_data(n_train=n_train), make_mlp(), opt_func=factory, silent=True)
    learn.fit_one_cycle(epochs, max_lr=0.02, moms=(0.95, 0.85), div_factor=div, pct_start=pct, final_div=final_div)
    total = epochs * (n_train // 16)
    ref_lr, ref_mom = torch_one_cycle(factory, total, 0.02, (0.95, 0.85), div, pct, final_div or div * 1e4)
    assert len(learn.recorder.lrs) == total
    np.testing.assert_allclose(learn.recorder.lrs, ref_lr, rtol=1e-6)
    np.testing.assert_allclose(learn.recorder.moms, ref_mom, rtol=1e-6)


def test_one_cycle_shape_and_per_group_lrs():
    model = make_mlp()
    learn = Learner(make_data(n_train=160), model, silent=True, layer_groups=[model[0], model[2]])
    learn.fit_one_cycle(2, max_lr=slice(1e-3, 1e-2))
    g = np.array(learn.recorder.group_lrs)
    np.testing.assert_allclose(g[:, 0] / g[:, 1], 0.1, rtol=1e-9)  # the groups keep their ratio all along
    lrs = g[:, 1]
    peak = int(np.argmax(lrs))
    assert lrs[peak] == pytest.approx(1e-2) and lrs[0] == pytest.approx(1e-2 / 25)
    assert lrs[-1] < 1e-2 / 25 / 100 and np.all(np.diff(lrs[:peak + 1]) > 0) and np.all(np.diff(lrs[peak:]) < 0)
    moms = np.array(learn.recorder.moms)
    assert moms[0] == pytest.approx(0.95) and moms.min() == pytest.approx(0.85) and moms[-1] > 0.949


def test_moms_given_as_a_number_explains_the_tuple():
    learn = Learner(make_data(), make_mlp(), silent=True)
    with pytest.raises(TypeError, match=r'moms must be a \(max, min\) pair such as \(0\.95, 0\.85\), got the '
                                        r'number 0\.09.*moms=\(0\.99-0\.90\) is a subtraction.*moms=\(0\.99, 0\.90\)'):
        learn.fit_one_cycle(2, max_lr=1e-2, moms=(0.99 - 0.90), wd=1e-4)
    assert learn.opt is None  # nothing ran


def test_annealers_by_hand():
    assert annealing_cos(1., 0., 0.) == 1 and annealing_cos(1., 0., 1.) == pytest.approx(0)
    assert annealing_cos(1., 0., 0.5) == pytest.approx(0.5)
    assert annealing_linear(2., 4., 0.25) == 2.5
    assert annealing_exp(1e-3, 1e-1, 0.5) == pytest.approx(1e-2)
    s = one_cycle_schedule(10, 1.0, pct_start=0.5)
    assert s(0)['lr'] == pytest.approx(1 / 25) and s(4)['lr'] == pytest.approx(1.0) and s(9)['lr'] == pytest.approx(
        1 / 25 / 1e4)


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
    assert 'LR Finder is complete, type learn.recorder.plot() to see the graph.' in capsys.readouterr().out
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


def test_fit_one_cycle_start_epoch_trains_the_rest_of_the_cycle():
    full = Learner(make_data(n_train=64), make_mlp(), silent=True)
    full.fit_one_cycle(5, 1e-2)
    rest = Learner(make_data(n_train=64), make_mlp(), silent=True)
    rest.fit_one_cycle(5, 1e-2, start_epoch=3)
    assert len(rest.recorder.train_losses) == 2
    np.testing.assert_allclose(rest.recorder.lrs, full.recorder.lrs[3 * 4:], rtol=1e-12)
    with pytest.raises(ValueError, match='start_epoch 5 is at or past the end of a 5-epoch cycle'):
        rest.fit_one_cycle(5, 1e-2, start_epoch=5)
