"""The resume experiment (one run definition, used in-process and in a child process killed with SIGKILL) and the
comparison of two runs' outcomes, shared by the resume, control and lr finder tests."""
import torch

from minifast import Callback


# One definition of the run, used in this process and, for the SIGKILL test, in a child process. Dropout, a
# shuffling loader and a noise "augmentation" all draw from the global RNG, so any slip in the restored RNG states
# or data order changes the losses.
RUN = '''
import os, signal, torch
from torch import nn
import minifast
from minifast import Callback, DataBunch, Learner
from minifast.callbacks.tracking import Checkpoint
from minifast.determinism import set_seed


def make_learner(path, n_train=96, bs=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + 24, 8, generator=g)
    y = x[:, :3].argmax(1)
    data = DataBunch.from_tensors(x[:n_train], y[:n_train], x[n_train:], y[n_train:], bs=bs)
    data.train_dl.after_batch = lambda b: (b[0] + 0.1 * torch.randn_like(b[0]), b[1])
    set_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    return Learner(data, model, path=path, silent=True, metrics=[minifast.accuracy])


class Kill(Callback):
    """SIGKILL this process after training step `at` (0-based), before that batch's after_batch."""
    def __init__(self, at):
        self.at = at

    def after_step(self, learn):
        if learn.train_iter == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def run(path, method='fit_one_cycle', every=4, kill_at=None, resume=None, extra=(), **kw):
    learn = make_learner(path)
    cbs = [Checkpoint(every=every), *extra] + ([Kill(kill_at)] if kill_at is not None else [])
    set_seed(1)
    args = {'fit_one_cycle': (3, 1e-2), 'fit_sgdr': (2, 1, 1e-2), 'fit': (3, 1e-2)}[method]
    getattr(learn, method)(*args, callbacks=cbs, resume=resume, **kw)
    return learn
'''
ns = {}
exec(compile(RUN, 'resume_run', 'exec'), ns)
run, make_learner = ns['run'], ns['make_learner']


def outcome(learn):
    r = learn.recorder
    return {'model': learn.model.state_dict(), 'opt': learn.opt.state_dict(), 'lrs': r.group_lrs,
            'moms': r.group_moms, 'losses': r.raw_losses, 'smooth': r.losses, 'val': r.val_losses,
            'metrics': r.metrics, 'train_losses': r.train_losses, 'nb_batches': r.nb_batches}


def assert_identical(a, b, where='run'):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f'{where}: {len(a)} vs {len(b)}'
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f'{where}[{i}]')
    else:
        assert a == b or (a != a and b != b), f'{where}: {a} vs {b}'


class Interrupt(Callback):
    def __init__(self, at, exc=RuntimeError):
        self.at, self.exc = at, exc

    def after_step(self, learn):
        if learn.train_iter == self.at:
            raise self.exc('simulated crash')
