"""Inference after training: get_preds over any DatasetType with per-item losses, predict on what users have (files,
open_image, PIL, arrays, tensors), batch prediction over files and folders, each against a hand-run model."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch import nn

from minifast import (DataBunch, DatasetType, FlipLR, ImageDataBunch, ImageList, Learner, cifar_resnet, cifar_stats,
                      open_image)
from minifast.data.cache import ImageDecodeError
from conftest import make_data, make_mlp

CLASSES = ['ant', 'bee', 'cat']


def _pixels(c, k, h=10, w=14):
    g = np.random.default_rng(100 * c + k)
    return g.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """train/valid folders of 10×14 PNGs (not the data's size, so every prediction resizes)."""
    for split, n in (('train', 6), ('valid', 3)):
        for c, name in enumerate(CLASSES):
            d = tmp_path / split / name
            d.mkdir(parents=True)
            for k in range(n):
                PILImage.fromarray(_pixels(c, k + 10 * (split == 'valid'))).save(d / f'{k}.png')
    return tmp_path


def _learner(folder, crop, tfms=None):
    data = (ImageList.from_folder(folder).split_by_folder(train='train', valid='valid').label_from_folder()
            .transform(tfms, size=8 if crop else (8, 12)).databunch(bs=4, device='cpu').normalize(cifar_stats))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return Learner(data, model, silent=True)


def _by_hand(learn, x_uint8):
    """The model's probabilities for uint8 images (N, 3, H, W), normalised by hand with the data's stats."""
    mean, std = (torch.tensor(s)[None, :, None, None] for s in cifar_stats)
    with torch.no_grad():
        return learn.model.eval()((x_uint8.float() / 255 - mean) / std).softmax(-1)


@pytest.mark.parametrize('crop', [False, True])
def test_predict_on_a_png_equals_predict_on_the_datasets_copy_of_it(folder, crop):
    learn = _learner(folder, crop)
    ds = learn.data.valid_ds
    for i in (0, 4, 8):
        f = ds.items[i]
        label, idx, probs = learn.predict(f)
        ref = learn.predict(ds.x[i])
        assert torch.equal(probs, ref[2]) and (label, idx) == ref[:2]
        assert label == learn.data.classes[idx] and idx == int(probs.argmax())
        assert torch.allclose(probs, _by_hand(learn, ds.x[i:i + 1])[0], atol=1e-6)
        # every other form of the same file gives the same input, hence the same probabilities
        img = open_image(f)
        assert img.shape == (3, 10, 14)
        pil = PILImage.open(f)
        arr = np.array(pil)
        for other in (str(f), img, pil, arr, arr.astype(np.float32) / 255, torch.from_numpy(arr).permute(2, 0, 1)):
            assert torch.equal(learn.predict(other)[2], probs), type(other)


def test_predict_applies_no_training_augmentation(folder):
    learn = _learner(folder, False, tfms=([FlipLR(p=1.0)], []))
    x = learn.data.valid_ds.x[:1]
    assert torch.allclose(learn.predict(learn.data.valid_ds.items[0])[2], _by_hand(learn, x)[0], atol=1e-6)
    assert not torch.allclose(_by_hand(learn, x.flip(3))[0], _by_hand(learn, x)[0], atol=1e-6)  # a flip would show


def test_predict_files_on_a_folder_and_a_list_and_add_test(folder):
    learn = _learner(folder, False)
    ds = learn.data.valid_ds
    items, labels, idx, probs = learn.predict_files(folder / 'valid')
    assert items == list(ds.items)  # from_folder sorts, as the validation split is
    assert torch.allclose(probs, _by_hand(learn, ds.x), atol=1e-6)
    assert torch.equal(idx, probs.argmax(1)) and labels == [CLASSES[i] for i in idx]
    assert learn.data.test_dl is None  # the data's test set is left as it was
    rev = list(reversed(ds.items))
    assert torch.allclose(learn.predict_files(rev, bs=2)[3], probs.flip(0), atol=1e-6)  # other batches: not bitwise
    learn.data.add_test(rev)
    p, y = learn.get_preds(DatasetType.Test)
    assert torch.allclose(p, probs.flip(0), atol=1e-6) and torch.equal(y, torch.zeros(len(rev), dtype=torch.long))
    assert learn.data.test_ds.items == rev


def test_predict_files_names_an_unreadable_file_or_skips_it(folder):
    learn = _learner(folder, False)
    bad = folder / 'valid' / 'bee' / 'broken.png'
    bad.write_bytes(b'not a png')
    with pytest.raises(ImageDecodeError, match='broken.png'):
        learn.predict_files(folder / 'valid')
    with pytest.warns(UserWarning, match='broken.png'):
        items, _, _, probs = learn.predict_files(folder / 'valid', ignore_errors=True)
    assert bad not in items and len(items) == len(probs) == 9
    with pytest.raises(ImageDecodeError, match='broken.png'):
        learn.predict(bad)
    with pytest.raises(ImageDecodeError, match='broken.png'):
        open_image(bad)
    with pytest.raises(FileNotFoundError, match='missing.png'):
        learn.predict(folder / 'missing.png')


def test_predict_refuses_bad_arrays_naming_the_numbers(folder):
    learn = _learner(folder, False)
    with pytest.raises(ValueError, match=r'\[0, 1\].*2'):
        learn.predict(np.full((10, 14, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match='channels'):
        learn.predict(np.zeros((10, 14, 5), np.uint8))


def test_get_preds_with_loss_equals_the_loss_function_item_by_item():
    data = make_data()
    learn = Learner(data, make_mlp(), silent=True)
    x, y = data.valid_dl.tensors
    with torch.no_grad():
        out = learn.model(x)
    p, t, loss = learn.get_preds(with_loss=True)
    assert torch.allclose(loss, F.cross_entropy(out, y, reduction='none'), atol=1e-6)
    assert torch.allclose(p, out.softmax(-1), atol=1e-6) and torch.equal(t, y)
    learn.loss_func = nn.CrossEntropyLoss(label_smoothing=0.1)
    assert torch.allclose(learn.get_preds(with_loss=True)[2],
                          F.cross_entropy(out, y, reduction='none', label_smoothing=0.1), atol=1e-6)
    assert learn.loss_func.reduction == 'mean'  # the user's module is not changed
    learn.loss_func = lambda o, t: F.cross_entropy(o, t)
    with pytest.raises(TypeError, match='reduction'):
        learn.get_preds(with_loss=True)


def test_get_preds_over_the_fix_and_test_sets_and_n_batch():
    data = make_data(n_train=40, bs=16)
    learn = Learner(data, make_mlp(), silent=True)
    x, y = data.train_dl.tensors
    p, t = learn.get_preds(DatasetType.Fix)
    assert torch.equal(t, y) and len(p) == 40  # in order and nothing dropped (the train loader drops 8)
    with torch.no_grad():
        assert torch.allclose(p, learn.model(x).softmax(-1), atol=1e-6)
    assert len(learn.get_preds(DatasetType.Fix, n_batch=2)[0]) == 32
    with pytest.raises(ValueError, match='add_test'):
        learn.get_preds(DatasetType.Test)
    with pytest.raises(TypeError, match='DatasetType'):
        learn.data.dl('valid')
    with pytest.raises(TypeError, match='not image data'):
        learn.predict(PILImage.new('RGB', (4, 4)))
    assert isinstance(data, DataBunch) and learn.predict(x[0])[1] == int(p[0].argmax())


def test_image_shows_itself_and_keeps_its_pixels(folder):
    f = folder / 'train' / 'ant' / '0.png'
    img = open_image(f)
    assert torch.equal(img.uint8().permute(1, 2, 0), torch.from_numpy(_pixels(0, 0)))
    assert img.data.max() <= 1 and open_image(f, div=False).data.max() > 1
    fig = img.show(title='ant')
    assert fig.axes[0].get_title() == 'ant'
    assert img._repr_png_().startswith(b'\x89PNG')
    assert ImageDataBunch is not None


def test_predict_resizes_as_the_data_was_resized_from_tensors_too(tmp_path):
    # from_tensors resizes with torch's antialiased interpolate, decoded files with PIL: an image of the original
    # size must go the way the data's own images went, also after an export (the spec carries it)
    from minifast import load_learner
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 20, 20, 3), generator=g, dtype=torch.uint8)  # NHWC, 20x20
    y = torch.arange(12) % 3
    data = ImageDataBunch.from_tensors(x[:8], y[:8], x[8:], y[8:], size=12, bs=4, device='cpu').normalize()
    assert data.input_spec()['resize'] == 'torch'
    torch.manual_seed(0)
    learn = Learner(data, cifar_resnet(8, 3), silent=True, path=tmp_path)
    raw = x[9].numpy()
    ref = learn.predict(data.valid_ds.x[1])[2]
    assert torch.equal(learn.predict(raw)[2], ref)
    assert torch.equal(learn.predict(PILImage.fromarray(raw))[2], ref)
    f = tmp_path / 'one.png'
    PILImage.fromarray(raw).save(f)
    assert torch.equal(learn.predict(f)[2], ref)
    learn.export()
    loaded = load_learner(tmp_path)
    assert torch.equal(loaded.predict(f)[2], ref)
    assert torch.allclose(loaded.predict_files([f])[3][0], ref, atol=1e-6)
