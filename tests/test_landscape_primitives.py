"""The landscape analyses on the library's shared primitives: their restore is `state.preserved` (which holds a
Ctrl-C pressed during any restore until it is done) and their reduction is `metrics.batch_sums`, the arithmetic of
`batch_means` (validate), with no host read per evaluated point."""
import copy
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from minifast import Learner
from minifast.landscape import evaluate_weights, interpolate_losses, loss_surface, recompute_bn
from minifast.metrics import batch_means, batch_sums
from minifast.state import PARTS, Snapshot, holding_sigint, preserved

from conftest import make_data, make_mlp


def _let_handlers_run():
    """Python runs a signal's handler at its next check for pending calls; a Python-level call is one."""
    (lambda: None)()


class CtrlCOnRestore(nn.Module):
    """A BatchNorm + dropout MLP that sends itself a real SIGINT (an impatient second Ctrl-C) the next time its
    train/eval mode is set once `fire` is on: during a restore, the modes part."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=0.3), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(16, 3))
        self.fire, self.sent = False, False

    def __setattr__(self, name, value):
        if name == 'training' and self.__dict__.get('fire'):
            self.__dict__['fire'], self.__dict__['sent'] = False, True
            os.kill(os.getpid(), signal.SIGINT)
            _let_handlers_run()  # an unheld Ctrl-C raises here, in the middle of the restore
        super().__setattr__(name, value)

    def forward(self, x):
        return self.net(x)


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            model.net[1].momentum, torch.get_rng_state())


def _assert_same(now, want):
    (sd, modes, momentum, rng), (sd0, modes0, momentum0, rng0) = now, want
    assert sd.keys() == sd0.keys() and all(torch.equal(v, sd0[k]) for k, v in sd.items())
    assert modes == modes0 and momentum == momentum0 and torch.equal(rng, rng0)


def _assert_state(model, want):
    _assert_same(_state(model), want)


def _change(model):
    """What an analysis changes: weights, modes, BatchNorm momenta, the RNG."""
    with torch.no_grad():
        model.net[0].weight.add_(1.)
        model.net[1].running_mean.add_(1.)
    model.eval()
    model.net[1].momentum = None
    torch.rand(3)


def _restore_via(how, learn, parts):
    """A context whose exit restores `parts` of `learn`: `preserved`, or a Snapshot restored by hand (as the
    first-batch check does)."""
    if how == 'preserved':
        return preserved(learn, parts)

    class ByHand:
        def __enter__(self):
            self.snap = Snapshot.take(learn, parts)

        def __exit__(self, *exc):
            self.snap.restore()
    return ByHand()


@pytest.mark.parametrize('how', ['preserved', 'restore'])
def test_ctrl_c_during_the_restore_waits_until_it_is_done_then_raises(how):
    learn = Learner(make_data(), CtrlCOnRestore(), silent=True, device='cpu')
    model = learn.model
    model.train()
    model.net[3].eval()  # a mixed mode comes back as it was
    before = _state(model)
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own: a Ctrl-C raises KeyboardInterrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            with _restore_via(how, learn, ('weights', 'buffers', 'modes', 'momenta', 'rng')):
                _change(model)
                model.fire = True  # the body completed; the Ctrl-C comes during the restore
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, handler)
    assert model.sent
    _assert_state(model, before)  # every part back, those after the modes too


def test_ctrl_c_during_the_restore_goes_to_the_handler_in_charge_afterwards():
    """Under fit's deferring handler (any Python handler) the held Ctrl-C is handed to it once the model is back."""
    learn = Learner(make_data(), CtrlCOnRestore(), silent=True, device='cpu')
    model = learn.model
    before = _state(model)
    seen = []
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: seen.append(_state(model)))
    try:
        with preserved(learn, ('weights', 'buffers', 'modes', 'momenta', 'rng')):
            _change(model)
            model.fire = True
    finally:
        signal.signal(signal.SIGINT, handler)
    assert model.sent and len(seen) == 1
    _assert_same(seen[0], before)  # when the handler ran, the model was already put back
    _assert_state(model, before)


def test_holding_sigint_is_the_one_in_state():
    from minifast import landscape
    assert landscape._holding_sigint is holding_sigint  # the name the earlier tests import from landscape


def test_snapshot_of_a_bare_model_and_discarding_some_parts():
    model = CtrlCOnRestore()
    before = _state(model)
    with preserved(model, ('buffers', 'momenta', 'modes', 'rng')) as snap:
        model.net[1].momentum = None
        model.eval()
        with torch.no_grad():
            model.net[1].running_var.mul_(3.)
        torch.rand(2)
        after = model.net[1].running_var.clone(), torch.get_rng_state()
        snap.discard(('buffers', 'rng'))  # these stay as the body left them
    assert torch.equal(model.net[1].running_var, after[0]) and torch.equal(torch.get_rng_state(), after[1])
    assert model.net[1].momentum == before[2] and [m.training for m in model.modules()] == before[1]
    with pytest.raises(ValueError, match=r"Snapshot.take: a bare model has only the parts .* \(give the learner\)"):
        Snapshot.take(model, PARTS)
    with pytest.raises(ValueError, match=r"Snapshot.take: unknown parts \['nope'\]; the parts are"):
        Snapshot.take(model, ('nope',))


def test_recompute_bn_interrupted_puts_everything_back_completed_keeps_the_statistics():
    model = CtrlCOnRestore()
    batches = [(torch.randn(6, 8), None) for _ in range(3)]
    before = _state(model)

    def trip(*a):
        raise KeyboardInterrupt('second batch')
    calls = []
    hook = model.net[4].register_forward_hook(lambda *a: calls.append(1) or (trip() if len(calls) == 2 else None))
    with pytest.raises(KeyboardInterrupt):
        recompute_bn(model, batches)
    hook.remove()
    _assert_state(model, before)
    recompute_bn(model, batches)
    assert int(model.net[1].num_batches_tracked) == 3 and not torch.equal(model.net[1].running_mean,
                                                                          before[0]['net.1.running_mean'])
    assert model.net[1].momentum == 0.3 and [m.training for m in model.modules()] == before[1]


# ---- the reduction ---------------------------------------------------------------------------------------------
def spread_loss(pred, y):
    """Per-batch losses over several orders of magnitude: the order of the weighted sums shows in the last bits."""
    return F.cross_entropy(pred, y) * 10 ** (3 * y.float().mean())


def spread_metric(pred, y):
    return (pred.argmax(-1) == y).float().mean() / 3 + pred.float().std() * 1e3


def spread_learner():
    """Uneven batches (9 of 12 and one of 4 in valid) of a model without BatchNorm, so bn='keep' is exact."""
    data = make_data(n_train=64, n_valid=112, bs=12, seed=3)
    learn = Learner(data, make_mlp(), loss_func=spread_loss, metrics=[spread_metric], silent=True, device='cpu')
    w2 = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.fit(1, 1e-2)
    return learn, {k: v.clone() for k, v in learn.model.state_dict().items()}, w2


def reference(learn, weights, dl):
    """`batch_means` of the per-batch (size, (loss, metric)) of `weights` on `dl`, collected by hand."""
    model = copy.deepcopy(learn.model)
    model.load_state_dict(weights)
    model.eval()
    rows = []
    with torch.no_grad():
        for xb, yb in dl:
            pred = model(xb)
            rows.append((yb.shape[0], (learn.loss_func(pred, yb), *[m(pred, yb) for m in learn.metrics])))
    return batch_means(rows, 1 + len(learn.metrics), learn.device)


def test_the_landscape_reduction_is_batch_means():
    learn, w1, w2 = spread_learner()
    res = interpolate_losses(learn, w1, w2, alphas=[0., 0.5, 1.], dls=('valid',), bn='keep')
    mid = {k: torch.lerp(w2[k], w1[k], 0.5) if v.is_floating_point() else v for k, v in w1.items()}
    for i, w in enumerate((w2, mid, w1)):
        assert list(res.values['valid'][i]) == reference(learn, w, learn.data.valid_dl), i  # bit for bit
    assert list(evaluate_weights(learn, w2).values()) == reference(learn, w2, learn.data.valid_dl)
    surface = loss_surface(learn, w1, steps=2)
    assert surface.loss_at(0, 0) == reference(learn, w1, learn.data.valid_dl)[0]
    learn.model.load_state_dict(w1)
    assert learn.validate() == reference(learn, w1, learn.data.valid_dl)


def test_batch_sums_is_what_batch_means_divides():
    rows = [(12, (torch.tensor(1e4), 0.25)), (12, (torch.tensor(3.), torch.tensor(0.5))), (5, (7e-3, 1))]
    t = batch_sums(rows, 2, 'cpu')
    assert t.dtype == torch.float32 and t.shape == (3,) and float(t[2]) == 29.
    assert (t[:2] / t[2]).tolist() == batch_means(rows, 2, 'cpu')
    sized = batch_sums([(0, r[1]) for r in rows], 2, 'cpu', sizes=torch.tensor([12., 12., 5.]))
    assert torch.equal(sized, t)  # given sizes are used, not the rows' own
    assert torch.equal(batch_sums([], 2, 'cpu', torch.float64), torch.zeros(3, dtype=torch.float64))


class HostReads(TorchFunctionMode):
    """Counts what reads a tensor back to the host or copies host data to a device."""
    NAMES = {'cpu', 'item', 'tolist', 'numpy', '__float__', '__int__', '__bool__', 'tensor'}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, '__name__', '')
        self.n += name in self.NAMES or (name == 'as_tensor' and not isinstance(args[0], torch.Tensor))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('bn', ['recompute', 'interpolate'])
def test_no_host_read_per_point(bn):
    """The sweep reads the device once at the end, however many points it evaluates."""
    learn, w1, w2 = spread_learner()
    counts = []
    for n in (2, 7):
        with HostReads() as reads:
            interpolate_losses(learn, w1, w2, alphas=np.linspace(-1, 2, n), bn=bn)
        counts.append(reads.n)
    assert counts[0] == counts[1], counts
