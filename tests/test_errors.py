"""Bad input fails early with a message that names the thing, and leaves the model untouched."""
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from minifast import DataBunch, Learner, accuracy
from conftest import make_data, make_mlp


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model, w0):
    return all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


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


def test_validate_without_validation_set():
    learn = Learner(make_data(n_valid=0), make_mlp(), silent=True)
    with pytest.raises(ValueError, match=r'no validation set \(data.valid_dl is None\)'):
        learn.validate()
    learn.fit(1)
    assert learn.recorder.val_losses == [None]


def test_from_tensors_length_mismatch():
    with pytest.raises(ValueError, match=r'x_train has 10 items but y_train has 9'):
        DataBunch.from_tensors(torch.zeros(10, 2), torch.zeros(9))
    with pytest.raises(ValueError, match=r'x_valid and y_valid must be given together'):
        DataBunch.from_tensors(torch.zeros(10, 2), torch.zeros(10), torch.zeros(3, 2))


def test_plain_torch_dataloader_works():
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    dl = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    learn = Learner(DataBunch(dl, DataLoader(TensorDataset(x, y), batch_size=16)), make_mlp(), silent=True)
    learn.fit(2)
    assert learn.recorder.nb_batches == [5, 5] and learn.recorder.val_losses[-1] > 0


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


@pytest.mark.parametrize('kw, msg', [(dict(bs=2.5), r'batch_size must be an integer >= 1, got 2\.5'),
                                     (dict(bs=0), r'batch_size must be an integer >= 1, got 0'),
                                     (dict(val_bs=0), r'batch_size must be an integer >= 1, got 0')])
def test_from_tensors_bad_batch_sizes(kw, msg):
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    with pytest.raises(ValueError, match=msg):
        DataBunch.from_tensors(x, y, x, y, **kw)


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


@pytest.mark.parametrize('groups', [[3], 3])
def test_layer_groups_that_are_not_modules_are_named(groups):
    # [3] used to fail as "'int' object is not iterable"
    with pytest.raises(TypeError, match=r'layer group 0 is a int \(3\); a layer group is a module or a list of modules'
                       if groups == [3] else r'Learner: layer_groups must be a list of layer groups'):
        Learner(make_data(), make_mlp(), layer_groups=groups)
