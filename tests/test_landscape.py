"""WeightSnapshots and the interpolation analysis, against learn.validate and hand computations."""
import functools

import matplotlib.colors as mcolors
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from minifast import DataBunch, Learner, accuracy
from minifast.callbacks.snapshots import WeightSnapshots, clr_cycle_ends, sgdr_cycle_ends, state_dict_copy
from minifast.checkpoint import load_state
from minifast.landscape import interpolate_losses, plot_interpolation, recompute_bn

from conftest import make_data


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
