"""What a resume restores of the learner (callback states, frozen layers, metrics) and what a refused resume leaves
as it was."""
import pytest
import torch

from minifast import Callback
from minifast.callbacks.tracking import Checkpoint
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
