"""What a resume restores of the learner (callback states, frozen layers, metrics) and what a refused resume leaves
as it was."""
import pytest
import torch

from minifast import Callback, Learner
from minifast.callbacks.tracking import Checkpoint
from minifast.optim import SGD
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
        'grads': all(p.grad is None or not torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters()),
        'modes': model.training,
        'trainable': all(p.requires_grad for p in model.parameters()),
        'opt': learn.opt.param_groups[0]['lr'] != 123.,
        'scaler': learn.stepper.scaler.get_scale() != 1.,
        'stepper': learn.stepper.n_acc == 1,
        'rng': torch.equal(torch.rand(3), want) if part == 'rng' else True,
    }
    assert restored[part]
    others = [k for k, v in restored.items() if v and k not in (part, 'buffers', 'rng')]
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
