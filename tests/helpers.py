"""Helpers that several test files share (fixtures and the generated data/model are in conftest.py)."""
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import torch
from torch import nn

from minifast import DataBunch, Learner, lock
from conftest import make_data, make_mlp


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


LOCK_PY = Path(lock.__file__)

# a child that holds `folder` with lock.py loaded from its file (no torch import: starts in a fraction of a second)
HOLDER = textwrap.dedent('''
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location('lock', sys.argv[1])
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    lock.acquire(sys.argv[2], 'child')
    print('held', flush=True)
    if sys.argv[3] == 'wait':
        time.sleep(60)
    else:
        try:
            lock.acquire(sys.argv[2] + '/', 'child')  # the same folder again, spelled otherwise
            lock.release(sys.argv[2])
        finally:
            lock.release(sys.argv[2])
        print('released', flush=True)
''')


def lock_holder(folder, mode='wait'):
    """A child process holding `folder` (it has printed 'held' when this returns)."""
    p = subprocess.Popen([sys.executable, '-c', HOLDER, str(LOCK_PY), str(folder), mode], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == 'held'
    return p


def patch_tiny_task(monkeypatch, module, cmd):
    """`module` (minifast.smith or minifast.searchjob) with a tiny MLP task in place of images and ResNets: its
    make_data and model_fn are replaced; everything else (steps, caches, storage, outputs) is the real thing."""
    def fake_data(args, s, cmd=cmd):
        data = make_data(n_train=s['n_train'], n_valid=32, bs=16, n_out=6, seed=args.seed)
        data.device = 'cpu'  # images' DataBunch has it; the tensor one does not
        return data, f"tiny set ({s['n_train']} training rows)"
    monkeypatch.setattr(module, 'make_data', fake_data)
    monkeypatch.setattr(module, 'model_fn', lambda arch, c, cmd=cmd: (lambda: make_mlp(n_out=c)))
