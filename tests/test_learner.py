"""The Learner: the loop against a hand-written reference, validate, get_preds/predict, save/load, the constructor's
arguments, plain torch DataLoaders, metric errors."""
import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from minifast import Callback, DataBunch, Learner, accuracy, error_rate, synthetic_classification, top_k_accuracy
from minifast.learner import LoopState
from conftest import make_data, make_mlp, reference_fit
from helpers import assert_same_weights, learner_fit


def test_fit_equals_hand_written_adamw_loop_bitwise():
    data = make_data(n_train=96)
    m1, m2 = make_mlp(), make_mlp()
    learner_fit(m1, data, 3, 1e-2, seed=1, wd=0.1)
    reference_fit(m2, data, torch.optim.AdamW(m2.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1), 3, 1)
    assert_same_weights(m1, m2)


def test_loss_falls_on_a_learnable_problem():
    torch.manual_seed(0)
    data = DataBunch.from_tensors(*synthetic_classification(n_train=2048, n_valid=512), bs=64)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    learn = Learner(data, model, metrics=[accuracy], silent=True)
    before, _ = learn.validate()
    learn.fit(4, 3e-3)
    after, acc = learn.validate()
    assert after < 0.5 * before and acc > 0.7
    assert learn.recorder.train_losses[-1] < learn.recorder.train_losses[0]


def test_validate_equals_manual_evaluation_with_uneven_last_batch():
    data = make_data(n_train=48, n_valid=50, bs=16)
    learn = Learner(data, make_mlp(), metrics=[accuracy, top_k_accuracy, error_rate], silent=True)
    learn.fit(1, 1e-2)
    xv, yv = data.valid_dl.tensors
    with torch.no_grad():
        out = learn.model.eval()(xv)
    loss = F.cross_entropy(out, yv).item()
    acc = (out.argmax(1) == yv).float().mean().item()
    top2 = (out.topk(3, 1).indices == yv[:, None]).any(1).float().mean().item()  # k=5 > 3 classes: all
    res = learn.validate()
    assert res == pytest.approx([loss, acc, top2, 1 - acc], abs=1e-6)
    assert top2 == 1.0
    assert all(isinstance(v, float) for v in res)
    xt, yt = data.train_dl.tensors
    with torch.no_grad():
        tl = F.cross_entropy(learn.model(xt), yt).item()
    assert learn.validate(data.train_dl)[0] == pytest.approx(tl, abs=1e-6)  # no drop: 48 = 3 * 16
    assert learn.validate(metrics=[error_rate]) == pytest.approx([loss, 1 - acc], abs=1e-6)


def test_validate_without_validation_set():
    learn = Learner(make_data(n_valid=0), make_mlp(), silent=True)
    with pytest.raises(ValueError, match=r'no validation set \(data.valid_dl is None\)'):
        learn.validate()
    learn.fit(1)
    assert learn.recorder.val_losses == [None]


def test_get_preds_and_predict():
    data = make_data(n_valid=20)
    data.classes = ['a', 'b', 'c']
    learn = Learner(data, make_mlp(), silent=True)
    learn.fit(1)
    probs, targs = learn.get_preds()
    xv, yv = data.valid_dl.tensors
    with torch.no_grad():
        ref = learn.model.eval()(xv).softmax(1)
    torch.testing.assert_close(probs, ref)
    assert torch.equal(targs, yv)
    label, idx, p = learn.predict(xv[3])
    torch.testing.assert_close(p, ref[3])
    assert idx == int(ref[3].argmax()) and label == 'abc'[idx]


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


def test_save_load_roundtrip_and_mismatch_leaves_model_untouched(tmp_path):
    learn = Learner(make_data(), make_mlp(), path=tmp_path, silent=True)
    learn.fit(1, 1e-2)
    file = learn.save('stage1')
    assert file == tmp_path / 'models' / 'stage1.pth'
    assert os.listdir(file.parent) == ['stage1.pth']  # no temporary file left behind
    other = Learner(make_data(), make_mlp(seed=5), path=tmp_path, silent=True)
    other.load('stage1')
    assert_same_weights(learn.model, other.model)
    assert other.opt is not None and len(other.opt.state) == len(learn.opt.state)
    s1, s2 = learn.opt.state_dict()['state'], other.opt.state_dict()['state']
    assert all(torch.equal(s1[k]['exp_avg'], s2[k]['exp_avg']) for k in s1)

    wide = Learner(make_data(), make_mlp(hidden=32), path=tmp_path, silent=True)
    before = copy.deepcopy(wide.model.state_dict())
    with pytest.raises(ValueError, match=r'stage1\.pth does not match the model.*0\.weight: file \(16, 8\) vs '
                                         r'model \(32, 8\).*left unchanged'):
        wide.load('stage1')
    assert all(torch.equal(before[k], v) for k, v in wide.model.state_dict().items())
    with pytest.raises(FileNotFoundError, match=r'nope\.pth.*stage1\.pth'):
        learn.load('nope')


def test_bf16_and_channels_last_flags_run_on_cpu():
    x = torch.randn(64, 3, 8, 8)
    y = torch.randint(0, 3, (64,))
    data = DataBunch.from_tensors(x, y, x[:16], y[:16], bs=16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    seen = []

    class Spy(Callback):
        def after_pred(self, learn):
            seen.append((learn.xb[0].is_contiguous(memory_format=torch.channels_last), learn.pred.dtype))

    learn = Learner(data, model, bf16=True, channels_last=True, silent=True, callbacks=[Spy()])
    learn.fit(1, 1e-2)
    assert seen[0] == (True, torch.bfloat16)
    assert learn.model[0].weight.dtype == torch.float32  # autocast: weights stay fp32
    assert all(v == v for v in learn.validate())


def test_plain_torch_dataloader_works():
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    dl = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    learn = Learner(DataBunch(dl, DataLoader(TensorDataset(x, y), batch_size=16)), make_mlp(), silent=True)
    learn.fit(2)
    assert learn.recorder.nb_batches == [5, 5] and learn.recorder.val_losses[-1] > 0


def test_data_without_train_dl():
    with pytest.raises(TypeError, match=r'data must have a `train_dl`.*got Tensor.*DataBunch'):
        Learner(torch.zeros(3), make_mlp())


def test_data_without_valid_dl_attribute():
    class OnlyTrain:
        train_dl = make_data().train_dl
    with pytest.raises(TypeError, match=r'OnlyTrain\) has `train_dl` but no `valid_dl`.*valid_dl=None'):
        Learner(OnlyTrain(), make_mlp())


def test_metric_not_callable():
    with pytest.raises(TypeError, match=r"metrics\[1\] is 5 \(int\), which is not callable"):
        Learner(make_data(), make_mlp(), metrics=[accuracy, 5])
    learn = Learner(make_data(), make_mlp())
    with pytest.raises(TypeError, match=r"metrics\[0\] is 'accuracy' \(str\)"):
        learn.validate(metrics=['accuracy'])


def test_a_metric_that_raises_is_named_with_the_shapes():
    def bad_metric(pred, targ):
        return (pred.argmax(-1) == targ[:, None]).float().mean(1)[16]  # an index error

    learn = Learner(make_data(), make_mlp(), metrics=[accuracy, bad_metric])
    with pytest.raises(RuntimeError, match=r'metric bad_metric raised IndexError on validation batch 0 '
                                           r'\(predictions of shape \(\d+, \d+\), targets of shape \(\d+,\)\)'):
        learn.validate()


@pytest.mark.parametrize('kw, msg', [
    (dict(model=None), r'Learner: model must be a torch.nn.Module, got NoneType'),
    (dict(model='resnet'), r"Learner: model must be a torch.nn.Module, got str 'resnet'"),
    (dict(loss_func='ce'), r"Learner: loss_func must be a function \(pred, target\) -> loss .*got str 'ce'"),
    (dict(opt_func='adam'), r"Learner: opt_func must be a function or class .*not str 'adam'"),
    (dict(opt_func=torch.optim.SGD(make_mlp().parameters(), lr=0.1)), r'Learner: opt_func .*not SGD'),
    (dict(callbacks=[3]), r'3 \(int\) is not a callback'),
    (dict(callback_fns=[lambda learn: None]), r'None \(NoneType\) is not a callback')])
def test_learner_arguments_of_the_wrong_kind(kw, msg):
    args = {'model': make_mlp(), 'silent': True, **kw}
    with pytest.raises(TypeError, match=msg):
        Learner(make_data(), **args)


def test_learner_path_none_is_the_datas_folder_and_bad_folders_are_named(tmp_path):
    data = make_data()
    data.path = tmp_path / 'data'
    assert Learner(data, make_mlp(), path=None).path == tmp_path / 'data'  # fastai v1's default
    assert Learner(data, make_mlp()).path == Path('.')
    assert Learner(make_data(), make_mlp(), path=None).path == Path('.')  # data without a folder
    with pytest.raises(TypeError, match=r"Learner: model_dir must be a folder \(a str or Path\), got None"):
        Learner(data, make_mlp(), model_dir=None)  # used to fail only at the first save
    with pytest.raises(TypeError, match=r"Learner: path must be a folder \(a str or Path\), got 3"):
        Learner(data, make_mlp(), path=3)


def test_validate_inside_a_fit_swaps_the_loop_state_and_puts_the_fits_back():
    seen = {}

    class Probe(Callback):
        def after_batch(self, learn):
            if learn.training and learn.iter == 1 and 'outer' not in seen:
                outer = learn.state
                seen['outer'] = (outer, learn.xb, learn.loss, learn.iter, learn.hooks)
                seen['valid'] = learn.validate()
                seen['after'] = (learn.state, learn.xb, learn.loss, learn.iter, learn.hooks)

    learn = Learner(make_data(), make_mlp(), callbacks=[Probe()])
    learn.fit(1, 1e-2)
    assert all(a is b for a, b in zip(seen['outer'], seen['after']))
    assert len(seen['valid']) == 1 and math.isfinite(seen['valid'][0])
    assert learn.hooks is None and isinstance(learn.state, LoopState)
    assert set(LoopState.__slots__) >= {'xb', 'yb', 'pred', 'loss', 'iter', 'n_iter', 'dl', 'training', 'hooks'}
