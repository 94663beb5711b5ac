import matplotlib

matplotlib.use('Agg')

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from minifast import DataBunch  # noqa: E402


def make_data(n_train=48, n_valid=20, bs=16, n_in=8, n_out=3, seed=0, **kw):
    """Generated classification data: n_train // bs training batches, ceil(n_valid / bs) validation batches."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_in, n_out, generator=g)
    x = torch.randn(n_train + n_valid, n_in, generator=g)
    y = (x @ w).argmax(1)
    xv, yv = (x[n_train:], y[n_train:]) if n_valid else (None, None)
    return DataBunch.from_tensors(x[:n_train], y[:n_train], xv, yv, bs=bs, **kw)


def make_mlp(n_in=8, n_out=3, hidden=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def reference_fit(model, data, opt, epochs, seed, before_step=None):
    """The hand-written loop: same data order (torch's global RNG), same loss, same optimizer."""
    torch.manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for xb, yb in data.train_dl:
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            if before_step is not None:
                before_step()
            opt.step()
            opt.zero_grad()
    return model


def torch_applied(factory, lr, make_sched, total, per_epoch=None):
    """lr and momentum that a torch scheduler applies before each of `total` optimizer steps; it is stepped after
    every optimizer step, or after every `per_epoch` steps."""
    opt = factory([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_sched(opt)
    lrs, moms = [], []
    for t in range(total):
        g = opt.param_groups[0]
        lrs.append(g['lr'])
        moms.append(g['betas'][0] if 'betas' in g else g['momentum'])
        opt.step()
        if per_epoch is None or (t + 1) % per_epoch == 0:
            sched.step()
    return lrs, moms


@pytest.fixture
def data():
    return make_data()


@pytest.fixture
def model():
    return make_mlp()


@pytest.fixture(autouse=True, scope='session')
def _decode_cache_in_tmp(tmp_path_factory):
    """Keep the image decode cache of the whole test session out of ~/.cache."""
    import os
    old = os.environ.get('MINIFAST_CACHE')
    os.environ['MINIFAST_CACHE'] = str(tmp_path_factory.mktemp('decode_cache'))
    yield
    if old is None:
        os.environ.pop('MINIFAST_CACHE', None)
    else:
        os.environ['MINIFAST_CACHE'] = old


# Files whose tests choose their device themselves; every other test runs on the CPU, also where a GPU is present,
# so the suite checks the same thing on every machine (the GPU paths are in these files).
_DEVICE_AWARE = {'test_cuda', 'test_fastpath', 'test_benchmarks'}


@pytest.fixture(autouse=True)
def _cpu_unless_device_aware(request, monkeypatch):
    if torch.cuda.is_available() and request.module.__name__ not in _DEVICE_AWARE:
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
