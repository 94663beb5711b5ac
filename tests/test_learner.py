"""The loop against hand-written references: weights after fit, weight-decay modes, validate, preds, save/load."""
import copy
import os
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minifast import DataBunch, Learner, accuracy, error_rate, synthetic_classification, top_k_accuracy
from conftest import make_data, make_mlp, reference_fit


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


def test_fit_equals_hand_written_adamw_loop_bitwise():
    data = make_data(n_train=96)
    m1, m2 = make_mlp(), make_mlp()
    learner_fit(m1, data, 3, 1e-2, seed=1, wd=0.1)
    reference_fit(m2, data, torch.optim.AdamW(m2.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1), 3, 1)
    assert_same_weights(m1, m2)


def test_l2_weight_decay_equals_torch_adam_weight_decay():
    data = make_data(n_train=96)
    m1, m2 = make_mlp(), make_mlp()
    learner_fit(m1, data, 2, 1e-2, seed=2, wd=0.05, true_wd=False)
    reference_fit(m2, data, torch.optim.Adam(m2.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05), 2, 2)
    assert_same_weights(m1, m2, atol=1e-6)


def test_true_wd_with_sgd_is_decoupled():
    data = make_data(n_train=96)
    m1, m2 = make_mlp(), make_mlp()
    lr, wd = 0.05, 0.1
    learner_fit(m1, data, 2, lr, seed=3, wd=wd, opt_func=partial(torch.optim.SGD, momentum=0.9))
    opt = torch.optim.SGD(m2.parameters(), lr=lr, momentum=0.9)

    def decay():
        with torch.no_grad():
            for p in m2.parameters():
                p.mul_(1 - lr * wd)
    reference_fit(m2, data, opt, 2, 3, before_step=decay)
    assert_same_weights(m1, m2, atol=1e-6)


def test_bn_wd_false_spares_norm_layers_and_biases():
    def bn_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    data = make_data(n_train=96)
    m1, m2 = bn_model(), bn_model()
    learn = learner_fit(m1, data, 2, 1e-2, seed=4, wd=0.2, bn_wd=False)
    decay = [m2[0].weight, m2[3].weight]
    rest = [m2[0].bias, m2[1].weight, m2[1].bias, m2[3].bias]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.2}, {'params': rest, 'weight_decay': 0.}], lr=1e-2,
                            betas=(0.9, 0.99))
    reference_fit(m2, data, opt, 2, 4)
    assert_same_weights(m1, m2, atol=1e-6)
    assert sorted(g['wd'] for g in learn.opt.param_groups) == [0., 0.2]


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


def test_metrics_against_hand_computed_values():
    out = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5], [0.5, 0.2, 0.3]])
    y = torch.tensor([1, 2, 2, 1])
    assert accuracy(out, y).item() == pytest.approx(0.5)
    assert error_rate(out, y).item() == pytest.approx(0.5)
    assert top_k_accuracy(out, y, k=2).item() == pytest.approx(0.75)  # rows 0, 1, 2 have the target in their top 2
    big = torch.randn(200, 20)
    yb = torch.randint(0, 20, (200,))
    ranks = (big > big.gather(1, yb[:, None])).sum(1)  # how many classes score above the target
    assert top_k_accuracy(big, yb).item() == pytest.approx((ranks < 5).float().mean().item())


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


def test_optimizer_persists_across_fits_and_lr_per_layer_group():
    model = make_mlp()
    learn = Learner(make_data(), model, silent=True, layer_groups=[model[0], model[2]])
    learn.fit(1, slice(1e-4, 1e-2))
    opt = learn.opt
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([1e-4, 1e-2])
    learn.fit(1, [1e-3, 2e-3])
    assert learn.opt is opt and [g['lr'] for g in opt.param_groups] == pytest.approx([1e-3, 2e-3])
    assert len(opt.state) == 4  # Adam moments kept from the first fit
    learn.fit(1, slice(1e-2))
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([1e-3, 1e-2])
    with pytest.raises(ValueError, match='lr has 3 values but the learner has 2 layer groups'):
        learn.fit(1, [1e-3, 1e-3, 1e-3])


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


from minifast import Callback  # noqa: E402
