"""The schedule functions on their own: annealers, one-cycle, cyclic, flat-cos and phase schedules against torch's
schedulers or hand computations, and TrainingPhase's errors."""
import numpy as np
import pytest
from torch.optim import lr_scheduler as tsched

from minifast import annealing_cos, annealing_exp, annealing_linear, one_cycle_schedule
from minifast.schedules import (CyclicSchedule, GeneralSchedule, TrainingPhase, flat_cos_schedule, sgdr_schedule)
from conftest import torch_applied
from helpers import SGD


def test_annealers_by_hand():
    assert annealing_cos(1., 0., 0.) == 1 and annealing_cos(1., 0., 1.) == pytest.approx(0)
    assert annealing_cos(1., 0., 0.5) == pytest.approx(0.5)
    assert annealing_linear(2., 4., 0.25) == 2.5
    assert annealing_exp(1e-3, 1e-1, 0.5) == pytest.approx(1e-2)
    s = one_cycle_schedule(10, 1.0, pct_start=0.5)
    assert s(0)['lr'] == pytest.approx(1 / 25) and s(4)['lr'] == pytest.approx(1.0) and s(9)['lr'] == pytest.approx(
        1 / 25 / 1e4)


def test_cyclic_schedule_alone_over_many_cycles():
    s = CyclicSchedule(0.1, 1.0, 7, 5, mode='exp_range', gamma=0.999, base_momentum=0.85, max_momentum=0.95)
    ref_lr, ref_mom = torch_applied(SGD, 0.1, lambda o: tsched.CyclicLR(
        o, 0.1, 1.0, 7, 5, mode='exp_range', gamma=0.999, base_momentum=0.85, max_momentum=0.95), 100)
    np.testing.assert_allclose([s(t)['lr'] for t in range(100)], ref_lr, rtol=1e-9)
    np.testing.assert_allclose([s(t)['mom'] for t in range(100)], ref_mom, rtol=1e-9)


def test_flat_cos_holds_for_pct_start_of_the_steps():
    s = flat_cos_schedule(8, 1.0, pct_start=0.75, div_final=1e5)
    assert [s(k)['lr'] for k in range(6)] == [1.0] * 6
    assert s(6)['lr'] == pytest.approx(annealing_cos(1., 1e-5, 0.)) and s(7)['lr'] == pytest.approx(0.5 + 0.5e-5)


def test_general_schedule_boundaries_carry_and_end():
    s = GeneralSchedule([TrainingPhase(epochs=0.1, lr=(0., 1.)), TrainingPhase(epochs=0.1, lr=1.),
                         TrainingPhase(0), TrainingPhase(epochs=0.1, lr=(1., 0.), mom=0.9)], steps_per_epoch=10)
    assert s.total_steps == 3 and s.names == ['lr', 'mom']  # 3 x 0.1 epoch, not 3.0000000000000004 -> 4 steps
    assert [s(k) for k in range(3)] == [{'lr': 0.}, {'lr': 1.}, {'lr': 1., 'mom': 0.9}]
    assert s(10) == {'lr': 0., 'mom': 0.9}  # after the end the last values hold
    s = GeneralSchedule([TrainingPhase(2.5, lr=(0., 1.)), TrainingPhase(2.5, lr=(2., 3.))])
    assert [s(k)['lr'] for k in range(5)] == pytest.approx([0, 0.4, 0.8, 2.2, 2.6]) and s.total_steps == 5
    assert sgdr_schedule(2, 3, [1., 2.], cycle_mult=1)(3)['lr'] == [1., 2.]


def test_training_phase_errors():
    with pytest.raises(ValueError, match=r'exactly one; got length=None, epochs=None'):
        TrainingPhase()
    with pytest.raises(ValueError, match=r"unknown hyper-parameter 'beta'; use one of 'lr', 'mom', 'wd'"):
        TrainingPhase(3, beta=0.9)
    with pytest.raises(ValueError, match=r"TrainingPhase lr: unknown anneal 'cosin'; use one of 'cos', 'cosine'"):
        TrainingPhase(3, lr=(1., 0., 'cosin'))
    with pytest.raises(ValueError, match=r'a tuple must be \(start, end\) or \(start, end, anneal\), got 4 values'):
        TrainingPhase(3, lr=(1., 2., 3., 4.))
    with pytest.raises(ValueError, match=r'TrainingPhase: length must be >= 0, got -1'):
        TrainingPhase(-1)
    with pytest.raises(ValueError, match=r'phases\[0\] lasts 2 epochs; pass steps_per_epoch'):
        GeneralSchedule([TrainingPhase(epochs=2, lr=1.)])
    with pytest.raises(ValueError, match=r'phases\[0\] lr: a slice needs the number of layer groups'):
        GeneralSchedule([TrainingPhase(2, lr=slice(1e-3, 1e-2))])
