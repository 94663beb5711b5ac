"""What a resume restores of the learner (callback states, frozen layers, metrics) and what a refused resume leaves
as it was."""
import os
import signal

import pytest
import torch
from torch import nn

from minifast import Callback, Learner
from minifast.callbacks.tracking import Checkpoint
from minifast.optim import SGD
from minifast.landscape import recompute_bn
from minifast.state import PARTS, Snapshot, preserved
from conftest import make_data, make_mlp
from helpers import make_learner


def state(learn):
    return {k: v.clone() for k, v in learn.model.state_dict().items()}, repr(learn.opt.state_dict())


def same_state(a, b):
    return a[1] == b[1] and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


class _Versioned(Callback):
    """A callback whose saved state another version of it cannot read."""
    def __init__(self, key):
        self.key = key

    def state_dict(self):
        return {self.key: 1}

    def load_state_dict(self, state):
        self.value = state['new_key']


class _Interrupt(Callback):
    def after_batch(self, learn):
        if learn.train_iter == 4:
            raise KeyboardInterrupt


def test_resume_whose_callback_state_fails_to_load_names_it_and_leaves_the_learner_unchanged(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        make_learner(tmp_path).fit(2, callbacks=[Checkpoint(every=2), _Versioned('old_key'), _Interrupt()])
    learn = make_learner(tmp_path, seed=1)
    learn.fit(1)
    before = state(learn)
    with pytest.raises(ValueError, match=r"ckpt_\d+_epoch1_step4\.pth.*_Versioned.*KeyError.*new_key"):
        learn.fit(2, callbacks=[Checkpoint(every=2), _Versioned('new_key')], resume=True)
    assert same_state(before, state(learn))


def test_resume_with_other_metrics_is_refused_naming_them(tmp_path):
    from minifast.metrics import accuracy, error_rate
    learn = make_learner(tmp_path)
    learn.metrics = [accuracy]
    with pytest.raises(KeyboardInterrupt):
        learn.fit(3, callbacks=[Checkpoint(every=2), _Interrupt()])
    learn = make_learner(tmp_path)
    learn.metrics = [error_rate]
    with pytest.raises(ValueError, match=r"metrics \['accuracy'\] and this one has \['error_rate'\]"):
        learn.fit(3, callbacks=[Checkpoint(every=2)], resume='checkpoints')
    learn.metrics = [accuracy]  # the same metrics: it continues
    learn.fit(3, callbacks=[Checkpoint(every=2)], resume='checkpoints')
    assert learn.recorder.metrics_names == ['accuracy'] and all(len(row) == 1 for row in learn.recorder.metrics)


class _UnfreezeAtEpoch1(Callback):
    """Gradual unfreezing: the body trains from epoch 1 on."""
    def before_epoch(self, learn):
        if learn.epoch == 1:
            learn.unfreeze()


def _frozen_fit(path, resume=None, extra=()):
    from minifast.determinism import set_seed
    learn = make_learner(path)
    learn.split(lambda m: [m[0], m[2]])
    learn.freeze()
    set_seed(1)
    learn.fit(3, 1e-2, callbacks=[Checkpoint(every=2), _UnfreezeAtEpoch1(), *extra], resume=resume)
    return learn


def test_resume_after_a_callback_unfroze_layers_trains_them_as_the_uninterrupted_run(tmp_path):
    ref = _frozen_fit(tmp_path / 'ref')
    with pytest.raises(KeyboardInterrupt):
        _frozen_fit(tmp_path / 'run', extra=[_Interrupt()])  # in epoch 1, after the unfreeze
    learn = _frozen_fit(tmp_path / 'run', resume='checkpoints')
    assert all(p.requires_grad for p in learn.model.parameters())
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, learn.model.state_dict()[k]), k


class _RefuseFit(Callback):
    def before_fit(self, learn):
        raise RuntimeError('refused')


def test_a_refused_resume_leaves_the_frozen_layers_as_they_were(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _frozen_fit(tmp_path, extra=[_Interrupt()])
    learn = make_learner(tmp_path)
    learn.split(lambda m: [m[0], m[2]])
    learn.freeze()
    with pytest.raises(RuntimeError, match='_RefuseFit.before_fit'):
        learn.fit(3, 1e-2, callbacks=[Checkpoint(every=2), _UnfreezeAtEpoch1(), _RefuseFit()], resume='checkpoints')
    assert [p.requires_grad for p in learn.model.parameters()] == [False, False, True, True]


@pytest.mark.parametrize('part', PARTS)
def test_each_snapshot_part_is_put_back_and_only_it(part):
    learn = Learner(make_data(), make_mlp(), device='cpu', silent=True, opt_func=SGD, fp16=True)
    learn.fit(1, 1e-2)  # an optimizer with momentum state, a scaler with a scale
    model = learn.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    snap = Snapshot.take(learn, parts=(part,))
    if part == 'rng':
        want = torch.rand(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.)
            p.grad = torch.ones_like(p)
            p.requires_grad_(False)
    model.eval()
    state = learn.opt.state_dict()
    learn.opt.param_groups[0]['lr'] = 123.
    learn.stepper.scaler.update(1.)
    learn.stepper.n_acc = 7
    snap.restore()
    restored = {
        'weights': all(torch.equal(v, before[k]) for k, v in model.state_dict().items()),
        'buffers': True,  # an MLP has no buffers: nothing to change
        'momenta': True,  # nor BatchNorm momenta
        'grads': all(p.grad is None or not torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters()),
        'modes': model.training,
        'trainable': all(p.requires_grad for p in model.parameters()),
        'opt': learn.opt.param_groups[0]['lr'] != 123.,
        'scaler': learn.stepper.scaler.get_scale() != 1.,
        'stepper': learn.stepper.n_acc == 1,
        'rng': torch.equal(torch.rand(3), want) if part == 'rng' else True,
    }
    assert restored[part]
    others = [k for k, v in restored.items() if v and k not in (part, 'buffers', 'momenta', 'rng')]
    assert others == [], f'{part} also restored {others}'
    del state

def test_preserved_restores_on_an_error_and_discard_keeps_the_changes():
    learn = Learner(make_data(), make_mlp(), device='cpu', silent=True)
    w = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(RuntimeError, match='boom'):
        with preserved(learn, parts=('weights',)):
            with torch.no_grad():
                learn.model[0].weight.add_(1.)
            raise RuntimeError('boom')
    assert all(torch.equal(p, q) for p, q in zip(learn.model.parameters(), w))
    with preserved(learn, parts=('weights',)) as snap:
        with torch.no_grad():
            learn.model[0].weight.add_(1.)
        snap.discard()
    assert not torch.equal(learn.model[0].weight, w[0])
    with pytest.raises(ValueError, match=r"unknown parts \['weight'\]"):
        Snapshot.take(learn, parts=('weight',))


# ---- a Ctrl-C during a restore waits; snapshots of a bare model ----------------------------------------------------
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
