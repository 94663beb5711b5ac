"""EarlyStopping, ReduceLROnPlateau and SaveModelCallback: decisions against hand-computed sequences and torch's
ReduceLROnPlateau, the Recorder/CSVLogger history of a stopped fit, the fit_* policies, and resume after a crash."""
from functools import partial

import pytest
import torch
from torch import nn

import minifast
from minifast import Callback, CSVLogger, EarlyStopping, Learner, ReduceLROnPlateau, SaveModelCallback, TrainingPhase
from minifast.callbacks.tracking import Checkpoint
from minifast.determinism import set_seed

from conftest import make_data, make_mlp
from resume_run import assert_identical, make_learner, outcome

NAN, INF = float('nan'), float('inf')


class Script(Callback):
    """A metric whose value in epoch e is values[e] (exactly representable numbers stay exact through the weighted
    mean over validation batches); also a callback, to know the epoch."""

    def __init__(self, values, name='score'):
        self.values, self.__name__, self.epoch = list(values), name, 0

    def before_validate(self, learn):
        self.epoch = learn.epoch

    def __call__(self, pred, target):
        return torch.tensor(self.values[self.epoch])


def learner(tmp_path, values=None, name='score', model=None, **kw):
    """3 training steps an epoch; the metric `name` follows `values`."""
    script = Script(values or [0.] * 100, name)
    return Learner(make_data(), model or make_mlp(), path=tmp_path, silent=True, metrics=[script], callbacks=[script],
                   **kw)


def steps_per_epoch(learn, what):
    """`what` (a per-step list of the Recorder) cut into epochs."""
    out, i = [], 0
    for n in learn.recorder.nb_batches:
        out.append(what[i:i + n])
        i += n
    return out


# ---- EarlyStopping ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('values, kw, last', [
    ([5., 4., 4.5, 4.25, 3., 6.], dict(patience=1), 3),          # waits 1, 2 > 1 at epoch 3
    ([5., 4., 4.5, 3., 3.5, 3.5], dict(patience=1), 5),          # epoch 3 improves: waits again from 0
    ([5., 4.5, 4., 3.], dict(min_delta=0.5), 1),                  # 4.5 is not below 5 - 0.5: strict
    ([5., 4.25, 3.5, 3.], dict(min_delta=0.5), 3),                # 0.75 better each time, then 0.5: stops at 3
    ([1., NAN, 0.5, NAN, NAN], dict(patience=1), 4),              # NaN never improves
    ([NAN, 2., 1.], dict(), 0),                                   # not even the first one
    ([INF, 2., 1.], dict(), 0),                                   # nor inf (torch's best starts at inf)
    ([5., -INF, 4., 6., 6.], dict(patience=1), 4),                # -inf is no improvement either: 4. still is
])
def test_early_stopping_stops_where_hand_computed(tmp_path, values, kw, last):
    learn = learner(tmp_path, values, name='my_loss', callback_fns=[CSVLogger])  # 'loss' in the name: min
    es = EarlyStopping(monitor='my_loss', **kw)
    learn.fit(10, 1e-2, callbacks=[es])
    r, n = learn.recorder, last + 1
    assert es.stopped_epoch == learn.epoch == last
    assert learn.n_epoch == 10
    assert len(r.val_losses) == len(r.train_losses) == len(r.metrics) == len(r.nb_batches) == len(r.times) == n
    assert len(r.lrs) == len(r.raw_losses) == 3 * n
    assert [m[0] for m in r.metrics] == pytest.approx(values[:n], nan_ok=True)
    rows = (tmp_path / 'history.csv').read_text().splitlines()
    assert len(rows) == 1 + n and rows[-1].startswith(f'{last},')


def test_early_stopping_that_never_triggers_trains_every_epoch_and_max_mode(tmp_path):
    learn = learner(tmp_path, [0.5, 0.75, 0.75, 0.875], name='acc')  # auto: max for a name without loss/error
    es = EarlyStopping(monitor='acc')
    learn.fit(4, 1e-2, callbacks=[es])
    assert es.mode == 'max' and es.stopped_epoch == 2 and len(learn.recorder.val_losses) == 3
    learn = learner(tmp_path, [0.5, 0.75, 0.75, 0.875], name='acc')
    es = EarlyStopping(monitor='acc', patience=1)
    learn.fit(4, 1e-2, callbacks=[es])
    assert es.stopped_epoch is None and es.best == 0.875 and len(learn.recorder.val_losses) == 4


def test_unknown_monitor_fails_before_training_listing_the_names(tmp_path):
    for cls in (EarlyStopping, ReduceLROnPlateau, SaveModelCallback):
        learn = learner(tmp_path)
        before = [p.detach().clone() for p in learn.model.parameters()]
        with pytest.raises(minifast.CallbackException,
                           match=rf"{cls.__name__}.before_fit .*monitor 'acc' is not recorded; the names are "
                                 r"'train_loss', 'valid_loss', 'score'"):
            learn.fit(2, 1e-2, callbacks=[cls(monitor='acc')])
        assert learn.recorder.lrs == []
        assert all(torch.equal(p, q) for p, q in zip(learn.model.parameters(), before))


def test_bad_arguments_name_the_thing():
    with pytest.raises(ValueError, match=r"EarlyStopping: patience must be an integer >= 0 .* got -1"):
        EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match=r"EarlyStopping: min_delta must be a number in \[0, inf\], got -0.1"):
        EarlyStopping(min_delta=-0.1)
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau: factor must be a number in \(0, 1\), got 1"):
        ReduceLROnPlateau(factor=1)
    with pytest.raises(ValueError, match="mode must be 'auto', 'min' or 'max', got 'up'"):
        ReduceLROnPlateau(mode='up')
    with pytest.raises(ValueError, match="SaveModelCallback: every must be 'improvement' or 'epoch', got 3"):
        SaveModelCallback(every=3)


def test_early_stopping_in_callback_fns_with_fit_one_cycle_keeps_the_schedule(tmp_path):
    ref = learner(tmp_path)
    ref.fit_one_cycle(6, 1e-2)
    learn = learner(tmp_path, [3., 2., 2., 2., 1., 1.], callback_fns=[partial(EarlyStopping, monitor='score',
                                                                                 mode='min', patience=1)])
    learn.fit_one_cycle(6, 1e-2)
    assert len(learn.recorder.val_losses) == 4 and learn.n_epoch == 6
    assert learn.recorder.lrs == ref.recorder.lrs[:12]  # the cycle laid over 6 epochs, cut after 4


def test_early_stopping_on_valid_loss_default(tmp_path):
    learn = learner(tmp_path)
    set_seed(0)
    es = EarlyStopping()
    learn.fit(40, 3.)  # far too high: the valid loss soon stops improving
    ref = learn.recorder.val_losses
    learn = learner(tmp_path)
    set_seed(0)
    learn.fit(40, 3., callbacks=[es])
    vals = learn.recorder.val_losses
    first_bad = next(i for i in range(1, len(ref)) if not ref[i] < min(ref[:i]))
    assert es.stopped_epoch == first_bad and vals == ref[:first_bad + 1]


# ---- ReduceLROnPlateau -----------------------------------------------------------------------------------------
def torch_plateau_lrs(lrs0, values, mode, factor, patience, min_delta, min_lrs):
    """The lr of each group in each epoch when torch's ReduceLROnPlateau is stepped with `values` after each."""
    opt = torch.optim.SGD([{'params': [nn.Parameter(torch.zeros(1))], 'lr': lr} for lr in lrs0], lr=1.)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=factor, patience=patience,
                                                       threshold=min_delta, threshold_mode='abs', cooldown=0,
                                                       min_lr=min_lrs, eps=1e-8)
    out = []
    for v in values:
        out.append([g['lr'] for g in opt.param_groups])
        sched.step(v)
    return out


@pytest.mark.parametrize('values, mode, kw', [
    ([5., 4., 4., 4., 3., 3., 3., 3., 2., NAN, NAN, NAN], 'min', dict(patience=0, factor=0.2, min_lr=1e-4)),
    ([5., 4., 3.75, 3.5, 3.5, 2., 2., 2., 1., 1., 1., 1.], 'min', dict(patience=1, factor=0.5, min_lr=3e-4,
                                                                       min_delta=0.3)),
    ([.1, .2, .2, .25, .25, .25, .3, .3, .3, .3, .3, .3], 'max', dict(patience=0, factor=0.1, min_lr=[1e-6, 2e-4])),
    ([INF, 5., 5., 4.], 'min', dict(patience=0, factor=0.5, min_lr=0.)),  # a first inf is a bad epoch
    ([-INF, 1., 1., 2.], 'max', dict(patience=0, factor=0.5, min_lr=0.)),
])
def test_reduce_lr_on_plateau_matches_torch(tmp_path, values, mode, kw):
    model = make_mlp()
    learn = learner(tmp_path, values, model=model, layer_groups=[model[0], model[2]])
    cb = ReduceLROnPlateau(monitor='score', mode=mode, **kw)
    learn.fit(len(values), slice(1e-3, 1e-2), callbacks=[cb])
    got = steps_per_epoch(learn, learn.recorder.group_lrs)
    lrs0 = got[0][0]
    assert lrs0 == pytest.approx([1e-3, 1e-2])
    want = torch_plateau_lrs(lrs0, [m[0] for m in learn.recorder.metrics], mode, kw['factor'], kw['patience'],
                             kw.get('min_delta', 0.), kw['min_lr'])
    for e, (steps, w) in enumerate(zip(got, want)):
        assert all(s == w for s in steps), (e, steps, w)
    assert len({tuple(w) for w in want}) >= 3  # the sequence does drop, more than once
    assert cb.reductions == [(e, want[e + 1]) for e in range(len(want) - 1) if want[e + 1] != want[e]]


def test_reduce_lr_keeps_discriminative_ratios_and_plot_lr_shows_the_drop(tmp_path):
    learn = learner(tmp_path, [2., 2., 2., 1.], name='my_loss')
    learn.split(lambda m: [m[0], m[2]])
    learn.fit(4, [1e-2, 4e-2], callbacks=[ReduceLROnPlateau(monitor='my_loss', min_lr=0.)])
    per_epoch = [e[0] for e in steps_per_epoch(learn, learn.recorder.group_lrs)]
    assert per_epoch[0] == [1e-2, 4e-2]
    assert per_epoch[2] == pytest.approx([2e-3, 8e-3]) and per_epoch[3] == pytest.approx([4e-4, 1.6e-3])
    assert all(b / a == pytest.approx(4.) for a, b in per_epoch)
    line = learn.recorder.plot_lr().axes[0].lines[0]
    assert list(line.get_ydata()) == learn.recorder.lrs and line.get_ydata()[5] > line.get_ydata()[6]


def test_reduce_lr_with_fit_one_cycle_scales_the_schedule(tmp_path):
    ref = learner(tmp_path)
    ref.fit_one_cycle(5, 1e-2)
    learn = learner(tmp_path, [3., 3., 2., 2., 2.], name='my_loss')
    cb = ReduceLROnPlateau(monitor='my_loss', factor=0.5, min_lr=0.)
    learn.fit_one_cycle(5, 1e-2, callbacks=[cb])
    scale = [1., 1., 0.5, 0.5, 0.25]  # drops after epochs 1 and 3
    want = [lr * scale[t // 3] for t, lr in enumerate(ref.recorder.lrs)]
    assert learn.recorder.lrs == pytest.approx(want, rel=1e-12)
    assert cb.scales == pytest.approx([0.25])


def test_reduce_lr_with_a_flat_schedule_equals_plain_fit_and_min_lr_bounds(tmp_path):
    values = [3., 3., 3., 3., 3.]
    plain = learner(tmp_path, values, name='my_loss')
    plain.fit(5, 1e-2, callbacks=[ReduceLROnPlateau(monitor='my_loss', factor=0.1, min_lr=5e-5)])
    flat = learner(tmp_path, values, name='my_loss')
    flat.fit_fc(5, 1e-2, pct_start=1., callbacks=[ReduceLROnPlateau(monitor='my_loss', factor=0.1, min_lr=5e-5)])
    assert flat.recorder.lrs == pytest.approx(plain.recorder.lrs, rel=1e-12)
    assert [e[0] for e in steps_per_epoch(plain, plain.recorder.lrs)] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-4, 5e-5])


def test_reduce_lr_with_phases_that_do_not_all_set_the_lr(tmp_path):
    # phase 1 (3 epochs) names no lr: fit's lr holds and the drops change it in place, once each; phase 2 sets the lr
    # every step and the drops so far scale it
    phases = [TrainingPhase(epochs=3, mom=0.9), TrainingPhase(epochs=1, lr=(1e-2, 1e-3))]
    ref = learner(tmp_path)
    ref.fit_phases(phases, lr=1e-2)
    learn = learner(tmp_path, [3., 3., 3., 3.], name='my_loss')
    cb = ReduceLROnPlateau(monitor='my_loss', factor=0.5, min_lr=0.)
    learn.fit_phases(phases, lr=1e-2, callbacks=[cb])
    got = steps_per_epoch(learn, learn.recorder.lrs)
    assert got[:3] == [[1e-2] * 3, [1e-2] * 3, [5e-3] * 3]
    want = [lr * 0.25 for lr in steps_per_epoch(ref, ref.recorder.lrs)[3]]
    assert got[3] == pytest.approx(want, rel=1e-12) and want[0] == pytest.approx(2.5e-3)
    assert [(e, lrs) for e, lrs in cb.reductions[:2]] == [(1, [5e-3]), (2, [2.5e-3])]
    assert cb.reductions[2][0] == 3 and cb.reductions[2][1] == pytest.approx([want[-1] * 0.5])


def test_reduce_lr_with_phases_resumed_in_a_phase_without_lr(tmp_path):
    phases = [TrainingPhase(epochs=3, mom=0.9), TrainingPhase(epochs=1, lr=(1e-2, 1e-3))]

    def run(path, extra=(), resume=None):
        learn = learner(path, [3., 3., 3., 3.], name='my_loss')
        set_seed(0)
        learn.fit_phases(phases, lr=1e-2, callbacks=[Checkpoint(every='epoch'), *extra,
                                                     ReduceLROnPlateau(monitor='my_loss', factor=0.5, min_lr=0.)],
                         resume=resume)
        return learn
    ref = run(tmp_path / 'ref')
    with pytest.raises(Exception, match='simulated crash'):
        run(tmp_path / 'b', [CrashAt(epoch=2)])
    b = run(tmp_path / 'b', resume='checkpoints')
    assert b.recorder.lrs == ref.recorder.lrs and steps_per_epoch(b, b.recorder.lrs)[2] == [5e-3] * 3


@pytest.mark.parametrize('method', ['fit', 'fit_one_cycle'])
def test_reduce_lr_leaves_a_fixed_group_lr_alone(tmp_path, method):
    def run(cbs):
        model = make_mlp()
        learn = learner(tmp_path, [1., 1., 1., 1.], model=model)  # 'score': max, never improves after epoch 0
        learn.split({'0': dict(lr=0.05), '2': {}})
        getattr(learn, method)(4, 1e-2, callbacks=cbs)
        return learn
    ref = run([])
    cb = ReduceLROnPlateau(monitor='score', factor=0.5, min_lr=0.)
    learn = run([cb])
    fixed = [g.get('layer_group') == 0 for g in learn.opt.param_groups]
    assert any(fixed) and not all(fixed)
    scale = [1., 1., 0.5, 0.25]  # drops after epochs 1 and 2 (and 3, after the last step, unless below eps)
    for t, (lrs, ref_lrs) in enumerate(zip(learn.recorder.group_lrs, ref.recorder.group_lrs)):
        for lr, ref_lr, f in zip(lrs, ref_lrs, fixed):
            assert lr == 0.05 if f else lr == pytest.approx(ref_lr * scale[t // 3], rel=1e-12), (t, lrs)
    assert [e for e, _ in cb.reductions] == [1, 2] + ([3] if method == 'fit' else []) and all(
        lr == 0.05 for _, lrs in cb.reductions for lr, f in zip(lrs, fixed) if f)
    assert [g['lr'] for g, f in zip(learn.opt.param_groups, fixed) if f] == [0.05] * sum(fixed)
    assert [s for s, f in zip(cb.scales, fixed) if f] == [1.] * sum(fixed)


# ---- SaveModelCallback -----------------------------------------------------------------------------------------
class Keep(Callback):
    """The weights after each epoch."""
    def before_fit(self, learn):
        self.weights = {}

    def after_epoch(self, learn):
        self.weights[learn.epoch] = {k: v.clone() for k, v in learn.model.state_dict().items()}


def counting_saves(learn):
    saves, save = [], learn.save

    def counted(name, **kw):
        saves.append((learn.epoch, name))
        return save(name, **kw)
    learn.save = counted
    return saves


def test_save_model_writes_on_improvement_only_never_nan_and_loads_the_best(tmp_path):
    values = [3., 2., NAN, 2.5, 1., 1., NAN]
    learn = learner(tmp_path, values, name='my_loss')
    saves, keep = counting_saves(learn), Keep()
    cb = SaveModelCallback(monitor='my_loss')
    set_seed(0)
    learn.fit(len(values), 1e-2, callbacks=[cb, keep])
    assert saves == [(0, 'bestmodel'), (1, 'bestmodel'), (4, 'bestmodel')]
    assert cb.best == 1. and cb.best_epoch == 4
    file = tmp_path / 'models' / 'bestmodel.pth'
    assert_identical(torch.load(file, weights_only=True)['model'], keep.weights[4])
    assert_identical(learn.model.state_dict(), keep.weights[4])  # loaded at the end
    assert not all(torch.equal(a, b) for a, b in zip(keep.weights[6].values(), keep.weights[4].values()))
    # a run that stops after the best epoch ends with the same weights
    stop = learner(tmp_path / 'b')
    set_seed(0)
    stop.fit(5, 1e-2)
    assert_identical(stop.model.state_dict(), learn.model.state_dict())


def test_save_model_without_load_at_end_keeps_the_last_weights_and_all_nan_saves_nothing(tmp_path):
    learn = learner(tmp_path, [3., 2., 4.], name='my_loss')
    keep = Keep()
    learn.fit(3, 1e-2, callbacks=[SaveModelCallback(monitor='my_loss', load_at_end=False), keep])
    assert_identical(learn.model.state_dict(), keep.weights[2])
    for sub, values in (('n', [NAN, NAN]), ('i', [INF, INF])):  # an inf loss is no better than a NaN
        learn = learner(tmp_path / sub, values, name='my_loss')
        keep = Keep()
        learn.fit(2, 1e-2, callbacks=[SaveModelCallback(monitor='my_loss'), keep])
        assert not (tmp_path / sub / 'models').exists()
        assert_identical(learn.model.state_dict(), keep.weights[1])
    learn = learner(tmp_path / 'f', [INF, 3., 4.], name='my_loss')
    saves = counting_saves(learn)
    cb = SaveModelCallback(monitor='my_loss')
    learn.fit(3, 1e-2, callbacks=[cb])
    assert saves == [(1, 'bestmodel')] and cb.state_dict() == {'best': 3., 'best_epoch': 1}


def test_save_model_every_epoch(tmp_path):
    learn = learner(tmp_path)
    keep = Keep()
    learn.fit(3, 1e-2, callbacks=[SaveModelCallback(every='epoch', name='m'), keep])
    assert sorted(p.name for p in (tmp_path / 'models').iterdir()) == ['m_0.pth', 'm_1.pth', 'm_2.pth']
    for e in range(3):
        assert_identical(torch.load(tmp_path / 'models' / f'm_{e}.pth', weights_only=True)['model'],
                         keep.weights[e])
    assert_identical(learn.model.state_dict(), keep.weights[2])


def test_all_three_with_fit_one_cycle_in_callback_fns(tmp_path):
    values = [5., 4., 3., 3.5, 3.25, 3.1, 3.2, 1.]
    learn = learner(tmp_path, values, name='my_loss', callback_fns=[
        partial(EarlyStopping, monitor='my_loss', patience=2), partial(SaveModelCallback, monitor='my_loss'),
        partial(ReduceLROnPlateau, monitor='my_loss', patience=1, min_lr=0.)])
    keep = Keep()
    learn.fit_one_cycle(8, 1e-2, callbacks=[keep])
    assert len(learn.recorder.val_losses) == 6  # epochs 3, 4, 5 do not improve on 3.
    es, sm, rl = learn.callbacks[1:]  # after the Script
    assert es.stopped_epoch == 5 and sm.best_epoch == 2 and rl.reductions and rl.reductions[0][0] == 4
    assert_identical(learn.model.state_dict(), keep.weights[2])


# ---- resume ----------------------------------------------------------------------------------------------------
class CrashAt(Callback):
    """Raises at the start of epoch `epoch` (the previous epoch's checkpoint is the newest), or after step `step`."""
    def __init__(self, epoch=None, step=None):
        self.epoch, self.step = epoch, step

    def before_epoch(self, learn):
        if learn.epoch == self.epoch:
            raise RuntimeError('simulated crash')

    def after_step(self, learn):
        if learn.train_iter == self.step:
            raise RuntimeError('simulated crash')


# early stopping (patience 1) after epoch 5; the best at epoch 3; lr halved after epochs 2, 4 and 5
VALUES = [5., 4., 4., 3., 3.5, 3.5, 2., 2., 2., 2.]


def resume_run(path, method, every='epoch', extra=(), resume=None):
    learn = make_learner(path)  # dropout, shuffling and noisy inputs: any slip in the restored state shows
    script = Script(VALUES, 'my_loss')
    learn.metrics = [script]
    cbs = [EarlyStopping(monitor='my_loss', patience=1), SaveModelCallback(monitor='my_loss'),
           ReduceLROnPlateau(monitor='my_loss', factor=0.5, min_lr=0.)]
    set_seed(1)
    args = {'fit': (8, 1e-2), 'fit_one_cycle': (8, 1e-2), 'fit_sgdr': (3, 1, 1e-2)}[method]  # sgdr: 1+2+4 epochs
    getattr(learn, method)(*args, callbacks=[script, Checkpoint(every=every), *cbs, *extra], resume=resume)
    return learn, cbs


def decisions(cbs):
    es, sm, rl = cbs
    return {'es': es.state_dict(), 'sm': sm.state_dict(), 'rl': rl.state_dict()}


@pytest.mark.parametrize('method, every, crash', [
    ('fit', 'epoch', CrashAt(epoch=5)), ('fit_one_cycle', 4, CrashAt(step=27)), ('fit_sgdr', 'epoch', CrashAt(epoch=5)),
    ('fit', 5, CrashAt(step=33))])
def test_resumed_fit_makes_the_same_decisions(tmp_path, method, every, crash):
    ref, ref_cbs = resume_run(tmp_path / 'ref', method, every)
    assert len(ref.recorder.val_losses) == 6 and ref_cbs[0].stopped_epoch == 5 and ref_cbs[1].best_epoch == 3
    assert [e for e, _ in ref_cbs[2].reductions] == [2, 4, 5]
    with pytest.raises(Exception, match='simulated crash'):
        resume_run(tmp_path / 'b', method, every, extra=[crash])
    b, b_cbs = resume_run(tmp_path / 'b', method, every, resume='checkpoints')
    assert_identical(outcome(ref), outcome(b))  # weights (the best, loaded at the end), optimizer, lrs, history
    assert_identical(decisions(ref_cbs), decisions(b_cbs))


def test_resume_from_the_checkpoint_of_the_stopping_epoch_trains_nothing_more(tmp_path):
    class FailAtEnd(Callback):
        order = 80  # after_fit: before Checkpoint (90) writes the finished state

        def after_fit(self, learn):
            raise RuntimeError('simulated crash')
    ref, _ = resume_run(tmp_path / 'ref', 'fit')
    with pytest.raises(Exception, match='simulated crash'):
        resume_run(tmp_path / 'b', 'fit', extra=[FailAtEnd()])
    b, cbs = resume_run(tmp_path / 'b', 'fit', resume='checkpoints')
    assert cbs[0].stopped_epoch == 5 and len(b.recorder.val_losses) == 6
    assert_identical(outcome(ref), outcome(b))


def test_fastai_v1_names_in_callback_fns():
    from minifast import EarlyStoppingCallback, ReduceLROnPlateauCallback
    learn = Learner(make_data(n_train=64), make_mlp(), silent=True,
                    callback_fns=[partial(EarlyStoppingCallback, monitor='valid_loss', min_delta=10., patience=0),
                                  partial(ReduceLROnPlateauCallback, monitor='valid_loss', patience=0, min_delta=10.)])
    learn.fit(5, 1e-2)
    assert len(learn.recorder.val_losses) == 2  # epoch 1 cannot beat epoch 0 by 10: stopped after it
    es, rp = learn.callbacks
    assert isinstance(es, minifast.EarlyStopping) and es.stopped_epoch == 1 and rp.reductions
