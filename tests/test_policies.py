"""The fit_* policies: fit_one_cycle and the others against torch's schedulers (or a hand-written reference),
per-group lrs, wd and per-call callbacks, composed phases, and the errors for bad arguments."""
import inspect
import math
from functools import partial

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as tsched

from minifast import Callback, Learner, policies
from minifast.policies import (fit_clr, fit_exp, fit_fc, fit_phases, fit_sgdr, fit_step,
                               fit_warmup_cosine)
from minifast.schedules import TrainingPhase, annealing_cos, warmup_cosine_schedule
from conftest import make_data, make_mlp, torch_applied
from helpers import SGD, _mlp_learner, same_state, snapshot


# ---- fit_one_cycle ---------------------------------------------------------------------------------------------------
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


def test_fit_one_cycle_start_epoch_trains_the_rest_of_the_cycle():
    full = Learner(make_data(n_train=64), make_mlp(), silent=True)
    full.fit_one_cycle(5, 1e-2)
    rest = Learner(make_data(n_train=64), make_mlp(), silent=True)
    rest.fit_one_cycle(5, 1e-2, start_epoch=3)
    assert len(rest.recorder.train_losses) == 2
    np.testing.assert_allclose(rest.recorder.lrs, full.recorder.lrs[3 * 4:], rtol=1e-12)
    with pytest.raises(ValueError, match='start_epoch 5 is at or past the end of a 5-epoch cycle'):
        rest.fit_one_cycle(5, 1e-2, start_epoch=5)


ADAMW = partial(torch.optim.AdamW, betas=(0.9, 0.99))


def learner(n_train=48, opt_func=SGD, groups=False):
    model = make_mlp()
    return Learner(make_data(n_train=n_train), model, opt_func=opt_func, silent=True,
                   layer_groups=[model[0], model[2]] if groups else None)


# ---- parity with torch ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('n_train,n_cycles,cycle_len,cycle_mult,eta_min', [
    (48, 3, 1, 1, 0.),      # 3 steps an epoch, T_0 = 3
    (48, 3, 1, 2, 0.),      # cycles of 3, 6, 12 steps
    (80, 2, 2, 2, 1e-4),    # 5 steps an epoch, cycles of 10, 20 steps
    (80, 2, 1, 3, 1e-3),
])
def test_fit_sgdr_equals_cosine_annealing_warm_restarts(n_train, n_cycles, cycle_len, cycle_mult, eta_min):
    learn = learner(n_train)
    fit_sgdr(learn, n_cycles, cycle_len, 0.05, cycle_mult=cycle_mult, eta_min=eta_min)
    n = n_train // 16
    total = n * cycle_len * sum(cycle_mult ** i for i in range(n_cycles))
    ref, _ = torch_applied(SGD, 0.05, lambda o: tsched.CosineAnnealingWarmRestarts(o, cycle_len * n, cycle_mult,
                                                                                   eta_min), total)
    assert len(learn.recorder.lrs) == total
    np.testing.assert_allclose(learn.recorder.lrs, ref, rtol=1e-6)
    assert learn.recorder.lrs[cycle_len * n] == pytest.approx(0.05)  # the first restart


@pytest.mark.parametrize('mode,gamma', [('triangular', 1.), ('triangular2', 1.), ('exp_range', 0.93)])
@pytest.mark.parametrize('up,down', [(2, None), (3, 4), (2.5, 1.5)])
def test_fit_clr_equals_cyclic_lr(mode, gamma, up, down):
    learn = learner(80)  # 5 steps an epoch
    fit_clr(learn, 4, 1e-3, 1e-2, up, down, mode=mode, gamma=gamma, base_momentum=0.8, max_momentum=0.95)
    ref_lr, ref_mom = torch_applied(SGD, 1e-3, lambda o: tsched.CyclicLR(
        o, 1e-3, 1e-2, up, down, mode=mode, gamma=gamma, base_momentum=0.8, max_momentum=0.95), 20)
    np.testing.assert_allclose(learn.recorder.lrs, ref_lr, rtol=1e-6)
    np.testing.assert_allclose(learn.recorder.moms, ref_mom, rtol=1e-6)


def test_fit_clr_cycles_adam_beta1_and_can_leave_momentum_alone():
    learn = learner(80, ADAMW)
    fit_clr(learn, 2, 1e-3, 1e-2, 3, mode='triangular2')
    ref_lr, ref_mom = torch_applied(ADAMW, 1e-3, lambda o: tsched.CyclicLR(o, 1e-3, 1e-2, 3, mode='triangular2'), 10)
    np.testing.assert_allclose(learn.recorder.lrs, ref_lr, rtol=1e-6)
    np.testing.assert_allclose(learn.recorder.moms, ref_mom, rtol=1e-6)
    learn = learner(80)
    fit_clr(learn, 2, 1e-3, 1e-2, 3, cycle_momentum=False)
    assert learn.recorder.moms == [0.9] * 10


@pytest.mark.parametrize('epochs,step_size,gamma', [(5, 2, 0.5), (4, 1, 0.1), (3, 5, 0.3)])
def test_fit_step_equals_step_lr_per_epoch(epochs, step_size, gamma):
    learn = learner(48)
    fit_step(learn, epochs, 0.02, step_size, gamma)
    ref, _ = torch_applied(SGD, 0.02, lambda o: tsched.StepLR(o, step_size, gamma), epochs * 3, per_epoch=3)
    np.testing.assert_allclose(learn.recorder.lrs, ref, rtol=1e-6)
    per_step, _ = torch_applied(SGD, 0.02, lambda o: tsched.StepLR(o, step_size * 3, gamma), epochs * 3)
    np.testing.assert_allclose(learn.recorder.lrs, per_step, rtol=1e-6)


def test_fit_exp_equals_exponential_lr_per_epoch():
    learn = learner(48)
    fit_exp(learn, 4, 0.02, 0.7)
    ref, _ = torch_applied(SGD, 0.02, lambda o: tsched.ExponentialLR(o, 0.7), 12, per_epoch=3)
    np.testing.assert_allclose(learn.recorder.lrs, ref, rtol=1e-6)
    assert learn.recorder.lrs[3:6] == [pytest.approx(0.014)] * 3  # constant within an epoch


@pytest.mark.parametrize('epochs,warmup_epochs,warmup_lr,min_lr', [
    (4, 1, None, 0.), (3, 2, 1e-4, 1e-3), (2, 1, 0., 0.)])
def test_fit_warmup_cosine_equals_sequential_linear_then_cosine(epochs, warmup_epochs, warmup_lr, min_lr):
    lr, n = 0.05, 5
    learn = learner(80)
    fit_warmup_cosine(learn, epochs, lr, warmup_epochs, warmup_lr, min_lr)
    W, T = warmup_epochs * n, epochs * n
    wlr = lr / 100 if warmup_lr is None else warmup_lr
    if wlr > 0:  # LinearLR refuses start_factor=0
        ref, _ = torch_applied(SGD, lr, lambda o: tsched.SequentialLR(o, [
            tsched.LinearLR(o, start_factor=wlr / lr, end_factor=1., total_iters=W),
            tsched.CosineAnnealingLR(o, T_max=T - W, eta_min=min_lr)], milestones=[W]), T)
        np.testing.assert_allclose(learn.recorder.lrs, ref, rtol=1e-6)
    hand = [wlr + (lr - wlr) * k / W if k < W
            else min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (k - W) / (T - W))) / 2 for k in range(T)]
    np.testing.assert_allclose(learn.recorder.lrs, hand, rtol=1e-9, atol=1e-15)


def test_warmup_cosine_without_warmup_is_cosine_annealing_and_fractional_warmup():
    learn = learner(80)
    fit_warmup_cosine(learn, 2, 0.05, warmup_epochs=0, min_lr=1e-4)
    ref, _ = torch_applied(SGD, 0.05, lambda o: tsched.CosineAnnealingLR(o, T_max=10, eta_min=1e-4), 10)
    np.testing.assert_allclose(learn.recorder.lrs, ref, rtol=1e-6)
    s = warmup_cosine_schedule(10, 1.0, 2.5, warmup_lr=0.)  # steps 0, 1, 2 warm up; 3.. anneal from pct 0.5 / 7.5
    assert [s(k)['lr'] for k in range(3)] == pytest.approx([0, 0.4, 0.8])
    assert s(3)['lr'] == pytest.approx(annealing_cos(1., 0., 0.5 / 7.5))


@pytest.mark.parametrize('epochs,n_train,pct_start,div_final', [(4, 48, 0.75, 1e5), (1, 80, 0.5, 10.), (3, 80, 0., 1e2),
                                                                (2, 48, 1., 1e5)])
def test_fit_fc_equals_fastai_v2_flat_cos_by_hand(epochs, n_train, pct_start, div_final):
    learn = learner(n_train)
    fit_fc(learn, epochs, 0.01, pct_start, div_final)
    T = epochs * (n_train // 16)

    def v2(k):  # fastai v2 combine_scheds([p, 1-p], [flat, cos]) at pos = k / T
        pos = k / T
        if pos < pct_start:
            return 0.01
        pct = (pos - pct_start) / (1 - pct_start)
        return 0.01 / div_final + (0.01 - 0.01 / div_final) * (1 + math.cos(math.pi * pct)) / 2
    np.testing.assert_allclose(learn.recorder.lrs, [v2(k) for k in range(T)], rtol=1e-9)


# ---- per group, wd, callbacks ---------------------------------------------------------------------------------
POLICIES = {
    'sgdr': lambda learn, lr, **kw: fit_sgdr(learn, 2, 1, lr, **kw),
    'clr': lambda learn, lr, **kw: fit_clr(learn, 3, _div(lr, 10), lr, 2, mode='triangular2', **kw),
    'step': lambda learn, lr, **kw: fit_step(learn, 3, lr, 1, 0.5, **kw),
    'exp': lambda learn, lr, **kw: fit_exp(learn, 3, lr, 0.8, **kw),
    'warmup_cosine': lambda learn, lr, **kw: fit_warmup_cosine(learn, 3, lr, **kw),
    'fc': lambda learn, lr, **kw: fit_fc(learn, 3, lr, **kw),
    'phases': lambda learn, lr, **kw: fit_phases(learn, [TrainingPhase(epochs=1, lr=(_div(lr, 10), lr)),
                                                         TrainingPhase(epochs=2, lr=(lr, 0., 'cos'))], **kw),
}


def _div(lr, d):
    return slice(lr.start / d, lr.stop / d) if isinstance(lr, slice) else lr / d


@pytest.mark.parametrize('policy', sorted(POLICIES))
def test_policies_with_per_group_lrs_wd_and_per_call_callbacks(policy):
    single = learner()
    POLICIES[policy](single, 0.01)
    learn = learner(groups=True)

    class Count(Callback):
        n = 0

        def after_step(self, learn):
            self.n += 1

    cb = Count()
    POLICIES[policy](learn, slice(0.001, 0.01), wd=0.123, callbacks=cb)
    g = np.array(learn.recorder.group_lrs)
    assert g.shape == (len(single.recorder.lrs), 2) and cb.n == len(g)
    np.testing.assert_allclose(g[:, 1], single.recorder.lrs, rtol=1e-9)  # the last group gets the slice's end
    np.testing.assert_allclose(g[:, 0], 0.1 * g[:, 1], rtol=1e-9)  # and the ratio holds all along
    assert {pg['wd'] for pg in learn.opt.param_groups} == {0.123}
    learn.fit(1, 1e-3)
    assert cb.n == len(g) and cb not in learn.callbacks  # the callback was for that call only


def test_list_lrs_per_group():
    learn = learner(groups=True)
    fit_sgdr(learn, 1, 1, [0.02, 0.04], cycle_mult=1, eta_min=[0., 1e-3])
    g = np.array(learn.recorder.group_lrs)
    ref0, _ = torch_applied(SGD, 0.02, lambda o: tsched.CosineAnnealingWarmRestarts(o, 3, 1, 0.), 3)
    ref1, _ = torch_applied(SGD, 0.04, lambda o: tsched.CosineAnnealingWarmRestarts(o, 3, 1, 1e-3), 3)
    np.testing.assert_allclose(g, np.array([ref0, ref1]).T, rtol=1e-6)


# ---- composing phases -----------------------------------------------------------------------------------------
def test_fit_phases_composes_lengths_in_epochs_and_steps_and_stops_mid_epoch():
    learn = learner(48, ADAMW)  # 3 steps an epoch
    phases = [TrainingPhase(epochs=1, lr=(1e-3, 1e-2), mom=(0.95, 0.85, 'cos')),
              TrainingPhase(4).schedule_hp('lr', 1e-2, anneal='cos').schedule_hp('wd', (0.1, 0.)),
              ]
    fit_phases(learn, phases, wd=0.5)
    rec = learn.recorder
    lr1 = [1e-3 + 9e-3 * k / 3 for k in range(3)]
    lr2 = [annealing_cos(1e-2, 0., k / 4) for k in range(4)]  # fastai v1: one value with an anneal goes to 0
    np.testing.assert_allclose(rec.lrs, lr1 + lr2, rtol=1e-9)
    mom1 = [annealing_cos(0.95, 0.85, k / 3) for k in range(3)]
    np.testing.assert_allclose(rec.moms, mom1 + [0.85] * 4, rtol=1e-9)  # the second phase holds where the first ended
    assert rec.nb_batches == [3, 3, 1] and all(v is not None for v in rec.val_losses)  # the last epoch still validates
    assert learn.opt.param_groups[0]['wd'] == pytest.approx(0.1 * (1 - 3 / 4))  # wd of the last step


def test_fit_phases_slice_and_whole_epochs():
    learn = learner(48, groups=True)
    fit_phases(learn, [TrainingPhase(epochs=2, lr=slice(1e-3, 1e-2))])
    assert learn.recorder.nb_batches == [3, 3]
    assert learn.recorder.group_lrs == [[pytest.approx(1e-3), pytest.approx(1e-2)]] * 6


# ---- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('call,match', [
    (lambda learn: fit_sgdr(learn, 0, 1, 1e-2), r'fit_sgdr: n_cycles must be an integer >= 1, got 0'),
    (lambda learn: fit_sgdr(learn, 2, 0.5, 1e-2),
     r'fit_sgdr: cycle_len \(epochs\) must be an integer >= 1, got 0\.5'),
    (lambda learn: fit_sgdr(learn, 2, 1, 1e-2, cycle_mult=1.5),
     r'fit_sgdr: cycle_mult must be an integer >= 1, got 1\.5'),
    (lambda learn: fit_clr(learn, 2, 1e-3, 1e-2, 3, mode='triangle'),
     r"fit_clr: mode must be one of 'triangular', 'triangular2', 'exp_range', got 'triangle'"),
    (lambda learn: fit_clr(learn, 2, 1e-3, 1e-2, 0), r'fit_clr: step_size_up \(steps\) must be > 0, got 0'),
    (lambda learn: fit_clr(learn, 2, 1e-3, 1e-2, 2, mode='exp_range', gamma=0.), r'fit_clr: gamma must be > 0'),
    (lambda learn: fit_clr(learn, 2, [1e-3, 1e-4], 1e-2, 2),
     r'fit_clr: base_lr: lr has 2 values but the learner has 1'),
    (lambda learn: fit_step(learn, 3, 1e-2, 0), r'fit_step: step_size \(epochs\) must be an integer >= 1, got 0'),
    (lambda learn: fit_step(learn, 0, 1e-2, 1), r'fit_step: epochs must be an integer >= 1, got 0'),
    (lambda learn: fit_exp(learn, 3, 1e-2, -0.5), r'fit_exp: gamma must be > 0, got -0\.5'),
    (lambda learn: fit_warmup_cosine(learn, 2, 1e-2, warmup_epochs=3),
     r'fit_warmup_cosine: warmup_epochs must be <= 2, got 3'),
    (lambda learn: fit_fc(learn, 2, 1e-2, pct_start=1.5), r'fit_fc: pct_start must be <= 1, got 1\.5'),
    (lambda learn: fit_fc(learn, 2, 'fast'), r'fit_fc: lr must be a number, one number per layer group or a slice'),
    (lambda learn: fit_phases(learn, []), r'GeneralSchedule needs at least one TrainingPhase'),
    (lambda learn: fit_phases(learn, [TrainingPhase(0, lr=1.)]), r'the phases last 0 steps'),
    (lambda learn: fit_phases(learn, [(3, {'lr': 1.})]), r'phases\[0\] is tuple, not a TrainingPhase'),
])
def test_bad_arguments_name_the_argument(call, match):
    learn = learner()
    with pytest.raises((ValueError, TypeError), match=match):
        call(learn)
    assert learn.opt is None  # nothing ran


def test_learner_methods_delegate_to_the_policies():
    from conftest import make_data, make_mlp
    from minifast import Learner, TrainingPhase
    for call in (lambda l: l.fit_sgdr(2, 1, 1e-2, cycle_mult=1), lambda l: l.fit_clr(1, 1e-4, 1e-2, 2),
                 lambda l: l.fit_step(2, 1e-2, 1), lambda l: l.fit_exp(2, 1e-2, 0.5),
                 lambda l: l.fit_warmup_cosine(2, 1e-2), lambda l: l.fit_fc(2, 1e-2),
                 lambda l: l.fit_phases([TrainingPhase(4, lr=(1e-3, 1e-2))])):
        learn = Learner(make_data(n_train=64), make_mlp(), silent=True)
        call(learn)
        assert len(set(learn.recorder.lrs)) > 1  # a schedule, not a constant lr


def test_fit_phases_keeps_the_layer_decay():
    from conftest import make_data, make_mlp
    from minifast import Learner, TrainingPhase
    model = make_mlp()
    learn = Learner(make_data(n_train=64), model, layer_groups=[model[0], model[2]], layer_decay=0.1, silent=True)
    learn.fit_phases([TrainingPhase(4, lr=(1e-2, 1e-3))])
    g = np.array(learn.recorder.group_lrs)
    np.testing.assert_allclose(g[:, 0] / g[:, 1], 0.1, rtol=1e-9)
    assert g[0, 1] == pytest.approx(1e-2)


def test_bad_learning_rates_in_the_policies():
    learn = _mlp_learner()
    snap = snapshot(learn.model)
    with pytest.raises(ValueError, match=r'max_lr must be a finite number >= 0 .*got nan'):
        learn.fit_one_cycle(1, float('nan'))
    with pytest.raises(ValueError, match=r'fit_sgdr: eta_min: eta_min must be a finite number >= 0 .*got -1'):
        learn.fit_sgdr(1, 1, 1e-3, eta_min=-1)
    with pytest.raises(ValueError, match=r'fit_warmup_cosine: warmup_lr: warmup_lr must be a finite number >= 0'):
        learn.fit_warmup_cosine(1, 1e-3, warmup_lr=-1.)
    assert same_state(learn.model, snap)
    learn.fit(1, 0.)  # lr=0 stays allowed


@pytest.mark.parametrize('kw, msg', [
    (dict(moms=(1.5, 0.85)), r'fit_one_cycle: moms must hold momentums in \[0, 1\) .*got \(1\.5, 0\.85\)'),
    (dict(moms=(-0.1, 0.5)), r'fit_one_cycle: moms must hold momentums in \[0, 1\)'),
    (dict(moms=(float('nan'), 0.85)), r'fit_one_cycle: moms must hold momentums in \[0, 1\)'),
    (dict(moms='ab'), r'fit_one_cycle: moms must hold momentums in \[0, 1\)'),
    (dict(div_factor=0), r'one_cycle_schedule: div_factor must be > 0, got 0'),
    (dict(div_factor=-1), r'one_cycle_schedule: div_factor must be > 0, got -1'),
    (dict(div_factor=float('nan')), r'one_cycle_schedule: div_factor must be a finite number, got nan'),
    (dict(final_div=0), r'one_cycle_schedule: final_div must be > 0, got 0'),
    (dict(final_div=-1), r'one_cycle_schedule: final_div must be > 0, got -1'),
    (dict(final_div=float('nan')), r'one_cycle_schedule: final_div must be a finite number, got nan')])
def test_bad_one_cycle_arguments_fail_before_any_step(kw, msg):
    learn = _mlp_learner()
    snap = snapshot(learn.model)
    with pytest.raises(ValueError, match=msg):
        learn.fit_one_cycle(1, 1e-3, **kw)
    assert same_state(learn.model, snap) and learn.recorder.lrs == []


def test_one_cycle_keeps_accepting_reversed_moms_and_no_moms():
    learn = _mlp_learner()
    learn.fit_one_cycle(1, 1e-3, moms=(0.85, 0.95), div_factor=1, final_div=1)  # unusual, not invalid
    learn.fit_one_cycle(1, 1e-3, moms=None)


@pytest.mark.parametrize('call, msg', [
    (lambda l: l.fit_step(2, 1e-3, 1, gamma=float('inf')), r'fit_step: gamma must be a finite number, got inf'),
    (lambda l: l.fit_exp(2, 1e-3, float('inf')), r'fit_exp: gamma must be a finite number, got inf'),
    (lambda l: l.fit_clr(1, 1e-3, 1e-2, float('inf')), r'fit_clr: step_size_up \(steps\) must be a finite number')])
def test_infinite_policy_arguments_fail_before_any_step(call, msg):
    learn = _mlp_learner()
    snap = snapshot(learn.model)
    with pytest.raises(ValueError, match=msg):
        call(learn)
    assert same_state(learn.model, snap) and learn.recorder.lrs == []


def test_policies_are_bound_on_the_learner_with_the_shared_arguments_documented_once():
    names = ['fit_one_cycle', 'fit_sgdr', 'fit_clr', 'fit_step', 'fit_exp', 'fit_warmup_cosine', 'fit_flat_cos',
             'fit_fc', 'fit_phases', 'lr_find']
    for name in names:
        assert getattr(Learner, name) is getattr(policies, name)
    for name in names[:-1]:
        doc, params = getattr(policies, name).__doc__, inspect.signature(getattr(policies, name)).parameters
        assert doc.count(policies.FIT_ARGS.strip()) == 1, name
        assert {'wd', 'callbacks', 'resume', 'clip'} <= set(params), name

def test_fit_flat_cos_takes_the_clear_name_and_the_old_ones():
    data = make_data()
    runs = []
    for call in (lambda l: l.fit_flat_cos(2, 1e-2, final_div=100.), lambda l: l.fit_fc(2, 1e-2, div_final=100.),
                 lambda l: l.fit_fc(2, 1e-2, 0.75, 100.)):
        learn = Learner(data, make_mlp(), silent=True)
        torch.manual_seed(0)
        call(learn)
        runs.append(learn)
    lrs = [r.recorder.lrs for r in runs]
    default = Learner(data, make_mlp(), silent=True)
    default.fit_flat_cos(2, 1e-2)  # final_div 1e5: anneals further than 100
    assert lrs[0] == lrs[1] == lrs[2] and default.recorder.lrs[-1] < lrs[0][-1] < lrs[0][0]
    with pytest.raises(TypeError, match='give final_div or its older name div_final, not both'):
        Learner(data, make_mlp(), silent=True).fit_flat_cos(1, final_div=10., div_final=10.)
