"""2-D loss surfaces, filter-normalised directions, weight averaging and evaluate_weights, against learn.validate,
the interpolation evaluation and hand computations."""
import functools

import numpy as np
import pytest
import torch
from matplotlib.contour import ContourSet
from matplotlib.figure import Figure
from torch import nn

from minifast import Learner, accuracy
from minifast.callbacks.snapshots import WeightSnapshots, state_dict_copy
from minifast.landscape import (average_weights, evaluate_weights, filter_normalized_direction, interpolate_losses,
                                loss_surface, plot_surface)

from conftest import make_data
from test_landscape import assert_same_state, bn_mlp, model_state, trained_bn_learner


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
    res = loss_surface(learn, 1, dir1=2, dir2=3, span=(-0.5, 1.5), steps=3, bn='interpolate',
                       dl={'valid': learn.data.valid_dl, 'train': learn.data.train_dl})
    assert list(res.xs) == [-0.5, 0., 0.5, 1., 1.5] and res.points == {'w0': (0, 0), 'w1': (1, 0), 'w2': (0, 1)}
    for epoch, (x, y) in ((1, (0, 0)), (2, (1, 0)), (3, (0, 1))):
        for dl in ('valid', 'train'):
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
