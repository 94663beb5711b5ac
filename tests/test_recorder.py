"""Recorder: per-step lr/momentum/losses, per-epoch losses and metrics, reset per fit, and its plots."""
import matplotlib
matplotlib.use('Agg')

import copy  # noqa: E402
from functools import partial  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

from minifast import Callback, DataBunch, Learner, accuracy, top_k_accuracy  # noqa: E402

BS, N_TRAIN, N_VALID = 32, 256, 70  # 8 training batches per epoch; validation batches of 32, 32 and 6


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close('all')


def make_learner(tmp_path, valid=True, metrics=(accuracy,), drop_last=True, n_train=N_TRAIN, **kwargs):
    torch.manual_seed(0)
    x, y = torch.randn(n_train, 8), torch.randint(0, 3, (n_train,))
    xv, yv = torch.randn(N_VALID, 8), torch.randint(0, 3, (N_VALID,))
    data = DataBunch.from_tensors(x, y, *((xv, yv) if valid else (None, None)), bs=BS, drop_last=drop_last)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    kwargs.setdefault('device', 'cpu')  # the hand-written references run on the CPU
    return Learner(data, model, metrics=list(metrics), path=tmp_path, silent=True, **kwargs)


class StepLog(Callback):
    """Records, at every optimizer step, the loss, batch size and hyper-parameters of the last param group."""
    order = 10

    def __init__(self):
        self.losses, self.bs, self.lrs, self.moms = [], [], [], []

    def after_step(self, learn):
        g = learn.opt.param_groups[-1]
        self.losses.append(learn.loss.item())
        self.bs.append(learn.yb.shape[0])
        self.lrs.append(g['lr'])
        self.moms.append(g['betas'][0] if 'betas' in g else g.get('momentum'))


def ema(xs, beta=0.98):
    out, mov = [], 0.
    for n, x in enumerate(xs, 1):
        mov = beta * mov + (1 - beta) * x
        out.append(mov / (1 - beta ** n))
    return out


# ---- per-step records -----------------------------------------------------------------------------------------
def test_lrs_and_moms_adamw(tmp_path):
    learn = make_learner(tmp_path)
    log = StepLog()
    learn.fit(2, lr=0.01, callbacks=log)
    r = learn.recorder
    n = len(learn.data.train_dl) * 2
    assert n == 16
    assert len(r.lrs) == len(r.moms) == n
    assert r.lrs == pytest.approx([0.01] * n)
    assert r.moms == pytest.approx([0.9] * n)  # AdamW's default betas (0.9, 0.99): beta1
    assert r.lrs == log.lrs and r.moms == log.moms


def test_moms_sgd_momentum(tmp_path):
    learn = make_learner(tmp_path, opt_func=partial(torch.optim.SGD, momentum=0.8))
    learn.fit(1, lr=0.05)
    r = learn.recorder
    assert len(r.moms) == len(r.lrs) == len(learn.data.train_dl)
    assert r.lrs == pytest.approx([0.05] * 8)
    assert r.moms == pytest.approx([0.8] * 8)


def test_lrs_moms_follow_values_changed_during_fit(tmp_path):
    class Sched(Callback):
        def before_batch(self, learn):
            if learn.training:
                for g in learn.opt.param_groups:
                    g['lr'] = 1e-3 * (learn.train_iter + 1)
                    g['betas'] = (0.95 - 0.01 * learn.iter, 0.99)
    learn = make_learner(tmp_path)
    learn.fit(2, lr=0.01, callbacks=Sched())
    r = learn.recorder
    assert r.lrs == pytest.approx([1e-3 * (i + 1) for i in range(16)])
    assert r.moms == pytest.approx([0.95 - 0.01 * (i % 8) for i in range(16)])


def test_group_lrs_per_layer_group(tmp_path):
    learn = make_learner(tmp_path)
    m = learn.model
    learn = Learner(learn.data, m, layer_groups=[m[0], m[2]], path=tmp_path, silent=True, device='cpu')
    learn.fit(1, lr=slice(1e-4, 1e-2))
    r = learn.recorder
    assert len(r.group_lrs) == 8
    for lrs in r.group_lrs:
        assert lrs == pytest.approx([1e-4, 1e-2])
    assert r.lrs == pytest.approx([1e-2] * 8)  # the last group's lr


def test_no_momentum_optimizer_records_no_moms(tmp_path):
    learn = make_learner(tmp_path, opt_func=torch.optim.Adagrad)
    learn.fit(1, lr=0.01)
    assert learn.recorder.lrs == pytest.approx([0.01] * 8)
    assert learn.recorder.moms == []


def test_raw_losses_equal_losses_seen_by_callback(tmp_path):
    learn = make_learner(tmp_path)
    log = StepLog()
    learn.fit(2, lr=0.01, callbacks=log)
    raw = learn.recorder.raw_losses
    assert len(raw) == 16
    assert all(type(v) is float for v in raw)
    assert raw == log.losses


def test_raw_losses_equal_handwritten_training_loop(tmp_path):
    learn = make_learner(tmp_path)
    model = copy.deepcopy(learn.model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=1e-2)
    torch.manual_seed(1)
    learn.fit(2, lr=0.01)
    torch.manual_seed(1)  # the same shuffles
    ref = []
    for _ in range(2):
        model.train()
        for xb, yb in learn.data.train_dl:
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            ref.append(loss.item())
    assert learn.recorder.raw_losses == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert ref[-1] < ref[0]  # it trains: the comparison is not between constant lists


def test_smoothed_losses_are_debiased_ema(tmp_path):
    learn = make_learner(tmp_path)
    assert learn.recorder.smooth_loss is None
    learn.fit(3, lr=0.01)
    r = learn.recorder
    raw = r.raw_losses
    expected = ema(raw)
    assert len(r.losses) == len(raw) == 24
    np.testing.assert_allclose(r.losses, expected, rtol=0, atol=1e-9)
    assert r.losses[0] == pytest.approx(raw[0], abs=1e-12)  # debiased: first value is the first loss
    assert r.smooth_loss == r.losses[-1]
    assert r.smooth_loss == pytest.approx(expected[-1], abs=1e-9)
    assert r.losses != raw


def test_smoothed_losses_read_midway_continue_the_same_ema(tmp_path):
    """Reading `losses` during the fit (the progress bar does) must not change the result."""
    class Peek(Callback):
        def after_batch(self, learn):
            if learn.training and learn.iter % 3 == 0:
                learn.recorder.smooth_loss
    learn = make_learner(tmp_path)
    learn.fit(2, lr=0.01, callbacks=Peek())
    r = learn.recorder
    np.testing.assert_allclose(r.losses, ema(r.raw_losses), rtol=0, atol=1e-9)


# ---- per-epoch records ----------------------------------------------------------------------------------------
def test_train_losses_are_batch_size_weighted_epoch_means(tmp_path):
    learn = make_learner(tmp_path, drop_last=False, n_train=250)  # batches of 32 x 7 and one of 26
    log = StepLog()
    learn.fit(3, lr=0.01, callbacks=log)
    r = learn.recorder
    assert r.nb_batches == [8, 8, 8]
    assert log.bs[:8] == [32] * 7 + [26]
    for e in range(3):
        ls, bs = log.losses[8 * e:8 * (e + 1)], log.bs[8 * e:8 * (e + 1)]
        expected = sum(l * b for l, b in zip(ls, bs)) / sum(bs)
        assert r.train_losses[e] == pytest.approx(expected, rel=0, abs=1e-9)
        assert abs(r.train_losses[e] - np.mean(ls)) > 1e-9  # the weighting matters here
    assert len(r.times) == 3 and all(t > 0 for t in r.times)


def test_val_losses_and_metrics_equal_validation_at_epoch_end(tmp_path):
    class HandValid(Callback):
        order = 51  # after the Recorder's after_epoch

        def __init__(self):
            self.ref, self.last = [], []

        def after_epoch(self, learn):
            self.last.append(list(learn.last_metrics))
            xv, yv = (t.to(learn.device) for t in learn.data.valid_dl.tensors)
            with torch.no_grad():
                pred = learn.model.eval()(xv).double()
            top2 = (pred.topk(2, dim=1).indices == yv[:, None]).any(1).double().mean()
            self.ref.append([F.cross_entropy(pred, yv).item(), (pred.argmax(1) == yv).double().mean().item(),
                             top2.item()])

    learn = make_learner(tmp_path, metrics=[accuracy, partial(top_k_accuracy, k=2)])
    hv = HandValid()
    learn.fit(3, lr=0.01, callbacks=hv)
    r = learn.recorder
    assert r.metrics_names == ['accuracy', 'top_k_accuracy']
    assert len(r.val_losses) == len(r.metrics) == 3
    for e in range(3):
        assert r.val_losses[e] == hv.last[e][0]
        assert r.metrics[e] == hv.last[e][1:]
        assert [r.val_losses[e], *r.metrics[e]] == pytest.approx(hv.ref[e], rel=1e-5, abs=1e-6)
    assert learn.validate() == pytest.approx([r.val_losses[-1], *r.metrics[-1]], rel=1e-6)
    assert len(set(r.val_losses)) == 3  # the model changes between epochs


def test_no_validation_set(tmp_path):
    learn = make_learner(tmp_path, valid=False)
    learn.fit(2, lr=0.01)
    r = learn.recorder
    assert r.val_losses == [None, None]
    assert r.metrics == [[], []]
    assert r.nb_batches == [8, 8]
    assert len(r.train_losses) == 2 and all(np.isfinite(r.train_losses))
    assert len(r.times) == 2


def test_cancelled_epoch_records_no_stale_validation(tmp_path):
    from minifast import CancelEpochException

    class SkipEpoch1(Callback):
        def before_batch(self, learn):
            if learn.training and learn.epoch == 1 and learn.iter == 2:
                raise CancelEpochException()
    learn = make_learner(tmp_path)
    learn.fit(3, lr=0.01, callbacks=SkipEpoch1())
    r = learn.recorder
    assert r.nb_batches == [8, 2, 8]
    assert r.val_losses[0] is not None and r.val_losses[2] is not None
    assert r.val_losses[1] is None or np.isnan(r.val_losses[1])  # epoch 1 was never validated
    assert r.metrics[1] == [] or all(np.isnan(r.metrics[1]))


def test_recorder_resets_at_every_fit(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(2, lr=0.01)
    assert len(learn.recorder.raw_losses) == 16
    log = StepLog()
    learn.fit(1, lr=0.001, callbacks=log)
    r = learn.recorder
    assert len(r.lrs) == len(r.moms) == len(r.raw_losses) == len(r.losses) == 8
    assert r.lrs == pytest.approx([0.001] * 8)
    assert r.raw_losses == log.losses
    np.testing.assert_allclose(r.losses, ema(log.losses), rtol=0, atol=1e-9)  # EMA restarted too
    assert len(r.train_losses) == len(r.val_losses) == len(r.metrics) == len(r.nb_batches) == len(r.times) == 1
    assert r.nb_batches == [8]


# ---- plots ----------------------------------------------------------------------------------------------------
@pytest.fixture
def fitted(tmp_path):
    learn = make_learner(tmp_path, metrics=[accuracy, top_k_accuracy])
    learn.fit(2, lr=0.01)
    return learn


def _xy(line):
    return list(map(float, line.get_xdata())), list(map(float, line.get_ydata()))


def test_plot_returns_figure_with_lr_and_loss(fitted):
    r = fitted.recorder
    fig = r.plot(skip_start=0, skip_end=0)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    x, y = _xy(ax.lines[0])
    assert x == pytest.approx(r.lrs) and y == pytest.approx(r.losses)
    assert ax.get_xscale() == 'log'
    x, y = _xy(r.plot().axes[0].lines[0])  # default skips 10 at the start and 5 at the end of 16 steps
    assert y == pytest.approx(r.losses[10:-5]) and x == pytest.approx(r.lrs[10:-5])


def test_plot_keeps_all_points_when_too_few(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(1, lr=0.01)  # 8 steps <= 10 + 5
    _, y = _xy(learn.recorder.plot().axes[0].lines[0])
    assert y == pytest.approx(learn.recorder.losses)


def test_plot_losses_data(fitted):
    r = fitted.recorder
    fig = r.plot_losses()
    assert isinstance(fig, Figure)
    train, val = fig.axes[0].lines
    x, y = _xy(train)
    assert x == list(range(16)) and y == pytest.approx(r.losses)
    x, y = _xy(val)
    assert x == [8, 16] and y == pytest.approx(r.val_losses)
    _, y = _xy(r.plot_losses(skip_start=4).axes[0].lines[0])
    assert y == pytest.approx(r.losses[4:])


def test_plot_losses_without_validation_has_one_line(tmp_path):
    learn = make_learner(tmp_path, valid=False)
    learn.fit(2, lr=0.01)
    fig = learn.recorder.plot_losses()
    assert len(fig.axes[0].lines) == 1
    assert _xy(fig.axes[0].lines[0])[1] == pytest.approx(learn.recorder.losses)


def test_plot_metrics_data(fitted):
    r = fitted.recorder
    fig = r.plot_metrics()
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    for i, ax in enumerate(fig.axes):
        x, y = _xy(ax.lines[0])
        assert x == [0, 1]
        assert y == pytest.approx([m[i] for m in r.metrics])
        assert ax.get_ylabel() == r.metrics_names[i]


def test_plot_lr_data(fitted):
    r = fitted.recorder
    fig = r.plot_lr()
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    x, y = _xy(fig.axes[0].lines[0])
    assert x == list(range(16)) and y == pytest.approx(r.lrs)
    fig = r.plot_lr(show_moms=True)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert _xy(fig.axes[0].lines[0])[1] == pytest.approx(r.lrs)
    assert _xy(fig.axes[1].lines[0])[1] == pytest.approx(r.moms) == [0.9] * 16


def test_plots_draw_on_given_axes(fitted):
    r = fitted.recorder
    fig, ax = plt.subplots()
    assert r.plot(ax=ax) is fig
    assert _xy(ax.lines[0])[1] == pytest.approx(r.losses[10:-5])
    fig, ax = plt.subplots()
    assert r.plot_losses(ax=ax) is fig
    assert _xy(ax.lines[0])[1] == pytest.approx(r.losses)
    assert _xy(ax.lines[1])[1] == pytest.approx(r.val_losses)
    fig, ax = plt.subplots()
    assert r.plot_lr(ax=ax) is fig
    assert _xy(ax.lines[0])[1] == pytest.approx(r.lrs)
    fig, (a0, a1) = plt.subplots(1, 2)
    assert r.plot_lr(show_moms=True, ax=(a0, a1)) is fig
    assert _xy(a0.lines[0])[1] == pytest.approx(r.lrs) and _xy(a1.lines[0])[1] == pytest.approx(r.moms)
    fig, axs = plt.subplots(1, 2)  # a numpy array of axes
    assert r.plot_metrics(ax=axs) is fig
    assert _xy(axs[1].lines[0])[1] == pytest.approx([m[1] for m in r.metrics])
    assert len(plt.get_fignums()) == 5  # no extra figure was created


def test_plots_reject_wrong_number_of_axes(fitted):
    r = fitted.recorder
    _, ax = plt.subplots()
    _, (a0, a1) = plt.subplots(1, 2)
    with pytest.raises(ValueError, match='2 axes'):
        r.plot_lr(show_moms=True, ax=ax)
    with pytest.raises(ValueError, match='2 axes'):
        r.plot_metrics(ax=[ax])
    with pytest.raises(ValueError, match='1 axes'):
        r.plot_lr(ax=[a0, a1])
    with pytest.raises(ValueError, match='1 axes'):
        r.plot_losses(ax=(a0, a1))


@pytest.mark.parametrize('call', [lambda r: r.plot(), lambda r: r.plot_losses(), lambda r: r.plot_lr(),
                                  lambda r: r.plot_lr(show_moms=True)],
                         ids=['plot', 'plot_losses', 'plot_lr', 'plot_lr_moms'])
def test_plots_before_fit_raise(tmp_path, call):
    learn = make_learner(tmp_path)
    with pytest.raises(ValueError, match='nothing recorded yet'):
        call(learn.recorder)
    assert plt.get_fignums() == []


def test_plot_metrics_before_fit_says_nothing_recorded(tmp_path):
    learn = make_learner(tmp_path, metrics=[accuracy])
    with pytest.raises(ValueError, match='nothing recorded yet'):
        learn.recorder.plot_metrics()


def test_plot_metrics_errors(tmp_path):
    learn = make_learner(tmp_path, metrics=[])
    learn.fit(1, lr=0.01)
    with pytest.raises(ValueError, match='no metrics'):
        learn.recorder.plot_metrics()
    learn = make_learner(tmp_path, metrics=[accuracy], valid=False)  # metrics, but never computed
    learn.fit(1, lr=0.01)
    with pytest.raises(ValueError):
        learn.recorder.plot_metrics()


def test_plot_lr_show_moms_without_momentum_raises(tmp_path):
    learn = make_learner(tmp_path, opt_func=torch.optim.Adagrad)
    learn.fit(1, lr=0.01)
    with pytest.raises(ValueError, match='no momentum'):
        learn.recorder.plot_lr(show_moms=True)
    assert isinstance(learn.recorder.plot_lr(), Figure)  # the lr alone is fine


# ---- integer ticks where the x axis counts epochs, batches or steps --------------------------------------------
def _x_ticks(ax):
    ax.figure.canvas.draw()
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


@pytest.mark.parametrize('epochs', [2, 3, 5])
def test_plots_have_integer_ticks_on_epochs_and_steps(tmp_path, epochs):
    """plot_metrics drew ticks at epoch 0.5, 1.5 (and 0.25... for 3 or 5 epochs); plot_losses and plot_lr likewise
    on short runs (a count of batches or steps)."""
    learn = make_learner(tmp_path, n_train=64, metrics=(accuracy,))  # 2 batches per epoch
    learn.fit(epochs, lr=0.01)
    figs = [learn.recorder.plot_metrics(), learn.recorder.plot_losses(), learn.recorder.plot_lr(show_moms=True)]
    for fig in figs:
        for ax in fig.axes:
            ticks = _x_ticks(ax)
            assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (ax.get_xlabel(), ticks)


# ---- fastai v1's min_grad_lr (issue 18) -------------------------------------------------------------------------
def test_min_grad_lr_is_lr_finds_steep_suggestion_without_plotting(tmp_path, capsys):
    from conftest import make_data, make_mlp
    learn = Learner(make_data(n_train=1600), make_mlp(), silent=True, path=tmp_path, device='cpu')
    with pytest.raises(AttributeError, match=r'min_grad_lr: nothing is recorded; run learn.lr_find\(\) first'):
        learn.recorder.min_grad_lr
    res = learn.lr_find(num_it=50, start_lr=1e-4, end_lr=10)
    assert res.steep is not None and learn.recorder.min_grad_lr == res.steep  # no plot needed
    capsys.readouterr()
    learn.recorder.plot(suggestion=True)
    out = capsys.readouterr().out.splitlines()
    assert out == [f'Min numerical gradient: {res.steep:.2E}', f'Min loss divided by 10: {res.minimum:.2E}']
    learn.recorder.plot()
    assert capsys.readouterr().out == ''  # only with suggestion=True, as v1
    learn.fit_one_cycle(1, 0.01)
    with pytest.raises(AttributeError, match='the recorded history is a fit, not an LR range test'):
        learn.recorder.min_grad_lr
    assert not hasattr(learn.recorder, 'min_grad_lr')  # as in v1 before a plot: hasattr is safe
    learn.recorder.plot(suggestion=True)
    assert capsys.readouterr().out == ''  # no v1 line for a fit's history


def test_min_grad_lr_is_none_without_a_clear_descent(tmp_path, capsys):
    learn = make_learner(tmp_path)  # random labels: the loss does not clearly fall
    res = learn.lr_find(num_it=12, start_lr=1e-7, end_lr=1e-6)
    assert res.steep is None and learn.recorder.min_grad_lr is None
    learn.recorder.plot(suggestion=True)
    assert capsys.readouterr().out.splitlines()[0] == 'Min numerical gradient: none (the loss shows no clear descent)'
