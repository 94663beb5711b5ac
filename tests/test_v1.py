"""fastai v1 callbacks (on_* hooks with **kwargs, returning state dicts) run unchanged."""
import pytest
import torch

from minifast import *  # noqa: F403 -- the seed notebook's import line, changed from fastai's
from minifast import CallbackException
from conftest import make_data, make_mlp


class V1Log(Callback):
    def __init__(self, learn):
        self.learn, self.seen = learn, []

    def on_train_begin(self, **kwargs):
        self.seen.append(('train_begin', kwargs['n_epochs'], kwargs['metrics']))

    def on_batch_end(self, **kwargs):
        self.seen.append(('batch_end', kwargs['train'], kwargs['iteration'], kwargs['num_batch'], kwargs['epoch'],
                          float(kwargs['last_loss'].detach()), kwargs['smooth_loss'], kwargs['last_target'].shape[0]))

    def on_epoch_end(self, **kwargs):
        self.seen.append(('epoch_end', kwargs['epoch'], kwargs['last_metrics']))

    def on_train_end(self, **kwargs):
        self.seen.append(('train_end', kwargs['exception']))


def test_v1_state_names_and_values():
    learn = Learner(make_data(), make_mlp(), metrics=[accuracy], silent=True)
    cb = V1Log(learn)
    learn.fit(2, 1e-2, callbacks=cb)
    assert cb.seen[0] == ('train_begin', 2, [accuracy])
    train = [s for s in cb.seen if s[0] == 'batch_end' and s[1]]
    assert [(s[2], s[3], s[4]) for s in train] == [(0, 0, 0), (1, 1, 0), (2, 2, 0), (3, 0, 1), (4, 1, 1), (5, 2, 1)]
    assert [s[5] for s in train] == pytest.approx(learn.recorder.raw_losses, abs=1e-6)
    assert [s[6] for s in train] == pytest.approx(learn.recorder.losses, abs=1e-6)
    valid = [s for s in cb.seen if s[0] == 'batch_end' and not s[1]]
    assert [s[7] for s in valid] == [16, 4, 16, 4]
    ends = [s for s in cb.seen if s[0] == 'epoch_end']
    assert [e[1] for e in ends] == [0, 1]
    assert ends[-1][2] == learn.validate()  # [valid_loss, accuracy] as fastai v1's last_metrics
    assert cb.seen[-1] == ('train_end', None)


def test_v1_stop_training_ends_fit_after_that_epoch():
    class Stop(Callback):
        def on_epoch_end(self, epoch, **kwargs):
            return {'stop_training': epoch == 1}

    learn = Learner(make_data(), make_mlp(), silent=True)
    learn.fit(10, callbacks=Stop())
    assert len(learn.recorder.train_losses) == 2


def test_v1_stop_epoch_ends_the_training_pass():
    class Stop(Callback):
        def on_batch_end(self, num_batch, train, **kwargs):
            if train and num_batch == 1:
                return {'stop_epoch': True}

    learn = Learner(make_data(), make_mlp(), silent=True)
    learn.fit(2, callbacks=Stop())
    assert learn.recorder.nb_batches == [2, 2]
    assert all(v is not None for v in learn.recorder.val_losses)  # validation still ran


def test_v1_last_input_replaced_by_on_batch_begin():
    seen = []

    class Zero(Callback):
        def on_batch_begin(self, last_input, **kwargs):
            return {'last_input': torch.zeros_like(last_input)}

    class Spy(Callback):
        order = 10

        def after_pred(self, learn):
            seen.append(float(learn.xb[0].abs().sum()))

    learn = Learner(make_data(), make_mlp(), silent=True)
    learn.fit(1, callbacks=[Zero(), Spy()])
    assert seen and all(v == 0 for v in seen)


def test_v1_skip_step_leaves_weights_unchanged():
    class Accumulate(Callback):
        def on_backward_end(self, **kwargs):
            return {'skip_step': True, 'skip_zero': True}

    learn = Learner(make_data(), make_mlp(), silent=True)
    w0 = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1, 1e-2, callbacks=Accumulate())
    assert all(torch.equal(a, b) for a, b in zip(w0, learn.model.parameters()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learn.model.parameters())  # accumulated


def test_v1_unknown_state_name_is_an_error():
    class Bad(Callback):
        def on_epoch_end(self, **kwargs):
            return {'stop_trianing': True}

    learn = Learner(make_data(), make_mlp(), silent=True)
    with pytest.raises(CallbackException, match=r"Bad.on_epoch_end raised KeyError.*'stop_trianing'"):
        learn.fit(1, callbacks=Bad())


# ---- the seed notebook's GetWeights, verbatim (it reads the global `learn`) ------------------------------------
class GetWeights(Callback):
    def __init__(self, learn, save_list=[5, 7]):
        self.learn = learn
        self.save_list = save_list

    def on_train_begin(self, **kwargs):
        self.weights = {}

    def on_epoch_end(self, **kwargs):
        if kwargs['epoch'] in self.save_list:
            weights = learn.model.state_dict()
            for k, v in weights.items():
                weights[k] = v.cpu()
            self.weights[kwargs['epoch']] = weights

    def get_weights(self):
        return self.weights


def test_seed_getweights_runs_unchanged():
    global learn
    data = make_data(n_train=64, n_valid=32)
    learn = Learner(data, make_mlp(), metrics=[accuracy, top_k_accuracy], callback_fns=ShowGraph, silent=True)
    getWeights = GetWeights(learn)
    snap_keys = []

    class Check(Callback):  # the snapshot taken at epoch end equals the model at that moment
        order = 10

        def after_epoch(self, learn):
            if learn.epoch in getWeights.weights:
                w = getWeights.weights[learn.epoch]
                snap_keys.append(learn.epoch)
                assert all(torch.equal(w[k], v) for k, v in learn.model.state_dict().items())

    learn.fit(8, 1e-2, callbacks=[getWeights, Check()])
    weights = getWeights.get_weights()
    assert sorted(weights) == [5, 7] == snap_keys
    w1 = weights[5]
    learn.model.load_state_dict(w1)
    loss1, _, _ = learn.validate()
    loss2, _, _ = learn.validate(data.train_dl)
    assert loss1 > 0 and loss2 > 0


def test_v1_on_train_begin_gets_metrics_names():
    class Names(Callback):  # fastai v1's Recorder.on_train_begin(self, pbar, metrics_names, **kwargs)
        def on_train_begin(self, pbar, metrics_names, **kwargs):
            self.names = metrics_names

    learn = Learner(make_data(), make_mlp(), metrics=[accuracy, top_k_accuracy], silent=True)
    cb = Names()
    learn.fit(1, callbacks=cb)
    assert cb.names == ['accuracy', 'top_k_accuracy']


def test_v1_skip_validate_skips_validation_for_the_fit():
    class NoValid(Callback):  # fastai v1's LRFinder returns this from on_train_begin
        def on_train_begin(self, **kwargs):
            return {'skip_validate': True}

    learn = Learner(make_data(), make_mlp(), metrics=[accuracy], silent=True)
    learn.fit(2, callbacks=NoValid())
    assert learn.recorder.val_losses == [None, None] and learn.recorder.metrics == [[], []]
    learn.fit(1)  # the next fit, without the callback, validates again
    assert learn.recorder.val_losses[0] is not None
