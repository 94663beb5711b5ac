"""Divergence: a non-finite loss stops fit naming epoch and step; the learner, checkpoints and snapshots keep the last
finite weights; lr_find stops on NaN; the check can be switched off."""
from functools import partial
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import minifast
from minifast import Callback, CancelFitException, DivergenceError, Learner
from minifast.callbacks.tracking import Checkpoint, DivergenceGuard
from minifast.lock import LOCK_FILE, FolderLockedError, folder_lock, holds
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


# ------------------------------------------------------------------------------------------------ Checkpoint: lock
CHILD_FIT = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    import torch
    from torch import nn
    from minifast import Callback, DataBunch, Learner
    from minifast.callbacks.tracking import Checkpoint
    folder, go = Path(sys.argv[1]), Path(sys.argv[2])

    class Wait(Callback):  # after epoch 0's checkpoint: say so, then wait for the parent's go
        def before_epoch(self, learn):
            if learn.epoch == 1:
                print('fitting', flush=True)
                while not go.exists():
                    time.sleep(0.01)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)
    data = DataBunch.from_tensors(x[:24], y[:24], x[24:], y[24:], bs=8)
    learn = Learner(data, nn.Linear(4, 2), silent=True, path=folder.parent)
    learn.fit(2, 1e-2, callbacks=[Checkpoint(path=folder, keep_last=1), Wait()])
    print('done', flush=True)
''')


def _lock_env():
    root = str(Path(minifast.__file__).parents[1])
    return {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')]))}


def _tiny_learner(path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)
    data = minifast.DataBunch.from_tensors(x[:24], y[:24], x[24:], y[24:], bs=8)
    return Learner(data, torch.nn.Linear(4, 2), silent=True, path=path)


def test_two_processes_one_checkpoint_folder_the_second_is_refused_before_anything(tmp_path):
    """Two trainers on one checkpoint folder used to prune each other's files (keep_last counts every ckpt_*), and
    a resumed one was handed the other's run. The second fit now stops at before_fit, at once, naming the folder and
    the holder's PID; it trains, writes and prunes nothing, and its learner is as before (also with resume=, which
    had already put the other run's weights in). Once the holder has finished, the folder is free."""
    folder, go = tmp_path / 'ck', tmp_path / 'go'
    child = subprocess.Popen([sys.executable, '-c', CHILD_FIT, str(folder), str(go)], stdout=subprocess.PIPE,
                             text=True, env=_lock_env())
    try:
        assert child.stdout.readline().strip() == 'fitting'
        (theirs,) = list_checkpoints(folder)
        their_bytes = theirs.read_bytes()
        learn = _tiny_learner(tmp_path)
        learn.fit(1, 1e-2)  # the first fit of a process takes seconds to set up, which the timing must not count
        before = {k: v.clone() for k, v in learn.model.state_dict().items()}
        for resume in (None, folder):
            t0 = time.perf_counter()
            with pytest.raises((minifast.CallbackException, FolderLockedError)) as e:
                learn.fit(2, 1e-2, callbacks=[Checkpoint(path=folder, keep_last=1)], resume=resume)
            assert time.perf_counter() - t0 < 5  # at once (the holder waits for `go`: a waiting fit would hang)
            # resume= is refused while it reads the folder (before its newest file is judged), a fresh fit by the
            # Checkpoint at before_fit
            assert isinstance(e.value, FolderLockedError) == (resume is not None)
            assert isinstance(e.value if resume is not None else e.value.__cause__, FolderLockedError)
            assert str(folder) in str(e.value) and f'PID {child.pid}' in str(e.value)
            assert learn.train_iter == 0 and all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())
            assert list_checkpoints(folder) == [theirs] and theirs.read_bytes() == their_bytes
        go.touch()
        assert child.stdout.readline().strip() == 'done' and child.wait(30) == 0
    finally:
        go.touch()
        child.kill()
        child.wait()
    assert not (folder / LOCK_FILE).exists()
    learn.fit(1, 1e-2, callbacks=[Checkpoint(path=tmp_path / 'mine')])  # the learner works
    learn.fit(2, 1e-2, callbacks=[Checkpoint(path=folder, keep_last=1)])  # and the folder is free
    assert len(list_checkpoints(folder)) == 1


def test_checkpoint_holds_its_folder_during_fit_only(tmp_path):
    seen = []

    class Look(Callback):
        def after_epoch(self, learn):
            seen.append(holds(tmp_path / 'ck'))
    learn = _tiny_learner(tmp_path)
    learn.fit(2, 1e-2, callbacks=[Checkpoint(path='ck'), Look()])
    assert seen == [1, 1] and holds(tmp_path / 'ck') == 0 and not (tmp_path / 'ck' / LOCK_FILE).exists()


@pytest.mark.parametrize('exc', [ValueError, KeyboardInterrupt])
def test_checkpoint_releases_its_folder_when_the_fit_fails_or_is_interrupted(tmp_path, exc):
    class Fail(Callback):
        def after_batch(self, learn):
            if learn.train_iter == 2:
                raise exc('stop')
    learn = _tiny_learner(tmp_path)
    with pytest.raises((exc, minifast.CallbackException)):
        learn.fit(2, 1e-2, callbacks=[Checkpoint(path='ck', every=1), Fail()])
    assert holds(tmp_path / 'ck') == 0 and not (tmp_path / 'ck' / LOCK_FILE).exists()
    learn.fit(1, 1e-2, callbacks=[Checkpoint(path='ck')])  # the same process takes it again


def test_checkpoint_fit_inside_a_held_folder_and_a_fit_inside_a_fit(tmp_path):
    """Re-entrant: a process that holds the folder (minifast smith, a fit running a fit) fits into it again."""
    folder = tmp_path / 'ck'
    inner = []

    class FitInside(Callback):  # another learner's fit into the same folder from inside this fit
        def after_fit(self, learn):
            if not inner:
                other = _tiny_learner(tmp_path)
                other.fit(1, 1e-2, callbacks=[Checkpoint(path=folder, name='inner')])
                inner.append(holds(folder))
    with folder_lock(folder):
        learn = _tiny_learner(tmp_path)
        learn.fit(1, 1e-2, callbacks=[Checkpoint(path=folder), FitInside()])
        assert inner == [2] and holds(folder) == 1  # the outer fit's lock still stood while the inner one ran
        learn.fit(1, 1e-2, callbacks=[Checkpoint(path=folder)], resume=None)  # a second fit
    assert holds(folder) == 0 and not (folder / LOCK_FILE).exists()
    assert {p.name.split('_')[0] for p in list_checkpoints(folder)} == {'ckpt', 'inner'}
