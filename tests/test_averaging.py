"""Weight averaging: EMA against torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn, SWA against
AveragedModel + SWALR + update_bn in a hand-written loop, exact resume of both, EMA validation leaving the model
bit-identical, replace_at_end, no host sync in EMA's update, and the argument errors."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn

from minifast import EMA, SWA, Callback, CancelFitException, Learner
from minifast.callbacks.averaging import swa_alpha
from minifast.callbacks.tracking import Checkpoint
from minifast.determinism import set_seed
from minifast.optim import SGD
from conftest import make_data
from helpers import snapshot, same_state


def bn_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def learner(data=None, **kw):
    return Learner(make_data(n_train=96) if data is None else data, bn_model(), opt_func=SGD, wd=0., silent=True,
                   **kw)


def floats(sd):
    return {k: v for k, v in sd.items() if v.is_floating_point()}


def assert_close_states(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def hand_loop(model, data, epochs, lr, seed, after_step=None, after_epoch=None, before_epoch=None):
    """minifast's SGD (momentum 0.9, no decay) as a plain loop over the same data order."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    torch.manual_seed(seed)
    model.train()
    t = 0
    for e in range(epochs):
        if before_epoch is not None:
            before_epoch(e, opt)
        for xb, yb in data.train_dl:
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
            t += 1
            if after_step is not None:
                after_step(t)
        if after_epoch is not None:
            after_epoch(e)
    return model


# ---- EMA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('every,average_buffers', [(1, True), (3, True), (2, False)])
def test_ema_equals_torch_averaged_model_with_the_ema_multi_avg_fn(every, average_buffers):
    data, decay = make_data(n_train=96), 0.9
    learn = learner(data)
    ema = EMA(decay=decay, every=every, average_buffers=average_buffers)
    torch.manual_seed(1)
    learn.fit(3, 0.1, callbacks=[ema])
    model = bn_model()
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=average_buffers)
    hand_loop(model, data, 3, 0.1, 1, after_step=lambda t: ref.update_parameters(model) if t % every == 0 else None)
    assert_close_states(learn.model.state_dict(), model.state_dict())  # the same training
    assert ema.n_averaged == int(ref.n_averaged) == 18 // every
    got, want = ema.model.state_dict(), ref.module.state_dict()
    assert_close_states(got, want)
    assert not torch.allclose(got['0.weight'], model.state_dict()['0.weight'], atol=1e-3)  # an average, not a copy
    # integer buffers follow the model (torch's EMA fn rounds decay * n + (1 - decay) * m back into an int)
    assert torch.equal(got['1.num_batches_tracked'], learn.model.state_dict()['1.num_batches_tracked'])


def test_ema_update_reads_nothing_back_from_the_device(monkeypatch):
    """No .item(), float(), bool(), .cpu(), .tolist() or .numpy() on a tensor in the update: on a GPU each would
    wait for the device."""
    model = bn_model()
    ema = EMA(decay=0.5)
    ema._track(model)

    def refuse(*a, **k):
        raise AssertionError('host read in the EMA update')
    for name in ('item', '__float__', '__bool__', '__int__', '__index__', 'cpu', 'tolist', 'numpy'):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.)
        ema.update()
    monkeypatch.undo()
    assert ema.n_averaged == 3
    w = model[0].weight
    # copy at the first update (w - 2), then two lerps towards w - 1 and w with weight 0.5
    torch.testing.assert_close(ema.model[0].weight, w - 0.75)


class Probe(Callback):
    """Records the model's weights at the end of each epoch's training, and the valid losses."""
    order = 95

    def before_fit(self, learn):
        self.trained, self.valid = [], []

    def after_train(self, learn):
        self.trained.append(snapshot(learn.model))

    def after_validate(self, learn):
        self.valid.append(learn.recorder.val_losses[-1] if learn.recorder.val_losses else None)


def test_ema_validation_runs_on_the_average_and_leaves_the_model_bit_identical():
    runs = {}
    for validate in ('model', 'ema'):
        learn = learner()
        ema = EMA(decay=0.8, validate=validate)
        set_seed(2)
        learn.fit(2, 0.1, callbacks=[ema])
        runs[validate] = (learn, ema)
    (plain, _), (learn, ema) = runs['model'], runs['ema']
    assert same_state(learn.model, snapshot(plain.model))  # swapping in and out changed no bit of the training
    with ema.applied(learn):
        on_ema = learn.validate()[0]
    assert same_state(learn.model, snapshot(plain.model))  # applied() put the model back too
    assert learn.recorder.val_losses[-1] == pytest.approx(on_ema, abs=1e-6)
    assert abs(plain.recorder.val_losses[-1] - on_ema) > 1e-4  # the other run validated the model itself


class FailInValidation(Callback):
    def after_loss(self, learn):
        if not learn.training:
            raise RuntimeError('validation failed')


def test_an_error_during_an_ema_validation_leaves_the_model_as_trained():
    learn, probe = learner(), Probe()
    with pytest.raises(Exception, match='validation failed'):
        learn.fit(2, 0.1, callbacks=[EMA(decay=0.8, validate='ema'), probe, FailInValidation()])
    assert same_state(learn.model, probe.trained[-1])


def test_replace_at_end_puts_the_average_in_the_model_only_after_a_completed_fit():
    learn, ema = learner(), EMA(decay=0.8, replace_at_end=True)
    learn.fit(2, 0.1, callbacks=[ema])
    assert same_state(learn.model, snapshot(ema.model))
    plain, ema2 = learner(), EMA(decay=0.8)
    plain.fit(2, 0.1, callbacks=[ema2])
    assert not same_state(plain.model, snapshot(ema2.model))
    ema2.apply(plain)
    assert same_state(plain.model, snapshot(ema2.model))
    failed, probe = learner(), Probe()
    with pytest.raises(Exception, match='validation failed'):
        failed.fit(2, 0.1, callbacks=[EMA(decay=0.8, replace_at_end=True), probe, FailInValidation()])
    assert same_state(failed.model, probe.trained[-1])


class CrashAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def after_batch(self, learn):
        if learn.training and learn.train_iter + 1 == self.step:
            raise RuntimeError('simulated crash')


@pytest.mark.parametrize('make', [lambda: EMA(decay=0.7, every=2),
                                  lambda: SWA(0, swa_lr=np.float64(0.02), anneal_epochs=3)], ids=['EMA', 'SWA'])
@pytest.mark.parametrize('crash_at', [5, 8])
def test_a_resumed_fit_ends_with_the_same_average_as_an_uninterrupted_one(tmp_path, make, crash_at):
    """3 epochs of 3 steps, a checkpoint every 2 steps: crashed at step 5 it resumes from step 4 (mid-epoch 1, after
    SWA's first average, its lr half-way annealed), at step 8 from step 6 (the end of epoch 1's training, before its
    average). SWA's swa_lr is a numpy number: the checkpoints must still load weights-only."""
    def go(path, extra=(), resume=None):
        learn = learner(make_data(), path=path)
        avg = make()
        set_seed(3)
        learn.fit(3, 0.1, callbacks=[avg, Checkpoint(every=2), *extra], resume=resume)
        return learn, avg
    ref, ref_avg = go(tmp_path / 'ref')
    with pytest.raises(Exception, match='simulated crash'):
        go(tmp_path / 'run', extra=[CrashAtStep(crash_at)])
    learn, avg = go(tmp_path / 'run', resume='checkpoints')
    assert avg.n_averaged == ref_avg.n_averaged > 0
    assert list(avg.state_dict()['averaged']) == [k for k, _ in learn.model.named_parameters()] + \
        [k for k, _ in learn.model.named_buffers()]
    assert same_state(avg.model, snapshot(ref_avg.model))
    assert same_state(learn.model, snapshot(ref.model))
    assert learn.recorder.lrs == ref.recorder.lrs


def test_ema_argument_errors_name_the_value():
    for bad in (0, 1, 1.5, -0.1, float('nan'), '0.9'):
        with pytest.raises(ValueError, match=r'EMA: decay must be a number in \(0, 1\).*got'):
            EMA(decay=bad)
    with pytest.raises(ValueError, match='EMA: every must be an integer >= 1, got 0'):
        EMA(every=0)
    with pytest.raises(ValueError, match="EMA: validate must be 'model' or 'ema', got 'both'"):
        EMA(validate='both')
    with pytest.raises(ValueError, match='EMA.apply: there is no average yet'):
        EMA().apply(learner())


# ---- SWA ---------------------------------------------------------------------------------------------------------
def test_swa_equals_averaged_model_swalr_and_update_bn_in_a_hand_written_loop():
    data, start, epochs, lr = make_data(n_train=96), 2, 5, 0.1
    learn = learner(data)
    swa = SWA(start, swa_lr=0.03, anneal_epochs=2)
    torch.manual_seed(4)
    learn.fit(epochs, lr, callbacks=[swa])
    model = bn_model()
    ref, sched = AveragedModel(model), {}

    def before_epoch(e, opt):
        if e == start:
            sched['swa'] = SWALR(opt, swa_lr=0.03, anneal_epochs=2, anneal_strategy='cos')

    def after_epoch(e):
        if e >= start:
            ref.update_parameters(model)
            sched['swa'].step()
    hand_loop(model, data, epochs, lr, 4, after_epoch=after_epoch, before_epoch=before_epoch)
    update_bn(data.train_dl, ref)
    assert swa.n_averaged == int(ref.n_averaged) == 3
    assert_close_states(learn.model.state_dict(), ref.module.state_dict())
    # the recompute changed the statistics (Lightning #14866 left the last epoch's)
    assert not torch.allclose(learn.model[1].running_mean, model[1].running_mean, atol=1e-3)


@pytest.mark.parametrize('anneal_epochs,strategy', [(3, 'cos'), (2, 'linear'), (0, 'cos'), (10, 'cos')])
def test_swa_lr_follows_torch_swalr(anneal_epochs, strategy):
    data, start, epochs, lr, swa_lr = make_data(), 1, 6, 0.2, 0.01
    learn = learner(data)
    learn.fit(epochs, lr, callbacks=[SWA(start, swa_lr=swa_lr, anneal_epochs=anneal_epochs,
                                         anneal_strategy=strategy)])
    per_epoch = len(data.train_dl)
    got = learn.recorder.lrs[::per_epoch]
    assert all(learn.recorder.lrs[i] == got[i // per_epoch] for i in range(len(learn.recorder.lrs)))  # per epoch
    opt, want = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr), []
    for e in range(epochs):
        if e == start:
            sched = SWALR(opt, swa_lr=swa_lr, anneal_epochs=anneal_epochs, anneal_strategy=strategy)
        want.append(opt.param_groups[0]['lr'])
        opt.step()  # (no gradient: nothing moves; torch warns about a scheduler stepped before its optimizer)
        if e >= start:
            sched.step()
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert [swa_alpha(k, 2, 'linear') for k in range(4)] == [0, 0.5, 1, 1]


def test_swa_without_swa_lr_keeps_the_fits_schedule_and_per_layer_group_lrs():
    learn = learner()
    learn.fit(3, 0.1, callbacks=[SWA(1)])
    assert set(learn.recorder.lrs) == {0.1}
    learn = learner(layer_groups=None)
    learn.split(lambda m: [m[:2], m[2:]])
    learn.fit(3, [0.1, 0.2], callbacks=[SWA(1, swa_lr=[0.01, 0.02], anneal_epochs=0)])
    assert learn.recorder.group_lrs[0] == [0.1, 0.2] and learn.recorder.group_lrs[-1] == [0.01, 0.02]


def test_swa_start_epoch_beyond_the_fit_is_refused_before_training():
    learn = learner()
    before = snapshot(learn.model)
    with pytest.raises(Exception, match=r'SWA: start_epoch=3 is beyond this 3-epoch fit \(its epochs are 0 to 2\)'):
        learn.fit(3, 0.1, callbacks=[SWA(3, swa_lr=0.01)])
    assert same_state(learn.model, before)
    with pytest.raises(ValueError, match='SWA: start_epoch must be an integer >= 0, got -1'):
        SWA(-1)
    with pytest.raises(ValueError, match='SWA: swa_lr must be > 0, got 0'):
        SWA(1, swa_lr=0)
    with pytest.raises(ValueError, match="SWA: anneal_strategy must be 'cos' or 'linear', got 'exp'"):
        SWA(1, swa_lr=0.1, anneal_strategy='exp')


class StopAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def after_epoch(self, learn):
        if learn.epoch == self.epoch:
            raise CancelFitException()


def test_swa_on_a_fit_stopped_before_start_epoch_warns_and_keeps_the_weights():
    learn, probe = learner(), Probe()
    with pytest.warns(UserWarning, match='SWA: the fit stopped at epoch 0, before start_epoch=2; nothing was'):
        learn.fit(4, 0.1, callbacks=[SWA(2, swa_lr=0.01), StopAt(0), probe])
    assert same_state(learn.model, probe.trained[-1])
    assert not math.isnan(learn.recorder.val_losses[-1])


def test_resuming_with_other_swa_settings_is_refused(tmp_path):
    def go(swa, extra=(), resume=None):
        learn = learner(make_data(), path=tmp_path)
        learn.fit(3, 0.1, callbacks=[swa, Checkpoint(every=2), *extra], resume=resume)
    with pytest.raises(Exception, match='simulated crash'):
        go(SWA(0, swa_lr=0.02), extra=[CrashAtStep(5)])
    with pytest.raises(ValueError, match="does not continue this fit: its schedule differs from this call's"):
        go(SWA(1, swa_lr=0.02), resume='checkpoints')


def test_the_ema_benchmark_runs(capsys):
    """benchmarks/ema.py's smoke mode, so the script cannot rot."""
    path = Path(__file__).resolve().parents[1] / 'benchmarks' / 'ema.py'
    spec = importlib.util.spec_from_file_location('bench_ema', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(['--rounds', '1', '--steps', '2', '--bs', '4'])
    assert out['best_ratio'] > 0 and 0 < out['update_fraction'] < 1
    assert 'RESULT EMA/plain step time' in capsys.readouterr().out
