"""set_seed and RNG states: same seed, same losses; states round-trip; the deterministic switch."""
import random

import numpy as np
import pytest
import torch
from torch import nn

from minifast import Learner
from minifast.determinism import rng_state, set_rng_state, set_seed

from conftest import make_data


def run(seed):
    set_seed(seed)
    data = make_data(n_train=96)  # shuffled training batches: the order comes from torch's global RNG
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    learn = Learner(data, model, silent=True)
    learn.fit_one_cycle(2, 1e-2)
    return learn.recorder.raw_losses, [p.detach().clone() for p in model.parameters()]


def test_same_seed_same_losses_and_weights():
    (l1, w1), (l2, w2), (l3, _) = run(3), run(3), run(4)
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert l1 != l3


def test_set_seed_seeds_every_generator():
    set_seed(7)
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_seed(7)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize('bad', [-1, 2 ** 32, 1.5, '3', True, None])
def test_set_seed_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match='set_seed: seed must be an integer'):
        set_seed(bad)


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    set_seed(0)
    torch.rand(5), np.random.rand(5), random.random(), np.random.randn()  # a cached gaussian in numpy's state
    st = rng_state()
    torch.save(st, tmp_path / 'rng.pth')
    a = (torch.rand(4), np.random.rand(4), np.random.randn(3), random.random())
    set_rng_state(torch.load(tmp_path / 'rng.pth', weights_only=True))
    b = (torch.rand(4), np.random.rand(4), np.random.randn(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2]) and a[3] == b[3]


def test_deterministic_mode_sets_torch_flags(monkeypatch):
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    old = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
           torch.backends.cudnn.benchmark)
    try:
        set_seed(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os
        assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
        l1, _ = run(1)
        l2, _ = run(1)
        assert l1 == l2
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old[1], old[2]
