"""WeightSnapshots and the loss-landscape analysis (interpolation, 2-D surfaces, filter-normalised directions,
weight averaging, evaluate_weights), against learn.validate and hand computations; their argument checks."""
import copy
import functools

import matplotlib.colors as mcolors
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.contour import ContourSet
from matplotlib.figure import Figure
from torch import nn
from torch.overrides import TorchFunctionMode

from minifast import DataBunch, Learner, accuracy
from minifast.callbacks.snapshots import WeightSnapshots, clr_cycle_ends, sgdr_cycle_ends, state_dict_copy
from minifast.checkpoint import load_state
from minifast.metrics import batch_means
from minifast.landscape import (average_weights, evaluate_weights, filter_normalized_direction, interpolate_losses,
                                loss_surface, plot_interpolation, plot_surface, recompute_bn)
from conftest import make_data, make_mlp
from helpers import _mlp_learner, same_state


def bn_mlp(seed=0, n_in=8, n_out=3, hidden=16, p=0.):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(p),
                         nn.Linear(hidden, n_out))


def trained_bn_learner(epochs=4, save_list=(1, 3), **kw):
    learn = Learner(make_data(), bn_mlp(**kw), metrics=[accuracy], silent=True,
                    callback_fns=[functools.partial(WeightSnapshots, save_list=list(save_list))])
    learn.fit(epochs, 1e-2)
    return learn


def model_state(model):
    return state_dict_copy(model), [m.training for m in model.modules()]


def assert_same_state(model, saved):
    sd, modes = saved
    now = model.state_dict()
    assert sd.keys() == now.keys()
    for k in sd:
        assert now[k].dtype == sd[k].dtype, k
        assert torch.equal(now[k].cpu(), sd[k]), k
    assert [m.training for m in model.modules()] == modes


# ---- snapshots -----------------------------------------------------------------------------------------------
class Probe:
    """Copies the weights after WeightSnapshots in after_epoch: what the snapshot must equal."""
    order = 70

    def __init__(self):
        self.seen = {}

    def after_epoch(self, learn):
        self.seen[learn.epoch] = state_dict_copy(learn.model)


def test_snapshots_at_chosen_epochs_are_copies(tmp_path):
    probe = Probe()
    snaps = WeightSnapshots(save_list=[1, 3], path=tmp_path)
    learn = Learner(make_data(), bn_mlp(), silent=True, callbacks=[probe])
    learn.fit(5, 1e-2, callbacks=[snaps])
    assert sorted(learn.snapshots) == [1, 3] and learn.snapshots is snaps.get_weights()
    for e in (1, 3):
        sd = learn.snapshots[e]
        for k, v in sd.items():
            assert v.device.type == 'cpu'
            assert torch.equal(v, probe.seen[e][k]), (e, k)  # the weights after epoch e's validation
        disk = load_state(tmp_path / f'snapshot_{e}.pth')
        assert all(torch.equal(disk[k], sd[k]) for k in sd)
    final = learn.model.state_dict()
    assert not torch.equal(learn.snapshots[3]['0.weight'], final['0.weight'].cpu())  # later training left it alone
    assert not torch.equal(learn.snapshots[1]['0.weight'], learn.snapshots[3]['0.weight'])


def test_snapshots_every_epoch_and_sgdr_cycle_ends():
    learn = Learner(make_data(), bn_mlp(), silent=True, callback_fns=[WeightSnapshots])
    learn.fit(3, 1e-2)
    assert sorted(learn.snapshots) == [0, 1, 2]  # nothing chosen: every epoch
    assert all(torch.equal(learn.snapshots[2][k], v.cpu()) for k, v in learn.model.state_dict().items())
    assert sgdr_cycle_ends(3, 1, 2) == [0, 2, 6] and sgdr_cycle_ends(2, 2, 1) == [1, 3]
    assert clr_cycle_ends(8, 6, steps_per_epoch=3) == [3, 7]
    learn = Learner(make_data(), bn_mlp(), silent=True,
                    callback_fns=[functools.partial(WeightSnapshots, cycle_ends=sgdr_cycle_ends(3, 1, 2))])
    learn.fit_sgdr(3, 1, lr=1e-2, cycle_mult=2)
    assert sorted(learn.snapshots) == [0, 2, 6]


# ---- interpolation -------------------------------------------------------------------------------------------
def test_endpoints_reproduce_validate():
    learn = trained_bn_learner()
    w1, w2 = learn.snapshots[1], learn.snapshots[3]
    res = interpolate_losses(learn, 1, 3, alphas=np.linspace(-0.5, 1.5, 8), bn="interpolate")
    assert len(res.alphas) == 10 and {0., 1.} <= set(res.alphas)  # the endpoints are added
    for w, a in ((w1, 1.), (w2, 0.)):
        learn.model.load_state_dict(w)
        i = int(np.flatnonzero(res.alphas == a)[0])
        for dl, loader in (('valid', None), ('train', learn.data.train_dl)):
            ref = learn.validate(loader)
            assert res.values[dl][i] == pytest.approx(ref, abs=1e-6)
    rows = res.to_rows()
    assert len(rows) == 10 and set(rows[0]) == {'alpha', 'valid_loss', 'valid_accuracy', 'train_loss',
                                                'train_accuracy'}


@pytest.mark.parametrize('flag', ['bf16', 'fp16'])
def test_evaluate_weights_runs_under_the_learners_autocast(flag):
    """fp16 learners validate under float16 autocast: the analyses must evaluate the same way (they ran fp32)."""
    from minifast.landscape import evaluate_weights
    learn = Learner(make_data(n_valid=40), bn_mlp(), metrics=[accuracy], silent=True, **{flag: True})
    learn.fit(1, 1e-2)
    got = evaluate_weights(learn, state_dict_copy(learn.model))
    assert [got['loss'], got['accuracy']] == learn.validate()


def xor_data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 2, generator=g) * 2 - 1
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    return DataBunch.from_tensors(x[:384], y[:384], x[384:], y[384:], bs=128)


def test_barrier_between_two_seeds_and_none_with_itself():
    data, ws = xor_data(), []
    for seed in (1, 2):  # XOR needs the hidden units; two seeds order them differently: the midpoint mixes them
        torch.manual_seed(seed)
        learn = Learner(data, nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2)), silent=True)
        learn.fit(12, 3e-2)
        ws.append(state_dict_copy(learn.model))
    res = interpolate_losses(learn, ws[0], ws[1], alphas=np.linspace(0, 1, 11))
    b = res.barrier()
    assert b.height > 0.05 and not b.same_basin and 0 < b.alpha_at_max < 1
    assert b.max_loss > 1.5 * max(b.loss_w1, b.loss_w2)
    with pytest.warns(UserWarning, match='w1 and w2 are the same weights'):
        same = interpolate_losses(learn, ws[0], ws[0], alphas=np.linspace(-0.5, 1.5, 9))
    for dl in ('valid', 'train'):
        assert np.ptp(same.loss(dl)) == 0  # a flat line
    assert same.barrier().height == 0 and same.barrier('train').same_basin


def test_integer_buffers_not_interpolated_and_restored():
    learn = trained_bn_learner()
    bn = learn.model[1]
    w1, w2 = dict(learn.snapshots[1]), dict(learn.snapshots[3])
    w1['1.num_batches_tracked'], w2['1.num_batches_tracked'] = torch.tensor(7), torch.tensor(1000)
    bn.num_batches_tracked.fill_(123)
    seen = []

    def loss_func(pred, y):
        seen.append((bn.num_batches_tracked.dtype, int(bn.num_batches_tracked)))
        return F.cross_entropy(pred, y)
    learn.loss_func = loss_func
    for mode in ('interpolate', 'keep'):
        seen.clear()
        interpolate_losses(learn, w1, w2, alphas=[-0.5, 0.3, 1.5], bn=mode, dls='valid')
        assert set(seen) == {(torch.int64, 7)}  # w1's value, an integer, at every alpha
        assert bn.num_batches_tracked.dtype == torch.int64 and int(bn.num_batches_tracked) == 123
    interpolate_losses(learn, w1, w2, alphas=[0.3], bn='recompute', dls='valid')
    assert bn.num_batches_tracked.dtype == torch.int64 and int(bn.num_batches_tracked) == 123


def test_model_restored_after_analysis_and_after_exception():
    learn = trained_bn_learner(p=0.2)
    learn.model.train()
    learn.model[3].eval()  # a mixed mode must come back as it was
    saved, rng = model_state(learn.model), torch.get_rng_state()
    interpolate_losses(learn, 1, 3, alphas=np.linspace(-1, 2, 7))  # dropout and shuffling draw random numbers
    assert_same_state(learn.model, saved)
    assert torch.equal(torch.get_rng_state(), rng)
    assert learn.model[1].momentum == 0.1
    for exc in (RuntimeError, KeyboardInterrupt):
        calls = []

        def failing(pred, y, exc=exc):
            calls.append(1)
            if len(calls) == 5:
                raise exc('boom')
            return accuracy(pred, y)
        with pytest.raises(exc):
            interpolate_losses(learn, 1, 3, alphas=np.linspace(-1, 2, 7), metrics=[failing])
        assert len(calls) == 5
        assert_same_state(learn.model, saved)
        assert learn.model[1].momentum == 0.1


def test_recompute_bn_equals_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    xs = [torch.randn(10, 4) * 3 + 1 for _ in range(3)]
    feats = [model[0](x).detach() for x in xs]
    model.eval()
    recompute_bn(model, [(x, None) for x in xs])
    bn = model[1]
    # momentum=None: the cumulative average of the per-batch statistics
    assert torch.allclose(bn.running_mean, torch.stack([f.mean(0) for f in feats]).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack([f.var(0) for f in feats]).mean(0), atol=1e-6)
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1 and not model.training


def test_recompute_in_analysis_matches_hand_loop():
    data = make_data(n_train=64, shuffle=False)
    learn = Learner(data, bn_mlp(), silent=True, callback_fns=[functools.partial(WeightSnapshots, save_list=[0, 2])])
    learn.fit(3, 1e-2)
    w1, w2 = learn.snapshots[0], learn.snapshots[2]
    res = interpolate_losses(learn, w1, w2, alphas=[0.3], bn='recompute', n_batches=2, dls='valid')
    hand = bn_mlp()
    hand.load_state_dict({k: torch.lerp(w2[k], w1[k], 0.3) if v.is_floating_point() else v for k, v in w1.items()})
    train = [b for _, b in zip(range(2), data.train_dl)]
    recompute_bn(hand, train)
    hand.eval()
    with torch.no_grad():
        xv, yv = data.valid_dl.tensors
        ref = F.cross_entropy(hand(xv), yv).item()
    i = int(np.flatnonzero(res.alphas == 0.3)[0])
    assert res.loss('valid')[i] == pytest.approx(ref, abs=1e-6)


def test_non_finite_losses_are_recorded():
    learn = trained_bn_learner()
    res = interpolate_losses(learn, 1, 3, alphas=[-1e30, 0.5, 1e30])  # overflows to inf/nan at the far ends
    v = res.loss('valid')
    assert not np.isfinite(v[0]) and not np.isfinite(v[-1]) and np.isfinite(v[res.alphas == 0.5]).all()
    learn.loss_func = lambda p, y: F.cross_entropy(p, y) * float('inf')
    res = interpolate_losses(learn, 1, 3, alphas=[0.5], bn='keep')
    assert np.isinf(res.loss('train')).all()
    assert res.barrier().height == float('inf') and not res.barrier().same_basin


def test_plot_interpolation_blue_train_red_valid():
    learn = trained_bn_learner(epochs=2, save_list=(0, 1))
    res = interpolate_losses(learn, 0, 1, alphas=np.linspace(-0.5, 1.5, 5))
    fig = plot_interpolation(res, log=True)
    assert isinstance(fig, Figure)
    lines = {ln.get_label(): mcolors.to_rgb(ln.get_color()) for ln in fig.axes[0].lines}
    assert lines['train loss'] == mcolors.to_rgb('b') and lines['valid loss'] == mcolors.to_rgb('r')
    assert fig.axes[0].get_yscale() == 'log'
    with pytest.raises(ValueError, match='alpha=0'):
        interpolate_losses(learn, 0, 1, alphas=[0.5], include_endpoints=False).barrier()


class TiedMLP(nn.Module):
    """Two layers sharing one weight Parameter (tied weights): state_dict lists it under both keys."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tied_weights_are_interpolated_once():
    learn = Learner(make_data(), TiedMLP(), silent=True)
    w2 = state_dict_copy(learn.model)
    w1 = {k: v + 0.3 for k, v in w2.items()}  # still tied: both keys hold the same values
    res = interpolate_losses(learn, w1, w2, alphas=[0.5], dls='valid', bn='keep', include_endpoints=False)
    hand = TiedMLP()
    hand.load_state_dict({k: torch.lerp(w2[k], w1[k], 0.5) for k in w2})
    xv, yv = learn.data.valid_dl.tensors
    with torch.no_grad():
        assert res.loss('valid')[0] == pytest.approx(F.cross_entropy(hand(xv), yv).item(), abs=1e-6)
    assert torch.equal(learn.model.a.weight, w2['a.weight'])  # restored, still tied
    assert learn.model.b.weight is learn.model.a.weight


def test_snapshot_files_on_disk_give_the_same_numbers(tmp_path):
    learn = Learner(make_data(), bn_mlp(), silent=True,
                    callback_fns=[functools.partial(WeightSnapshots, save_list=[0, 1], path=tmp_path)])
    learn.fit(2, 1e-2)
    ref = interpolate_losses(learn, 0, 1, alphas=[-0.5, 0.5], dls='valid')
    res = interpolate_losses(learn, str(tmp_path / 'snapshot_0.pth'), tmp_path / 'snapshot_1.pth',
                             alphas=[-0.5, 0.5], dls='valid')
    np.testing.assert_array_equal(res.values['valid'], ref.values['valid'])
    with pytest.raises(TypeError, match="w2 must be a state dict.*list"):
        interpolate_losses(learn, 0, [learn.snapshots[1]], alphas=[0.5])


def test_numpy_integer_epochs_name_snapshots():
    learn = trained_bn_learner(epochs=2, save_list=(0, 1))
    ref = interpolate_losses(learn, 0, 1, alphas=[0.5], dls='valid')
    e0, e1 = np.array(sorted(learn.snapshots))  # numpy integers, as from np.arange or an array of epochs
    res = interpolate_losses(learn, e0, e1, alphas=[0.5], dls='valid')
    np.testing.assert_array_equal(res.values['valid'], ref.values['valid'])


def test_snapshot_epochs_beyond_the_fit_warn_at_its_start():
    # seed 004's save_list=[5, 7] counts epochs from 0; with fewer epochs (or counting from 1) a snapshot was silently
    # never taken, and the interpolation cell failed later with a KeyError
    learn = Learner(make_data(), make_mlp(), silent=True)
    snaps = WeightSnapshots(learn, save_list=[1, 3])
    with pytest.warns(UserWarning, match=r"WeightSnapshots: epoch\(s\) \[3\] .* 3-epoch fit .*0 to 2"):
        learn.fit(3, 1e-2, callbacks=snaps)
    assert sorted(learn.snapshots) == [1]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        learn.fit(4, 1e-2, callbacks=snaps)  # every chosen epoch is reached: nothing to say
    assert sorted(learn.snapshots) == [1, 3]


@pytest.mark.parametrize('kw, msg', [
    ({'save_list': 5}, r"save_list must be a list of epochs \(0-based ints\), e\.g\. \[5, 7\]; got 5"),
    ({'save_list': ['a']}, r"save_list must hold epochs as ints \(0-based\); got 'a'"),
    ({'cycle_ends': [1.5]}, r"cycle_ends must hold epochs as ints \(0-based\); got 1\.5"),
    ({'save_list': '57'}, r"save_list must be a list of epochs")])
def test_snapshot_epochs_of_the_wrong_kind_are_named(kw, msg):
    # save_list=5 used to fail as "'int' object is not iterable", ['a'] as int()'s ValueError, 1.5 became epoch 1
    with pytest.raises(TypeError, match=r'WeightSnapshots: ' + msg):
        WeightSnapshots(**kw)


def test_interpolating_between_identical_weights_warns():
    # seed 004's GetWeights keeps `v.cpu()` of the live state dict: on a CPU run that aliases the model, so both
    # "snapshots" are the final weights and the interpolation is a flat line with nothing to say it is wrong
    learn = Learner(make_data(), make_mlp(), silent=True)
    learn.fit(1, 1e-2)
    live = learn.model.state_dict()
    with pytest.warns(UserWarning, match=r"interpolate_losses: w1 and w2 are the same weights"):
        res = interpolate_losses(learn, live, {k: v.cpu() for k, v in live.items()}, alphas=[0., 1.], bn='keep')
    assert res.loss()[0] == res.loss()[1]
    import warnings
    other = {k: v + 1 for k, v in live.items()}
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        interpolate_losses(learn, live, other, alphas=[0., 1.], bn='keep')


@pytest.mark.parametrize('alphas', [[0.5, float('nan')], [float('inf')]])
def test_interpolate_losses_rejects_non_finite_alphas(alphas):
    from minifast import interpolate_losses
    learn = _mlp_learner()
    w1 = {k: v.clone() for k, v in learn.model.state_dict().items()}
    w2 = {k: v + 1 for k, v in w1.items()}
    with pytest.raises(ValueError, match=r'interpolate_losses: alphas must be finite numbers, got \[(nan|inf)\]'):
        interpolate_losses(learn, w1, w2, alphas=alphas)
    assert same_state(learn.model, w1)


def validate_with(learn, sd, dl=None):
    """learn.validate() with `sd` loaded, the model's own weights put back afterwards."""
    saved = state_dict_copy(learn.model)
    learn.model.load_state_dict(sd)
    try:
        return learn.validate(dl)
    finally:
        learn.model.load_state_dict(saved)


@pytest.mark.parametrize('bn', ['keep', 'interpolate'])
def test_surface_center_is_the_center_loss(bn):
    learn = trained_bn_learner()
    res = loss_surface(learn, 3, steps=4, bn=bn)  # linspace(-1, 1, 4) has no 0: it is added
    assert res.loss().shape == (5, 5) and 0. in res.xs and 0. in res.ys and res.points == {'center': (0., 0.)}
    ref = validate_with(learn, learn.snapshots[3])
    assert res.loss_at(0, 0) == pytest.approx(ref[0], abs=1e-6)
    assert res.metric('accuracy')[2, 2] == pytest.approx(ref[1], abs=1e-6)
    assert res.loss_at(0, 0) == evaluate_weights(learn, 3)['loss']  # the same evaluation: bit for bit
    assert np.ptp(res.loss()) > 0  # the directions move the weights


def test_plane_through_three_snapshots_hits_each_snapshot():
    learn = trained_bn_learner(save_list=(1, 2, 3))
    rng = torch.get_rng_state()  # the shuffle of the training batches the surface is evaluated on
    res = loss_surface(learn, 1, dir1=2, dir2=3, span=(-0.5, 1.5), steps=3, bn='interpolate',
                       dl={'valid': learn.data.valid_dl, 'train': learn.data.train_dl})
    assert list(res.xs) == [-0.5, 0., 0.5, 1., 1.5] and res.points == {'w0': (0, 0), 'w1': (1, 0), 'w2': (0, 1)}
    for epoch, (x, y) in ((1, (0, 0)), (2, (1, 0)), (3, (0, 1))):
        for dl in ('valid', 'train'):
            # validate_with below shuffles the training loader again: without this the next evaluate_weights sums
            # the same items in another order, which rounds differently (0.8000228 vs 0.8000229 with one thread)
            torch.set_rng_state(rng)
            ev = evaluate_weights(learn, epoch, dl=dl)
            assert res.loss_at(x, y, dl) == ev['loss'], (epoch, dl)  # the snapshot's weights exactly
            ref = validate_with(learn, learn.snapshots[epoch], getattr(learn.data, f'{dl}_dl'))
            assert ev['loss'] == pytest.approx(ref[0], abs=1e-6) and ev['accuracy'] == pytest.approx(ref[1], abs=1e-6)
    rec = loss_surface(learn, 1, dir1=2, dir2=3, steps=3, n_batches=2)  # bn='recompute'
    assert rec.loss_at(1, 0) == evaluate_weights(learn, 2, bn='recompute', n_batches=2)['loss']


def test_given_directions_move_the_weights_linearly():
    learn = trained_bn_learner()
    w0, w1 = learn.snapshots[3], learn.snapshots[1]
    d1 = {k: (w1[k] - v) if v.is_floating_point() else v for k, v in w0.items()}
    d2 = {k: torch.zeros_like(v) for k, v in w0.items() if v.is_floating_point()}  # floats only is enough
    res = loss_surface(learn, w0, directions=(d1, d2), span=(0, 1), steps=5, bn='keep', dl='train')
    hand = {k: (v + 0.25 * d1[k]) if v.is_floating_point() and not k.endswith(('running_mean', 'running_var'))
            else v for k, v in w0.items()}
    assert res.loss_at(0.25, 0, 'train') == pytest.approx(evaluate_weights(learn, hand, dl='train')['loss'], abs=1e-6)
    assert np.ptp(res.loss('train')[1]) == 0  # nothing changes along d2 = 0


def test_filter_normalized_direction_norms_and_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    model[1].running_mean.fill_(0.3)
    rng = torch.get_rng_state()
    d = filter_normalized_direction(model, seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    sd = model.state_dict()
    assert set(d) == {k for k, v in sd.items() if v.is_floating_point()}
    for k in ('0.weight', '4.weight'):
        w = sd[k]
        assert d[k].shape == w.shape and d[k].dtype == w.dtype
        assert torch.allclose(d[k].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-5)
        assert not torch.allclose(d[k], w)
    for k in ('0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var', '4.bias'):
        assert torch.count_nonzero(d[k]) == 0, k
    same, other = filter_normalized_direction(model, seed=0), filter_normalized_direction(model, seed=1)
    assert all(torch.equal(d[k], same[k]) for k in d) and not torch.equal(d['0.weight'], other['0.weight'])


def test_surface_restores_model_and_rng_and_records_non_finite():
    learn = trained_bn_learner(p=0.2)
    learn.model.train()
    learn.model[3].eval()
    saved, rng = model_state(learn.model), torch.get_rng_state()
    res = loss_surface(learn, 1, dir1=3, dir2=1, steps=3, span=(-1e30, 1e30))  # dropout draws random numbers
    assert_same_state(learn.model, saved)
    assert torch.equal(torch.get_rng_state(), rng) and learn.model[1].momentum == 0.1
    loss = res.loss()
    assert not np.isfinite(loss[0, 0]) and np.isfinite(res.loss_at(0, 0)) and 'non-finite' in res.summary()
    calls = []

    def failing(pred, y):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return accuracy(pred, y)
    with pytest.raises(KeyboardInterrupt):
        loss_surface(learn, 1, steps=3, metrics=[failing])
    assert_same_state(learn.model, saved)
    assert torch.equal(torch.get_rng_state(), rng) and learn.model[1].momentum == 0.1
    with pytest.raises(ValueError, match='dir2'):
        loss_surface(learn, 1, dir1=3)


def test_average_of_identical_snapshots_is_the_snapshot():
    learn = trained_bn_learner()
    sd = learn.snapshots[3]
    saved = model_state(learn.model)
    for kw in ({'bn': 'keep'}, {'bn': 'interpolate'}, {'learn': learn, 'bn': 'interpolate'}):
        avg = average_weights([sd, sd, sd], **kw)
        assert avg.keys() == sd.keys()
        for k, v in sd.items():
            assert avg[k].dtype == v.dtype and torch.equal(avg[k], v), (kw, k)
        assert avg['1.num_batches_tracked'].dtype == torch.int64
    with pytest.warns(UserWarning, match='needs a learner'):
        average_weights([sd, sd])
    assert_same_state(learn.model, saved)


def test_average_two_solutions_then_recompute_bn_by_hand():
    data = make_data(n_train=64, shuffle=False)
    learn = Learner(data, bn_mlp(), metrics=[accuracy], silent=True,
                    callback_fns=[functools.partial(WeightSnapshots, save_list=[0, 2])])
    learn.fit(3, 1e-2)
    w0, w2 = dict(learn.snapshots[0]), dict(learn.snapshots[2])
    w0['1.num_batches_tracked'], w2['1.num_batches_tracked'] = torch.tensor(5), torch.tensor(9)
    saved, rng = model_state(learn.model), torch.get_rng_state()
    avg = average_weights({2: w2, 0: w0}, learn, n_batches=2)  # a {epoch: sd} dict, like learn.snapshots
    assert_same_state(learn.model, saved)
    assert torch.equal(torch.get_rng_state(), rng)
    for k in ('0.weight', '0.bias', '1.weight', '4.weight'):
        assert torch.allclose(avg[k], (w0[k] + w2[k]) / 2, atol=1e-7)
    assert avg['1.num_batches_tracked'].dtype == torch.int64 and int(avg['1.num_batches_tracked']) == 9  # the last
    xs = [x for _, (x, _) in zip(range(2), data.train_dl)]
    feats = [x @ avg['0.weight'].T + avg['0.bias'] for x in xs]
    assert torch.allclose(avg['1.running_mean'], torch.stack([f.mean(0) for f in feats]).mean(0), atol=1e-6)
    assert torch.allclose(avg['1.running_var'], torch.stack([f.var(0) for f in feats]).mean(0), atol=1e-6)
    assert not torch.allclose(avg['1.running_mean'], (w0['1.running_mean'] + w2['1.running_mean']) / 2)
    ev = evaluate_weights(learn, avg)
    assert ev['loss'] == pytest.approx(validate_with(learn, avg)[0], abs=1e-6)
    assert_same_state(learn.model, saved)


def test_plot_surface_and_summaries():
    learn = trained_bn_learner(save_list=(1, 2, 3))
    res = loss_surface(learn, 1, dir1=2, dir2=3, steps=5, bn='interpolate')
    fig = plot_surface(res, levels=10, log=True)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert any(isinstance(c, ContourSet) for c in ax.collections)
    assert {t.get_text() for t in ax.texts} >= {'w0', 'w1', 'w2'}
    assert isinstance(res.plot(), Figure)
    s = res.summary()
    assert 'w1 at (1, 0)' in s and 'min loss' in s
    text = interpolate_losses(learn, 1, 3, alphas=np.linspace(0, 1, 5)).summary()
    assert 'barrier height' in text and ('same basin' in text or 'different basins' in text) and 'train:' in text


def test_keep_uses_the_first_snapshots_bn_statistics():
    """bn='keep' holds the running statistics at w1's (interpolate_losses) or center's (loss_surface)."""
    learn = trained_bn_learner()
    w1, w3 = learn.snapshots[1], learn.snapshots[3]
    assert not torch.equal(w1['1.running_mean'], w3['1.running_mean'])
    hand = {k: v if k.endswith(('running_mean', 'running_var')) or not v.is_floating_point() else w3[k]
            for k, v in w1.items()}  # w3's weights with w1's statistics
    ref = evaluate_weights(learn, hand)['loss']
    res = interpolate_losses(learn, 1, 3, alphas=[0.], bn='keep', dls='valid')
    assert res.loss('valid')[0] == ref
    surf = loss_surface(learn, 1, dir1=3, dir2=1, steps=3, bn='keep')
    assert surf.loss_at(1, 0) == ref


def test_live_model_or_its_state_dict_as_endpoint_gives_the_same_numbers():
    import copy
    from minifast import Learner, WeightSnapshots, interpolate_losses, loss_surface
    from conftest import make_data, make_mlp
    learn = Learner(make_data(n_train=96), make_mlp(), silent=True, callback_fns=[WeightSnapshots])
    learn.fit(3, 1e-2)
    live, frozen = learn.model.state_dict(), copy.deepcopy(learn.model.state_dict())
    alphas = [-0.5, 0.25, 0.5, 1.5]
    ref = interpolate_losses(learn, frozen, 0, alphas=alphas, bn='interpolate').loss('valid')
    for w1 in (learn.model, live):
        got = interpolate_losses(learn, w1, 0, alphas=alphas, bn='interpolate').loss('valid')
        np.testing.assert_array_equal(got, ref)
    ref2 = interpolate_losses(learn, 0, frozen, alphas=alphas, bn='interpolate').loss('valid')
    np.testing.assert_array_equal(interpolate_losses(learn, 0, learn.model, alphas=alphas,
                                                     bn='interpolate').loss('valid'), ref2)
    s_ref = loss_surface(learn, frozen, steps=3, bn='keep').loss('valid')
    np.testing.assert_array_equal(loss_surface(learn, learn.model, steps=3, bn='keep').loss('valid'), s_ref)


def test_a_monotone_path_between_two_snapshots_of_one_run_is_one_basin():
    from minifast import Learner, WeightSnapshots, interpolate_losses
    from conftest import make_data, make_mlp
    learn = Learner(make_data(n_train=160), make_mlp(), silent=True, callback_fns=[WeightSnapshots])
    learn.fit(6, 3e-3)
    res = interpolate_losses(learn, 5, 1, alphas=np.linspace(0, 1, 21), bn='interpolate', dls='valid')
    loss = res.loss('valid')
    assert np.all(np.diff(loss[np.argsort(res.alphas)]) < 0)  # w2 (epoch 1) -> w1 (epoch 5): steadily lower
    b = res.barrier()
    assert b.height > 0.01 and b.excess < 1e-3 and b.same_basin  # height is half the endpoint gap; no bump


def test_filter_direction_moves_embeddings_too():
    from minifast import filter_normalized_direction
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    d = filter_normalized_direction(model, seed=1)
    w = model.state_dict()
    torch.testing.assert_close(d['0.weight'].norm(dim=1), w['0.weight'].norm(dim=1))
    assert d['1.weight'].abs().sum() == 0 and d['2.bias'].abs().sum() == 0


def test_tied_weights_move_once_along_given_directions():
    from test_landscape import TiedMLP
    learn = Learner(make_data(), TiedMLP(), silent=True)
    w0 = state_dict_copy(learn.model)
    d1 = {k: torch.full_like(v, 0.1) for k, v in w0.items()}  # the tied weight's direction under both keys
    d2 = {k: torch.zeros_like(v) for k, v in w0.items()}
    res = loss_surface(learn, w0, directions=(d1, d2), span=(0, 1), steps=2, bn='keep')
    hand = {k: v + d1[k] for k, v in w0.items()}
    assert res.loss_at(1, 0) == pytest.approx(evaluate_weights(learn, hand)['loss'], abs=1e-6)


# ---- the reduction is batch_means; one host read per sweep ---------------------------------------------------------
# ---- the reduction ---------------------------------------------------------------------------------------------
def spread_loss(pred, y):
    """Per-batch losses over several orders of magnitude: the order of the weighted sums shows in the last bits."""
    return F.cross_entropy(pred, y) * 10 ** (3 * y.float().mean())


def spread_metric(pred, y):
    return (pred.argmax(-1) == y).float().mean() / 3 + pred.float().std() * 1e3


def spread_learner():
    """Uneven batches (9 of 12 and one of 4 in valid) of a model without BatchNorm, so bn='keep' is exact."""
    data = make_data(n_train=64, n_valid=112, bs=12, seed=3)
    learn = Learner(data, make_mlp(), loss_func=spread_loss, metrics=[spread_metric], silent=True, device='cpu')
    w2 = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.fit(1, 1e-2)
    return learn, {k: v.clone() for k, v in learn.model.state_dict().items()}, w2


def reference(learn, weights, dl):
    """`batch_means` of the per-batch (size, (loss, metric)) of `weights` on `dl`, collected by hand."""
    model = copy.deepcopy(learn.model)
    model.load_state_dict(weights)
    model.eval()
    rows = []
    with torch.no_grad():
        for xb, yb in dl:
            pred = model(xb)
            rows.append((yb.shape[0], (learn.loss_func(pred, yb), *[m(pred, yb) for m in learn.metrics])))
    return batch_means(rows, 1 + len(learn.metrics), learn.device)


def test_the_landscape_reduction_is_batch_means():
    learn, w1, w2 = spread_learner()
    res = interpolate_losses(learn, w1, w2, alphas=[0., 0.5, 1.], dls=('valid',), bn='keep')
    mid = {k: torch.lerp(w2[k], w1[k], 0.5) if v.is_floating_point() else v for k, v in w1.items()}
    for i, w in enumerate((w2, mid, w1)):
        assert list(res.values['valid'][i]) == reference(learn, w, learn.data.valid_dl), i  # bit for bit
    assert list(evaluate_weights(learn, w2).values()) == reference(learn, w2, learn.data.valid_dl)
    surface = loss_surface(learn, w1, steps=2)
    assert surface.loss_at(0, 0) == reference(learn, w1, learn.data.valid_dl)[0]
    learn.model.load_state_dict(w1)
    assert learn.validate() == reference(learn, w1, learn.data.valid_dl)


class HostReads(TorchFunctionMode):
    """Counts what reads a tensor back to the host or copies host data to a device."""
    NAMES = {'cpu', 'item', 'tolist', 'numpy', '__float__', '__int__', '__bool__', 'tensor'}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, '__name__', '')
        self.n += name in self.NAMES or (name == 'as_tensor' and not isinstance(args[0], torch.Tensor))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('bn', ['recompute', 'interpolate'])
def test_no_host_read_per_point(bn):
    """The sweep reads the device once at the end, however many points it evaluates."""
    learn, w1, w2 = spread_learner()
    counts = []
    for n in (2, 7):
        with HostReads() as reads:
            interpolate_losses(learn, w1, w2, alphas=np.linspace(-1, 2, n), bn=bn)
        counts.append(reads.n)
    assert counts[0] == counts[1], counts


def test_plot_interpolation_endpoint_labels_do_not_collide_with_a_title():
    """The w1/w2 names used to sit on the top edge of the axes, where a title (smith sets one) covered them."""
    learn = trained_bn_learner(epochs=2, save_list=(0, 1))
    res = interpolate_losses(learn, 0, 1, alphas=np.linspace(-0.5, 1.5, 5))
    fig = plot_interpolation(res)
    ax = fig.axes[0]
    ax.set_title('loss between two snapshots of the final fit\nw1 = after epoch 0, w2 = after epoch 2')
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    names = [t for t in fig.findobj(lambda a: hasattr(a, 'get_text') and a.get_text() in ('w1', 'w2'))
             if t.get_visible()]
    assert sorted(t.get_text() for t in names) == ['w1', 'w2']
    title = ax.title.get_window_extent(r)
    assert all(t.get_window_extent(r).y1 <= title.y0 + 0.5 for t in names)  # below the title, whatever its width
    assert not any(t.get_window_extent(r).overlaps(title) for t in names)
    x = {t.get_text(): t.get_window_extent(r).x0 + t.get_window_extent(r).width / 2 for t in names}
    at = {a: ax.transData.transform((a, 0))[0] for a in (0., 1.)}
    assert x['w2'] == pytest.approx(at[0.], abs=2) and x['w1'] == pytest.approx(at[1.], abs=2)  # over alpha 0, 1
