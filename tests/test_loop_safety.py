"""The training loop's safety guarantees (a failure leaves the learner as it was and names the thing)."""
import pytest
import torch
from torch import nn

from minifast import Callback, DataBunch, Learner, accuracy
from minifast.callbacks.tracking import Checkpoint
from conftest import make_data, make_mlp


def make_learner(path, seed=0):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    data = DataBunch.from_tensors(x[:48], y[:48], x[48:], y[48:], bs=16)
    torch.manual_seed(seed)
    return Learner(data, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), path=path, silent=True)


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


class _FailingAfterFit(Callback):
    def after_fit(self, learn):
        raise RuntimeError('summary failed')


def test_a_failing_after_fit_hook_still_lets_the_later_ones_close_bars_and_files(tmp_path, monkeypatch):
    from minifast.callbacks import progress
    from minifast.callbacks.logging import CSVLogger
    monkeypatch.setattr(progress, '_live', lambda: True)  # real console bars, as in a terminal
    learn = make_learner(tmp_path)
    learn.silent = False
    log = CSVLogger()
    with pytest.raises(RuntimeError, match=r'_FailingAfterFit\.after_fit raised RuntimeError: summary failed'):
        learn.fit(1, callbacks=[_FailingAfterFit(), log])  # order 0: it runs before the bar's and the log's after_fit
    assert learn.progress.mbar is None and learn.progress.pbar is None
    assert log.file is None
    assert isinstance(learn.exception, RuntimeError)  # learn.save then writes no 'finished' state
    learn.fit(1)
    assert learn.exception is None and learn.progress.mbar is None


def test_a_callback_both_registered_and_passed_to_fit_runs_once(tmp_path):
    from minifast.callbacks.control import ReduceLROnPlateau
    ckpt = Checkpoint(keep_last=None)
    plateau = ReduceLROnPlateau(patience=0, min_delta=10., factor=0.5, min_lr=0.)  # never improves after epoch 0
    learn = make_learner(tmp_path)
    learn.add_cb(ckpt)
    learn.add_cb(plateau)
    learn.fit(2, 1e-2, callbacks=[ckpt, plateau])
    assert len(ckpt.files) == 2 and len(list((tmp_path / 'checkpoints').iterdir())) == 2
    assert [e for e, _ in plateau.reductions] == [1] and learn.opt.param_groups[0]['lr'] == pytest.approx(5e-3)


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


def test_a_metric_that_raises_is_named_with_the_shapes():
    def bad_metric(pred, targ):
        return (pred.argmax(-1) == targ[:, None]).float().mean(1)[16]  # an index error

    learn = Learner(make_data(), make_mlp(), metrics=[accuracy, bad_metric])
    with pytest.raises(RuntimeError, match=r'metric bad_metric raised IndexError on validation batch 0 '
                                           r'\(predictions of shape \(\d+, \d+\), targets of shape \(\d+,\)\)'):
        learn.validate()
