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


# ---- max_lr, the curve's shape, the plateau stop (issue 17) -----------------------------------------------------
from minifast.callbacks.lr_finder import curve_shape, suggest_max_lr, suggestions  # noqa: E402


def _sweep(n=100, lo=1e-7, hi=10):
    return np.logspace(np.log10(lo), np.log10(hi), n)


def _ema(raw, beta=0.98):
    out, mov = [], 0.
    for i, v in enumerate(raw, 1):
        mov = beta * mov + (1 - beta) * v
        out.append(mov / (1 - beta ** i))
    return np.array(out)


def _descent(lrs, bottom=1e-2, depth=1.2, noise=0.01, seed=0):
    """2.3 on the flat start, a fall of `depth` ending at `bottom`, then a steep rise (divergence); noisy."""
    x = np.log10(lrs) - np.log10(bottom)
    trend = 2.3 - depth * np.clip((x + 2) / 2, 0, 1) + np.where(x > 0, 8 * x ** 2, 0)
    return trend + np.random.RandomState(seed).normal(0, noise, len(lrs))


def test_max_lr_is_the_bottom_of_a_clear_descent():
    lrs = _sweep()
    raw = _descent(lrs, bottom=1e-2)
    lr, note = suggest_max_lr(lrs, raw)
    assert 10 ** -2.3 < lr < 10 ** -1.7 and note is None  # within a third of a decade of the bottom
    shape = curve_shape(lrs, raw)
    assert shape.clear and shape.depth == pytest.approx(1.2, abs=0.2) and shape.noise < 0.03
    spiky = raw.copy()
    spiky[[70, 74, 80]] += 30  # single-step spikes (a bad batch) neither move it nor hide the descent
    assert suggest_max_lr(lrs, spiky)[0] == pytest.approx(lr, rel=0.3)


def test_max_lr_without_a_clear_descent_is_a_tenth_of_the_rise_and_says_so():
    lrs = _sweep()
    x = np.log10(lrs)
    raw = 2.5 + np.random.RandomState(1).normal(0, 0.1, 100) + np.where(x > -1, 3 * (x + 1) ** 2, 0)
    lr, note = suggest_max_lr(lrs, raw)
    assert 10 ** -2.2 < lr < 10 ** -1.6  # the rise becomes clear a little past 1e-1
    assert 'no clear descent' in note and 'max_lr is the lr where the loss rises clearly' in note and '/ 10' in note
    sug = suggestions(lrs, _ema(raw), raw_losses=raw)
    assert sug['max_lr'] == lr and sug['steep'] is None and sug['valley'] is None and sug['minimum'] is None


def test_a_flat_curve_suggests_nothing_and_says_so():
    lrs = _sweep()
    raw = 2.3 + np.random.RandomState(2).normal(0, 0.05, 100)
    lr, note = suggest_max_lr(lrs, raw)
    assert lr is None and 'no clear descent' in note and 'nor a clear rise' in note
    assert all(v is None for v in suggestions(lrs, _ema(raw), raw_losses=raw).values())
    assert suggest_max_lr(lrs[:4], raw[:4]) == (None, 'too few steps to read the curve (fewer than 5 finite losses)')


def test_max_lr_when_the_loss_still_falls_at_the_end_of_the_sweep():
    lrs = _sweep(60, 1e-6, 1e-3)
    raw = 2.3 - 1.5 * np.clip((np.log10(lrs) + 5) / 2, 0, 1)
    lr, note = suggest_max_lr(lrs, raw)
    assert lr == pytest.approx(lrs[-1]) and 'still falls at the end of the sweep' in note


def test_steep_never_comes_from_the_flat_start():
    # a dip of the smoothed loss on the flat start (steeper than the real fall) drew 'steep' at 7.7e-07
    lrs = _sweep()
    raw = _descent(lrs, bottom=1e-1, depth=0.6, noise=0.005)
    losses = _ema(raw)
    losses[15:18] -= [0.02, 0.05, 0.02]
    old = float(lrs[10 + int(np.argmin(np.gradient(losses[10:95], np.log10(lrs[10:95]))))])
    assert old < 1e-5  # what the plain steepest-slope rule picks
    steep = suggestions(lrs, losses, raw_losses=raw)['steep']
    assert 1e-3 < steep <= 1e-1


def test_steep_never_comes_from_a_plateau_past_the_minimum():
    # MNIST-1D: the loss jumps to a plateau at chance past the minimum, and sags on it: steep landed at lr 2.7
    lrs = _sweep()
    x = np.log10(lrs)
    losses = np.where(x < -1.5, 2.3 - 0.4 * np.clip((x + 3.5) / 2, 0, 1), 0.)
    losses = np.where(x >= -1.5, np.where(x < 0, 3.2, 3.2 - 0.5 * np.clip(x / 0.5, 0, 1)), losses)
    old = float(lrs[10 + int(np.argmin(np.gradient(losses[10:95], x[10:95])))])
    assert old > 1  # the plain rule picks the sag on the plateau
    sug = suggestions(lrs, losses)
    assert 10 ** -3.6 < sug['steep'] < 10 ** -1.4 and sug['valley'] <= 10 ** -1.5
    assert sug['max_lr'] <= 10 ** -1.4


def _fake_loss_learner(curve, silent=True):
    """A Learner whose loss is curve(step) (plus 0 x the model's output, so there are gradients to step)."""
    step = []

    def loss(pred, y):
        step.append(1)
        return pred.sum() * 0 + float(curve(len(step) - 1))
    return Learner(make_data(n_train=320), make_mlp(), loss_func=loss, silent=silent)


def _plateau_curve(i, n=100):
    x = -7 + 8 * i / (n - 1)  # log10 of the lr lr_find sets at step i (1e-7 .. 10)
    noise = 0.003 * np.sin(7 * i)
    if x < -1:
        return 2.3 - 1.0 * min(max((x + 3) / 2, 0), 1) + noise
    return 2.3 + noise  # a plateau at chance: never 4x the best smoothed loss


def test_lr_find_stops_on_a_plateau_after_a_descent():
    res = _fake_loss_learner(_plateau_curve).lr_find()
    assert res.plateau and not res.diverged
    assert len(res.lrs) < 95 and res.lrs[-1] < 3  # the sweep ran on to 10 before
    full = _fake_loss_learner(_plateau_curve).lr_find(stop_div=False)
    assert len(full.lrs) == 100 and not full.plateau
    assert 10 ** -1.4 < res.max_lr < 10 ** -0.8 and res.note is None


def test_lr_find_does_not_stop_on_a_flat_curve_and_prints_its_note(capsys):
    learn = _fake_loss_learner(lambda i: 2.3 + 0.01 * np.sin(3 * i), silent=False)
    res = learn.lr_find(num_it=60)
    assert len(res.lrs) == 60 and not res.plateau
    assert res.max_lr is None and 'no clear descent' in res.note
    assert f'lr_find: {res.note}' in capsys.readouterr().out
    assert 'max_lr=None' in repr(res) and 'no clear descent' in repr(res)
    fig = learn.recorder.plot(suggestion=True)
    assert any('no clear descent' in t.get_text() for t in fig.axes[0].texts)
    plt.close('all')


def test_real_tiny_sweep_gives_max_lr_in_its_repr_and_plot():
    learn = Learner(make_data(n_train=640, bs=32), make_mlp(), silent=True)
    res = learn.lr_find()
    assert res.max_lr is not None and res.lrs[0] < res.max_lr < res.lrs[-1]
    assert res.note is None and res.suggestions['max_lr'] == res.max_lr
    assert f'max_lr={res.max_lr:.2e}' in repr(res)
    assert len(res.raw_losses) == len(res.lrs)
    fig = learn.recorder.plot(suggestion=True)
    ax = fig.axes[0]
    assert ax.get_title() == 'LR range test' and 'Learning rate' in ax.get_xlabel() and ax.get_ylabel()
    marks = {ln.get_label().split(':')[0]: float(ln.get_xdata()[0]) for ln in ax.lines[1:]}
    assert marks['max_lr'] == pytest.approx(res.max_lr)
    plt.close('all')
