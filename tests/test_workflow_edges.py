"""Seed 004 typed cell by cell: likely user mistakes get an error naming the thing, before any training."""
import pytest
import torch

from minifast import Callback, Learner, Recorder, ShowGraph, WeightSnapshots, interpolate_losses
from conftest import make_data, make_mlp


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize('cbs', [ShowGraph, [ShowGraph], [Recorder, ShowGraph]])
def test_callback_class_in_callbacks_is_an_error_before_training(cbs):
    # callbacks= takes instances; a class (as callback_fns= takes) used to train a whole epoch and then fail with
    # "type.after_epoch raised TypeError: ... missing 1 required positional argument"
    learn = Learner(make_data(), make_mlp(), silent=True)
    w0 = _weights(learn.model)
    with pytest.raises(TypeError, match=r"callbacks=.*the class \w+; pass an instance.*or callback_fns=\[\w+\]"):
        learn.fit(1, 1e-2, callbacks=cbs)
    assert all(torch.equal(a, b) for a, b in zip(w0, learn.model.parameters()))
    assert learn.opt is None  # nothing was set up either
    with pytest.raises(TypeError, match=r"callbacks= got the class (Recorder|ShowGraph)"):
        learn.fit_one_cycle(1, 1e-2, callbacks=cbs)
    assert all(torch.equal(a, b) for a, b in zip(w0, learn.model.parameters()))


def test_callback_instance_in_callback_fns_is_an_error_naming_it():
    # callback_fns= takes classes or functions learn -> callback; an instance used to give
    # "TypeError: 'ShowGraph' object is not callable"
    with pytest.raises(TypeError, match=r"callback_fns=.*ShowGraph instance.*callbacks=\[\.\.\.\]"):
        Learner(make_data(), make_mlp(), silent=True, callback_fns=[ShowGraph()])


def test_get_preds_and_predict_leave_the_train_eval_mode_as_they_found_it():
    # validate() puts the mode back (it may run inside a fit, from a callback); get_preds and predict left the model
    # in eval mode, so a callback predicting mid-epoch made the rest of the epoch train without dropout and with
    # frozen BatchNorm statistics
    data = make_data()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Dropout(0.5),
                                torch.nn.Linear(16, 3))
    learn = Learner(data, model, silent=True)
    modes = []

    class Peek(Callback):
        def after_batch(self, learn):
            if learn.training and learn.iter == 0:
                learn.get_preds()
                learn.predict(data.valid_ds[0][0])

        def before_batch(self, learn):
            if learn.training:
                modes.append(learn.model.training)

    learn.fit(1, 1e-2, callbacks=Peek())
    assert modes == [True] * len(data.train_dl)
    learn.model.eval()
    learn.get_preds()
    learn.predict(data.valid_ds[0][0])
    assert not learn.model.training


def test_snapshot_epochs_beyond_the_fit_warn_at_its_start():
    # seed 004's save_list=[5, 7] counts epochs from 0; with fewer epochs (or counting from 1) a snapshot was silently
    # never taken, and the interpolation cell failed later with a KeyError
    learn = Learner(make_data(), make_mlp(), silent=True)
    snaps = WeightSnapshots(learn, save_list=[1, 3])
    with pytest.warns(UserWarning, match=r"WeightSnapshots: epoch\(s\) \[3\] .* 3-epoch fit .*0 to 2"):
        learn.fit(3, 1e-2, callbacks=snaps)
    assert sorted(learn.snapshots) == [1]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        learn.fit(4, 1e-2, callbacks=snaps)  # every chosen epoch is reached: nothing to say
    assert sorted(learn.snapshots) == [1, 3]


def test_interpolating_between_identical_weights_warns():
    # seed 004's GetWeights keeps `v.cpu()` of the live state dict: on a CPU run that aliases the model, so both
    # "snapshots" are the final weights and the interpolation is a flat line with nothing to say it is wrong
    learn = Learner(make_data(), make_mlp(), silent=True)
    learn.fit(1, 1e-2)
    live = learn.model.state_dict()
    with pytest.warns(UserWarning, match=r"interpolate_losses: w1 and w2 are the same weights"):
        res = interpolate_losses(learn, live, {k: v.cpu() for k, v in live.items()}, alphas=[0., 1.], bn='keep')
    assert res.loss()[0] == res.loss()[1]
    import warnings
    other = {k: v + 1 for k, v in live.items()}
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        interpolate_losses(learn, live, other, alphas=[0., 1.], bn='keep')


@pytest.mark.parametrize('kw, msg', [
    ({'save_list': 5}, r"save_list must be a list of epochs \(0-based ints\), e\.g\. \[5, 7\]; got 5"),
    ({'save_list': ['a']}, r"save_list must hold epochs as ints \(0-based\); got 'a'"),
    ({'cycle_ends': [1.5]}, r"cycle_ends must hold epochs as ints \(0-based\); got 1\.5"),
    ({'save_list': '57'}, r"save_list must be a list of epochs")])
def test_snapshot_epochs_of_the_wrong_kind_are_named(kw, msg):
    # save_list=5 used to fail as "'int' object is not iterable", ['a'] as int()'s ValueError, 1.5 became epoch 1
    with pytest.raises(TypeError, match=r'WeightSnapshots: ' + msg):
        WeightSnapshots(**kw)
