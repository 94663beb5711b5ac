"""Helpers that several test files share (fixtures and the generated data/model are in conftest.py)."""
from functools import partial

import torch
from torch import nn

from minifast import DataBunch, Learner
from conftest import make_mlp


def snapshot(model):
    """Parameters and buffers (BatchNorm running stats and counter)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, snap):
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in snap)


def _mlp_learner(**kw):
    from conftest import make_data
    return Learner(make_data(), make_mlp(), silent=True, **kw)


def learner_fit(model, data, epochs, lr, seed, **kw):
    learn = Learner(data, model, silent=True, **kw)
    torch.manual_seed(seed)
    learn.fit(epochs, lr)
    return learn


def assert_same_weights(a, b, atol=0.):
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if atol == 0:
            assert torch.equal(p, q), k
        else:
            torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=k)


def make_learner(path, seed=0):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    data = DataBunch.from_tensors(x[:48], y[:48], x[48:], y[48:], bs=16)
    torch.manual_seed(seed)
    return Learner(data, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), path=path, silent=True)


SGD = partial(torch.optim.SGD, momentum=0.9)
