"""Divergence: a non-finite loss stops fit naming epoch and step; the learner, checkpoints and snapshots keep the last
finite weights; lr_find stops on NaN; the check can be switched off."""
from functools import partial
import math

import pytest
import torch

import minifast
from minifast import Callback, CancelFitException, DivergenceError, Learner
from minifast.callbacks.tracking import Checkpoint, DivergenceGuard
from minifast.resume import list_checkpoints

from conftest import make_data, make_mlp


def make_learner(tmp_path=None, **kw):
    return Learner(make_data(n_train=96), make_mlp(), silent=True, path=tmp_path or '.', **kw)


class PoisonInput(Callback):
    """Makes training step `at` see NaN inputs (so its loss is NaN)."""
    def __init__(self, at):
        self.at = at

    def before_batch(self, learn):
        if learn.training and learn.train_iter == self.at:
            learn.xb = (learn.xb[0] * float('nan'),)


class PoisonWeights(Callback):
    """After training step `at`, sets a weight to inf (that step's loss was finite)."""
    def __init__(self, at):
        self.at = at

    def after_step(self, learn):
        if learn.train_iter == self.at:
            with torch.no_grad():
                learn.model[0].weight[0, 0] = float('inf')


class StopAfter(Callback):
    def __init__(self, n):
        self.n = n

    def after_batch(self, learn):
        if learn.training and learn.train_iter + 1 == self.n:
            raise CancelFitException()


def reference_after(n_steps, epochs=3):
    """The weights and optimizer state after the first n_steps steps of the same run."""
    torch.manual_seed(0)
    learn = make_learner()
    learn.fit_one_cycle(epochs, 1e-2, callbacks=[StopAfter(n_steps)] if n_steps else [])
    return learn


def test_nan_loss_stops_fit_with_epoch_and_step_and_keeps_last_finite_weights():
    torch.manual_seed(0)
    learn = make_learner()
    with pytest.raises(DivergenceError, match=r'loss is nan at epoch 1, batch 2 \(step 8 of this fit\)') as err:
        learn.fit_one_cycle(3, 1e-2, callbacks=[PoisonInput(8)])
    assert (err.value.epoch, err.value.batch, err.value.step) == (1, 2, 8)
    assert learn.diverged == {'epoch': 1, 'batch': 2, 'step': 8}
    assert 'weights that loss was computed from' in str(err.value)
    ref = reference_after(8)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, learn.model.state_dict()[k]), k
    assert torch.equal(ref.opt.state_dict()['state'][0]['exp_avg'], learn.opt.state_dict()['state'][0]['exp_avg'])
    assert len(learn.recorder.raw_losses) == 8 and all(map(math.isfinite, learn.recorder.raw_losses))
    assert learn.exception is err.value


def test_weights_gone_non_finite_are_restored_to_the_last_verified_copy():
    torch.manual_seed(0)
    learn = make_learner()
    with pytest.raises(DivergenceError, match='restored to those verified finite after 6 steps'):
        learn.fit_one_cycle(3, 1e-2, callbacks=[PoisonWeights(8)])  # step 9's loss is nan; weights inf since 8
    ref = reference_after(6)  # the copy taken when epoch 0's training ended
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, learn.model.state_dict()[k]), k


def test_lagged_check_restores_the_copy_from_the_last_check():
    torch.manual_seed(0)
    learn = make_learner()
    learn.guard = DivergenceGuard(check_every=4)
    with pytest.raises(DivergenceError, match=r'loss is not finite at epoch 1, batch 3 \(step 9 of this fit\).*'
                                              r'verified finite after 7 steps'):
        learn.fit_one_cycle(3, 1e-2, callbacks=[PoisonInput(9)])  # checks at steps 3, 7, 11 and each epoch's end
    assert len(learn.recorder.raw_losses) == 11 and math.isnan(learn.recorder.raw_losses[9])
    ref = reference_after(7)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, learn.model.state_dict()[k]), k
    ro, lo = ref.opt.state_dict()['state'], learn.opt.state_dict()['state']  # Adam's moments and step, in place
    assert ro.keys() == lo.keys() and ro
    for i in ro:
        assert ro[i].keys() == lo[i].keys() and all(torch.equal(ro[i][k], lo[i][k]) for k in ro[i]), i


def test_lagged_check_before_the_first_check_restores_the_start_and_drops_new_optimizer_state():
    torch.manual_seed(0)
    learn = make_learner()
    learn.guard = DivergenceGuard(check_every=4)
    start = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(DivergenceError, match=r'step 2 of this fit.*verified finite after 0 steps'):
        learn.fit(1, 1e-2, callbacks=[PoisonInput(2)])
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in start.items())
    assert len(learn.opt.state) == 0  # the optimizer had no state when the fit started
    learn.fit(1, 1e-2)  # and the learner trains on
    assert all(p.isfinite().all() for p in learn.model.parameters())


def test_no_checkpoint_or_snapshot_holds_non_finite_weights(tmp_path):
    torch.manual_seed(0)
    learn = make_learner(tmp_path)
    snaps = minifast.WeightSnapshots(every_epoch=True)
    with pytest.raises(DivergenceError, match='weights became non-finite'):
        learn.fit(3, 1e-2, callbacks=[Checkpoint(every=1, keep_last=None), snaps, PoisonWeights(7)])
    files = list_checkpoints(tmp_path / 'checkpoints')
    assert len(files) == 7  # steps 1..7; the write after step 8 (weights inf) was refused
    for f in files:
        sd = torch.load(f, weights_only=True)['model']
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()), f.name
    assert list(snaps.snapshots) == [0]
    # the epoch-end snapshot (epoch 1 would have held the inf weight) is not taken either
    torch.manual_seed(0)
    learn = make_learner(tmp_path / 'b')
    snaps = minifast.WeightSnapshots(every_epoch=True)
    with pytest.raises(DivergenceError):
        learn.fit(3, 1e-2, callbacks=[snaps, PoisonWeights(11)])  # the last step of epoch 1
    assert list(snaps.snapshots) == [0]
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


def test_check_can_be_switched_off():
    torch.manual_seed(0)
    learn = make_learner(check_finite=False)
    learn.fit(1, 1e-2, callbacks=[PoisonInput(2)])  # trains on regardless
    assert math.isnan(learn.recorder.raw_losses[2])
    assert not all(torch.isfinite(p).all() for p in learn.model.parameters())


@pytest.mark.parametrize('stop_div', [True, False])
def test_lr_find_stops_on_nan(stop_div):
    torch.manual_seed(0)
    learn = make_learner()
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}

    class Poison(PoisonInput):
        pass
    learn.callbacks = []
    orig_fit = learn.fit

    def fit_with_poison(*a, callbacks=None, **k):  # the sweep's fit, with a NaN at step 5
        return orig_fit(*a, callbacks=[*callbacks, Poison(5)], **k)
    learn.fit = fit_with_poison
    res = learn.lr_find(num_it=20, stop_div=stop_div)
    assert res.diverged and len(res.lrs) == 5
    for k, v in before.items():
        assert torch.equal(v, learn.model.state_dict()[k])


def test_guard_arguments_are_checked():
    with pytest.raises(ValueError, match='check_every must be a positive integer'):
        DivergenceGuard(check_every=0)


def test_lagged_restore_puts_back_optimizer_state_that_is_not_a_tensor():
    class CountingSGD(torch.optim.SGD):  # keeps a python int in its state, as LBFGS and others do
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g['params']:
                    if p.grad is not None:
                        st = self.state[p]
                        st['count'] = st.get('count', 0) + 1
            return super().step(closure)

    torch.manual_seed(0)
    learn = Learner(make_data(n_train=160), make_mlp(), silent=True, opt_func=partial(CountingSGD, momentum=0.9))
    learn.guard = DivergenceGuard(check_every=4)
    with pytest.raises(DivergenceError, match='verified finite after 3 steps'):
        learn.fit(1, 0.1, callbacks=[PoisonInput(6)])
    counts = [learn.opt.state[p]['count'] for p in learn.model.parameters()]
    assert counts == [3] * 4  # the state of the check after 3 steps, not dropped and not the later count
    assert all('momentum_buffer' in learn.opt.state[p] for p in learn.model.parameters())


def test_lagged_restore_after_a_load_during_the_fit(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(1, 1e-2)
    learn.save('m')
    learn.fit(1, 1e-2)
    learn.guard = DivergenceGuard(check_every=4)
    seen = {}

    class LoadThenNan(Callback):
        order = -20

        def before_batch(self, learn):
            if learn.training and learn.train_iter == 0:
                seen['opt'] = {id(p): {k: v.clone() for k, v in st.items()} for p, st in learn.opt.state.items()}
            if learn.training and learn.train_iter == 2:
                learn.load('m')  # new optimizer state tensors in the middle of the check interval

        def after_loss(self, learn):
            if learn.training and learn.train_iter == 3:
                learn.loss = learn.loss * float('nan')
    with pytest.raises(DivergenceError, match='verified finite after 0 steps'):
        learn.fit(1, 1e-2, callbacks=[LoadThenNan()])
    for p, st in learn.opt.state.items():
        assert all(torch.equal(v, seen['opt'][id(p)][k]) for k, v in st.items())
