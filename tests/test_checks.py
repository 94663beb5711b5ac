"""What fit checks before any training step: the data (labels against the classes and the model's outputs, label
dtypes, empty loaders, finite inputs), epochs, lr and wd. A failure names the numbers and leaves the model as it
was."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from minifast import DataBunch, Learner, TensorDataLoader
from minifast.checks import check_finite_inputs, check_wd, int_at_least, real_value
from conftest import make_data, make_mlp
from helpers import _mlp_learner, same_state, snapshot


def bn_model(n_out=3, n_in=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, n_out))


def same_params(model, snap):
    return all(torch.equal(p, snap[k]) for k, p in model.named_parameters())


def count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


def learner(data, model, **kw):
    return Learner(data, model, silent=True, **kw)


def test_train_labels_out_of_range_beyond_the_first_batch():
    x, y = torch.randn(1000, 8), torch.arange(1000) % 10
    y[-37:] = torch.arange(37) % 3 + 10  # 10, 11, 12 in the last batch only
    data = DataBunch.from_tensors(x, y, bs=100, shuffle=False, classes=[str(i) for i in range(10)])
    model = bn_model(n_out=10)
    snap, calls = snapshot(model), count_forwards(model)
    learn = learner(data, model)
    with pytest.raises(ValueError, match=r'train labels: 37 of 1000 are outside \[0, 10\) \(largest 12\): '
                                         r'target value 12 is out of range for 10 classes'):
        learn.fit(1)
    with pytest.raises(ValueError, match=r'train labels: 37 of 1000'):
        learn.fit_one_cycle(1)
    assert calls == [] and same_state(model, snap)


def test_valid_labels_negative_in_a_torch_dataloader():
    x, y = torch.randn(64, 8), torch.arange(64) % 3
    xv, yv = torch.randn(20, 8), torch.arange(20) % 3
    yv[3], yv[7] = -5, -1
    data = DataBunch(TensorDataLoader(x, y, batch_size=16), DataLoader(TensorDataset(xv, yv), batch_size=10), c=3)
    model = bn_model()
    snap, calls = snapshot(model), count_forwards(model)
    with pytest.raises(ValueError, match=r'valid labels: 2 of 20 are outside \[0, 3\) \(smallest -5\)'):
        learner(data, model).fit(1)
    assert calls == [] and same_state(model, snap)


def test_both_ends_and_nll_loss():
    x, y = torch.randn(64, 8), torch.arange(64) % 3
    y[0], y[1], y[2] = -2, 7, 9
    data = DataBunch(TensorDataLoader(x, y, batch_size=16), None, c=3)
    with pytest.raises(ValueError, match=r'train labels: 3 of 64 are outside \[0, 3\) \(smallest -2, largest 9\): '
                                         r'target value -2 .* nll_loss needs class indices 0\.\.2'):
        learner(data, make_mlp(), loss_func=F.nll_loss).fit(1)


def test_without_data_c_only_negative_labels_fail_at_fit_start():
    x, y = torch.randn(64, 8), torch.arange(64) % 3
    y[40] = -1
    model = make_mlp()
    calls = count_forwards(model)
    learn = learner(DataBunch(TensorDataLoader(x, y, batch_size=16), None), model)
    with pytest.raises(ValueError, match=r'train labels: 1 of 64 are negative \(smallest -1\)'):
        learn.fit(1)
    assert calls == []
    y[40], y[0] = 1, 50  # too large, but without data.c only the first batch's check against the model sees it
    with pytest.raises(ValueError, match=r'target value 50 is out of range for a model with 3 outputs'):
        learn.fit(1)


def test_ignore_index_labels_are_skipped():
    x, y = torch.randn(64, 8), torch.arange(64) % 3
    y[::5] = -100
    learn = learner(DataBunch(TensorDataLoader(x, y, batch_size=16), None, c=3), make_mlp())
    learn.fit(1)
    assert len(learn.recorder.raw_losses) == 4
    y[::5] = 255  # from_tensors infers c=256 from the 255s; neither check may refuse that
    learn = learner(DataBunch.from_tensors(x, y, bs=16), make_mlp(), loss_func=nn.CrossEntropyLoss(ignore_index=255))
    learn.fit(1)
    assert learn.data.c == 256 and len(learn.recorder.raw_losses) == 4
    y[::5] = -100  # with ignore_index=255, -100 is an ordinary (bad) label
    learn = learner(DataBunch(TensorDataLoader(x, y, batch_size=16), None, c=3), make_mlp(),
                    loss_func=nn.CrossEntropyLoss(ignore_index=255))
    with pytest.raises(ValueError, match=r'13 of 64 are outside \[0, 3\) \(smallest -100\).*ignore_index 255'):
        learn.fit(1)


def test_other_losses_are_not_checked():
    x, y = torch.randn(64, 8), torch.arange(64) * 7  # labels far above the model's 3 outputs
    learn = learner(DataBunch(TensorDataLoader(x, y, batch_size=16), None, c=3), make_mlp(),
                    loss_func=lambda p, t: F.cross_entropy(p, t % 3))
    learn.fit(1)
    assert len(learn.recorder.raw_losses) == 4


def test_float_labels_fail_before_the_first_forward():
    x, y = torch.randn(50, 8), (torch.arange(50) % 3).float()
    model = bn_model()
    snap, calls = snapshot(model), count_forwards(model)
    with pytest.raises(TypeError, match=r'cross_entropy expects integer class targets \(torch\.int64\) of shape '
                                        r'\(16,\).*\(train labels: torch\.float32, shape \(50,\)\).*y\.long\(\)'):
        learner(DataBunch.from_tensors(x, y, bs=16), model).fit(1)
    assert calls == [] and same_state(model, snap)


def _width_learner():
    x, y = torch.randn(64, 8), torch.arange(64) % 10
    data = DataBunch.from_tensors(x, y, x[:20], y[:20], bs=16, classes=list('abcdefghij'))
    model = bn_model(n_out=12)
    return learner(data, model), model


def test_a_class_count_guessed_from_the_labels_accepts_a_wider_model():
    x, y = torch.randn(64, 8), torch.arange(64) % 10  # class 10 and 11 may just be absent from this sample
    data = DataBunch.from_tensors(x, y, bs=16)
    assert data.c == 10 and data.c_inferred
    learner(data, bn_model(n_out=12)).fit(1)
    with pytest.raises(ValueError, match=r'target value [89] is out of range for a model with 8 outputs'):
        learner(data, bn_model(n_out=8)).fit(1)


def test_model_output_width_against_data_c():
    learn, model = _width_learner()
    snap = snapshot(model)
    assert learn.data.c == 10
    with pytest.raises(ValueError, match=r'the model outputs 12 values per item but the data has 10 classes '
                                         r'\(data\.c\)'):
        learn.fit(1)
    assert same_params(model, snap)
    with pytest.raises(ValueError, match=r'outputs 12 values .* 10 classes'):
        learn.validate()


def test_model_output_width_error_leaves_batchnorm_buffers_unchanged():
    learn, model = _width_learner()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r'outputs 12 values'):
        learn.fit(1)
    assert same_state(model, snap)


def test_explicit_classes_must_match_the_model():
    x, y = torch.randn(64, 8), torch.arange(64) % 3
    data = DataBunch.from_tensors(x, y, bs=16, classes=['a', 'b', 'c', 'd'])
    with pytest.raises(ValueError, match=r'the model outputs 3 values per item but the data has 4 classes'):
        learner(data, make_mlp()).fit(1)


def test_empty_validation_loader():
    x, y = torch.randn(64, 8), torch.arange(64) % 3
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    model = bn_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r'the validation DataLoader is empty \(0 batches from 0 items'):
        learner(DataBunch(TensorDataLoader(x, y, batch_size=16), empty), model).fit(1)
    assert same_state(model, snap)


def test_drop_last_with_less_than_a_batch():
    x, y = torch.randn(50, 8), torch.arange(50) % 3
    short = TensorDataLoader(x, y, batch_size=64, drop_last=True)
    with pytest.raises(ValueError, match=r'validation DataLoader is empty.*: drop_last=True with 50 items and '
                                         r'batch_size=64 gives no batches: lower bs or set drop_last=False'):
        learner(DataBunch(TensorDataLoader(x, y, batch_size=16), short), make_mlp()).fit(1)
    with pytest.raises(ValueError, match=r'training DataLoader is empty.*: drop_last=True with 50 items and '
                                         r'batch_size=64 gives no batches: lower bs or set drop_last=False'):
        learner(DataBunch.from_tensors(x, y, bs=64), make_mlp()).fit(1)


def test_check_finite_inputs_counts_nan_and_inf():
    x0, x1 = torch.randn(4, 3), torch.randn(4, 5)
    x1[0, 0] = x1[2, 1] = float('nan')
    x1[1, 1], x1[3, 4], x1[3, 3] = float('inf'), -float('inf'), float('inf')
    with pytest.raises(ValueError, match=r'epoch 2, batch 7: input 1 \(shape \(4, 5\), torch\.float32\) holds 2 NaN '
                                         r'and 3 inf of 20 values'):
        check_finite_inputs((x0, x1), 2, 7)
    with pytest.raises(ValueError, match=r'epoch 0, batch 0: input 0 .* holds 1 NaN and 0 inf'):
        check_finite_inputs(torch.tensor([1., float('nan')], dtype=torch.bfloat16), 0, 0)


def test_check_finite_inputs_passes_clean_and_non_float_inputs():
    ids = torch.tensor([[1, 2], [3, 4]])
    assert check_finite_inputs((torch.randn(4, 3), ids, torch.ones(2, dtype=torch.bool)), 0, 1) is None
    assert check_finite_inputs(torch.randn(3), 1, 0) is None
    assert check_finite_inputs((), 0, 0) is None


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model, w0):
    return all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


def test_target_out_of_range_names_both_numbers_before_any_step():
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    y[5] = 12
    model = make_mlp(n_out=10)
    w0 = weights(model)
    learn = Learner(DataBunch.from_tensors(x, y, bs=32, shuffle=False), model, silent=True)
    with pytest.raises(ValueError, match=r'target value 12 is out of range for a model with 10 outputs '
                                         r'\(valid targets are 0\.\.9\)'):
        learn.fit(1)
    assert unchanged(model, w0)
    y[5] = -3
    with pytest.raises(ValueError, match=r'target value -3 is out of range'):
        learn.fit(1)


def test_target_out_of_range_in_validate():
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    data = DataBunch.from_tensors(x, y, x, torch.full((32,), 7), bs=16)
    learn = Learner(data, make_mlp(n_out=3), silent=True)
    with pytest.raises(ValueError, match=r'target value 7 .* 3 outputs'):
        learn.validate()


def test_float_targets_for_cross_entropy():
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,)).float()
    model = make_mlp()
    w0 = weights(model)
    learn = Learner(DataBunch.from_tensors(x, y, bs=16), model, silent=True)
    with pytest.raises(TypeError, match=r'cross_entropy expects integer class targets \(torch\.int64\) of shape '
                                        r'\(16,\).*got torch\.float32 targets of shape \(16,\).*y\.long\(\)'):
        learn.fit(1)
    assert unchanged(model, w0)


def test_soft_float_targets_of_the_output_shape_are_allowed():
    x = torch.randn(32, 8)
    y = torch.softmax(torch.randn(32, 3), 1)
    learn = Learner(DataBunch.from_tensors(x, y, bs=16), make_mlp(), silent=True)
    learn.fit(1)
    assert len(learn.recorder.raw_losses) == 2


def test_empty_training_dataloader():
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    learn = Learner(DataBunch.from_tensors(x, y, bs=64), make_mlp(), silent=True)
    with pytest.raises(ValueError, match=r'training DataLoader is empty \(0 batches from 10 items with '
                                         r'batch_size=64, drop_last=True\)'):
        learn.fit(1)
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    learn = Learner(DataBunch(empty, None), make_mlp(), silent=True)
    with pytest.raises(ValueError, match=r'0 batches from 0 items'):
        learn.fit(1)


def test_training_loader_without_len_that_yields_nothing():
    class Gen:
        def __iter__(self):
            return iter(())
    learn = Learner(DataBunch(Gen(), None), make_mlp(), silent=True)
    with pytest.raises(ValueError, match='yielded no batches'):
        learn.fit(1)


@pytest.mark.parametrize('epochs', [-1, 1.5, '3', True])
def test_bad_epochs(epochs):
    learn = Learner(make_data(), make_mlp(), silent=True)
    with pytest.raises(ValueError, match=r'epochs must be a non-negative integer'):
        learn.fit(epochs)


def test_numpy_integer_epochs():
    import numpy as np
    learn = Learner(make_data(), make_mlp(), silent=True)
    learn.fit(np.int64(2))
    assert learn.n_epoch == 2 and len(learn.recorder.train_losses) == 2
    learn.validate()
    assert learn.n_epoch == 2


# ---- hyper-parameters: rejected before any step, naming the argument and the value ------------------------------
@pytest.mark.parametrize('lr', [float('nan'), float('inf'), -1e-3, 'a', None, [1e-3, float('nan')]])
def test_bad_learning_rates_fail_before_any_step(lr):
    learn = _mlp_learner()
    snap = snapshot(learn.model)
    lr1 = lr if not isinstance(lr, list) else lr[1]
    with pytest.raises(ValueError, match=r'lr must be a finite number >= 0 .*got ' + repr(lr1).replace('.', r'\.')):
        learn.fit(1, lr if not isinstance(lr, list) else lr[1:])
    learn.fit(1, 1e-3)  # the optimizer exists now: a later fit checks as well (it used to train with lr=-1)
    snap = snapshot(learn.model)
    with pytest.raises(ValueError, match=r'lr must be a finite number >= 0'):
        learn.fit(1, lr if not isinstance(lr, list) else lr[1:])
    assert same_state(learn.model, snap) and len(learn.recorder.lrs) == 3


@pytest.mark.parametrize('wd', [-1e-2, float('nan'), float('inf'), 'x', [1e-2, -1.]])
def test_bad_weight_decay_fails_before_any_step(wd):
    with pytest.raises(ValueError, match=r'Learner: wd must be a finite number >= 0 \(or one per layer group\), got '):
        _mlp_learner(wd=wd)
    learn = _mlp_learner()
    snap = snapshot(learn.model)
    with pytest.raises(ValueError, match=r'fit: wd must be a finite number >= 0 \(or one per layer group\), got '):
        learn.fit(1, 1e-3, wd=wd)
    with pytest.raises(ValueError, match=r'fit: wd must be a finite number >= 0'):
        learn.fit_one_cycle(1, 1e-3, wd=wd)
    with pytest.raises(ValueError, match=r'fit: wd must be a finite number >= 0'):
        learn.lr_find(num_it=5, wd=wd)
    assert same_state(learn.model, snap) and learn.recorder.lrs == []
    learn.fit(1, 1e-3, wd=0)  # 0 and per-group lists stay allowed
    learn.fit(1, 1e-3, wd=[1e-4])


# ---- the shared validators (real_value, int_at_least) -----------------------------------------------------------
@pytest.mark.parametrize('v, kw, expected', [
    (0.5, {}, 0.5), (3, {}, 3.0), (np.float32(0.25), {}, 0.25), (np.int64(2), dict(low=0), 2.0),
    (0, dict(low=0), 0.0), (1, dict(low=0, high=1), 1.0),
    (0.5, dict(low=0, high=1, low_open=True, high_open=True), 0.5),
    (torch.tensor(0.5), dict(coerce=True), 0.5), (np.array(2.), dict(low=0, coerce=True), 2.0)])
def test_real_value_returns_a_float(v, kw, expected):
    out = real_value(v, 'x', 'f', **kw)
    assert type(out) is float and out == expected

@pytest.mark.parametrize('v, kw, message', [
    (float('nan'), {}, 'f: x must be a finite number, got nan'),
    (float('inf'), dict(low=0), 'f: x must be a finite number, got inf'),
    (True, {}, 'f: x must be a finite number, got True'),
    ('1', {}, "f: x must be a finite number, got '1'"),
    (torch.tensor(0.5), {}, 'f: x must be a finite number, got tensor(0.5000)'),
    ('1', dict(coerce=True), "f: x must be a finite number, got '1'"),
    (-1, dict(low=0), 'f: x must be >= 0, got -1'),
    (0, dict(low=0, low_open=True), 'f: x must be > 0, got 0'),
    (1.5, dict(low=0, high=1), 'f: x must be <= 1, got 1.5'),
    (1, dict(high=1, high_open=True), 'f: x must be < 1, got 1'),
    (2e-5, dict(low=1e-4), 'f: x must be >= 0.0001, got 2e-05'),
    (-1, dict(low=0, message='whole message'), 'whole message'),
    (float('nan'), dict(message='whole message'), 'whole message')])
def test_real_value_names_the_first_failed_test(v, kw, message):
    with pytest.raises(ValueError) as e:
        real_value(v, 'x', 'f', **kw)
    assert str(e.value) == message

def test_int_at_least():
    assert int_at_least(3, 'n', 'f') == 3 and int_at_least(np.int64(0), 'n', 'f', low=0) == 0
    for v, low in ((0, 1), (2.0, 1), (True, 0), ('2', 1), (-1, 0)):
        with pytest.raises(ValueError) as e:
            int_at_least(v, 'n', 'f', low=low)
        assert str(e.value) == f'f: n must be an integer >= {low}, got {v!r}'

def test_check_wd_uses_the_shared_validator_and_keeps_its_message():
    assert check_wd([0.1, 0], 'fit') == [0.1, 0]
    with pytest.raises(ValueError) as e:
        check_wd([0.1, float('nan')], 'fit')
    assert str(e.value) == 'fit: wd must be a finite number >= 0 (or one per layer group), got [0.1, nan]'
