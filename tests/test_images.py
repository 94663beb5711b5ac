"""The ImageList chain on small generated folders: decoding, cache, labels, bad input, batches, show_batch."""
import os
import warnings

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import minifast.data.cache as cache_mod
from minifast import ImageDataBunch, ImageList, Learner, cifar_stats
from minifast.data.cache import ImageDecodeError

CLASSES = ['ant', 'bee', 'cat']


def pixels(cls_idx, k, size=8):
    """A deterministic image for class `cls_idx`, item k: every pixel differs, so order and layout are checkable."""
    r = np.arange(size * size, dtype=np.int64).reshape(size, size)
    img = np.stack([(r * 3 + k) % 256, (r * 5 + 40 * cls_idx) % 256, (r + 7 * k + cls_idx) % 256], -1)
    return img.astype(np.uint8)


def make_folder(root, n_train=4, n_valid=2, size=8, splits=('train', 'test')):
    expected = {}
    for split, n in zip(splits, (n_train, n_valid)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(pixels(c, k, size)).save(d / f'{k}.png')
                expected[(split, name, k)] = pixels(c, k, size)
    return expected


def chain(root, size=(8, 8), tfms=None, **kw):
    return (ImageList.from_folder(root).split_by_folder(train='train', valid='test').label_from_folder()
            .transform(tfms, size=size).databunch(bs=4, device='cpu', **kw))


def test_chain_end_to_end(tmp_path):
    expected = make_folder(tmp_path)
    data = chain(tmp_path).normalize(cifar_stats)
    assert data.classes == CLASSES and data.c == 3
    assert len(data.train_ds) == 12 and len(data.valid_ds) == 6 and len(data.train_dl) == 3
    for ds, split in ((data.train_ds, 'train'), (data.valid_ds, 'test')):
        for i, f in enumerate(ds.items):
            ref = torch.from_numpy(expected[(split, f.parent.name, int(f.stem))]).permute(2, 0, 1)
            assert torch.equal(ds.x[i], ref), f
            assert CLASSES[int(ds.y[i])] == f.parent.name
    xb, yb = next(iter(data.valid_dl))  # validation: in order, not augmented, normalised
    mean, std = (torch.tensor(s)[None, :, None, None] for s in cifar_stats)
    torch.testing.assert_close(xb, (data.valid_ds.x[:4].float() / 255 - mean) / std)
    assert xb.dtype == torch.float32 and torch.equal(yb, data.valid_ds.y[:4])
    xt, yt = next(iter(data.train_dl))
    assert xt.shape == (4, 3, 8, 8) and yt.dtype == torch.int64


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    data_dir, cache_dir = tmp_path / 'data', tmp_path / 'cache'
    monkeypatch.setenv('MINIFAST_CACHE', str(cache_dir))
    make_folder(data_dir)
    calls = []
    real = cache_mod.decode_images
    monkeypatch.setattr(cache_mod, 'decode_images', lambda files, *a, **k: calls.append(len(files)) or
                        real(files, *a, **k))
    chain(data_dir)
    assert calls == [18]  # both splits in one decode
    assert len(list(cache_dir.glob('*.pt'))) == 1 and not any(p.name.startswith('.') for p in data_dir.iterdir())
    data = chain(data_dir)
    assert calls == [18] and len(data.train_ds) == 12  # from the cache
    il = ImageList.from_folder(data_dir)
    il.split_by_rand_pct(0.3, seed=0).label_from_folder().transform(size=(8, 8)).databunch(device='cpu')
    assert calls == [18]  # another split of the same files shares the entry
    f = data_dir / 'train' / 'ant' / '0.png'
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f)
    data = chain(data_dir)
    assert calls == [18, 18]  # a changed file
    assert data.train_ds.x[data.train_ds.items.index(f)].sum() == 0
    st = f.stat()
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(f)  # same size, mtime put back (cp -p, rsync -a)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    data = chain(data_dir)
    assert calls == [18, 18, 18] and data.train_ds.x[data.train_ds.items.index(f)].max() == 9
    Image.fromarray(pixels(0, 9)).save(data_dir / 'test' / 'ant' / '9.png')  # a new file
    data = chain(data_dir)
    assert calls[-1] == 19 and len(data.valid_ds) == 7
    assert len(list(cache_dir.glob('*.pt'))) == 1  # stale entries are removed
    chain(data_dir, size=(4, 4))
    assert calls[-1] == 19 and len(list(cache_dir.glob('*.pt'))) == 2  # another size is another entry
    chain(data_dir, cache=False)
    assert calls[-1] == 19 and len(calls) == 6  # no cache: decoded every time


def test_a_damaged_cache_entry_is_decoded_again_not_trusted(tmp_path):
    make_folder(tmp_path / 'data')
    data = chain(tmp_path / 'data', cache=tmp_path / 'cache')
    (entry,) = (tmp_path / 'cache').glob('*.pt')
    raw = bytearray(entry.read_bytes())
    x = torch.load(entry, weights_only=True)['x']
    at = bytes(raw).find(x.numpy().tobytes()[:64])  # the images' bytes, stored uncompressed in torch's zip
    assert at > 0
    raw[at + 100] ^= 0xFF  # one flipped byte: the file still loads
    entry.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match='ignoring unreadable or damaged cache file .* checksum'):
        again = chain(tmp_path / 'data', cache=tmp_path / 'cache')
    assert torch.equal(again.train_ds.x, data.train_ds.x) and torch.equal(again.valid_ds.x, data.valid_ds.x)


def test_hidden_entries_and_other_files_are_skipped(tmp_path):
    make_folder(tmp_path)
    (tmp_path / 'train' / '.ipynb_checkpoints').mkdir()
    Image.fromarray(pixels(0, 0)).save(tmp_path / 'train' / '.ipynb_checkpoints' / 'x.png')
    (tmp_path / 'train' / 'ant' / '.DS_Store').write_bytes(b'\0\1')
    (tmp_path / 'train' / 'bee' / 'notes.txt').write_text('not an image')
    Image.fromarray(pixels(0, 0)).save(tmp_path / 'train' / 'cat' / '._hidden.png')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        data = chain(tmp_path)
    assert data.classes == CLASSES and len(data.train_ds) == 12


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf'{tmp_path / "nope"} does not exist'):
        ImageList.from_folder(tmp_path / 'nope')


def test_no_images(tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'x.txt').write_text('x')
    with pytest.raises(ValueError, match=rf'no image files .* found in {tmp_path}'):
        ImageList.from_folder(tmp_path)


def test_missing_split_folder(tmp_path):
    make_folder(tmp_path, splits=('train', 'valid'))
    with pytest.raises(ValueError, match=rf"no images in {tmp_path / 'test'}.*\['train', 'valid'\]"):
        ImageList.from_folder(tmp_path).split_by_folder(train='train', valid='test')


def test_images_without_class_subfolders(tmp_path):
    for split in ('train', 'test'):
        (tmp_path / split).mkdir()
        for k in range(3):
            Image.fromarray(pixels(0, k)).save(tmp_path / split / f'{k}.png')
    with pytest.raises(ValueError, match=rf'3 image\(s\) lie directly in {tmp_path / "train"}.*own subfolder'):
        ImageList.from_folder(tmp_path).split_by_folder(valid='test').label_from_folder()


def test_class_folder_without_images_warns(tmp_path):
    make_folder(tmp_path)
    (tmp_path / 'train' / 'dog').mkdir()
    (tmp_path / 'train' / 'dog' / 'readme.txt').write_text('no images here')
    with pytest.warns(UserWarning, match=rf'class folder {tmp_path / "train" / "dog"} has no images'):
        data = chain(tmp_path)
    assert data.classes == CLASSES


def test_corrupt_image_names_the_file_or_is_skipped(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / 'train' / 'bee' / '1.png'
    bad.write_bytes(bad.read_bytes()[:30])  # truncated
    (tmp_path / 'train' / 'cat' / 'junk.jpg').write_bytes(b'not a jpeg at all')
    with pytest.raises(ImageDecodeError, match=rf'cannot read image {bad}.*and 1 more.*ignore_errors=True'):
        chain(tmp_path)
    with pytest.warns(UserWarning, match=r'skipped 2 unreadable image file\(s\)') as w:
        data = chain(tmp_path, ignore_errors=True)
    assert str(bad) in str(w[0].message) and 'junk.jpg' in str(w[0].message)
    assert len(data.train_ds) == 12 - 1 and bad not in data.train_ds.items
    ImageList.from_folder(tmp_path, ignore_errors=True).split_by_folder(valid='test')  # also settable at the start


def test_without_a_size_an_unreadable_first_image_is_skipped_or_named(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / 'train' / 'ant' / '0.png'  # the first training file, whose size would be every image's
    bad.write_bytes(b'not a png')
    il = ImageList.from_folder(tmp_path).split_by_folder(valid='test').label_from_folder()
    with pytest.raises(ImageDecodeError, match=rf'cannot read image {bad}: .*ignore_errors=True'):
        il.databunch(device='cpu', cache=False)
    with pytest.warns(UserWarning, match=r'skipped 1 unreadable image file\(s\)'):
        data = il.databunch(device='cpu', cache=False, ignore_errors=True)
    assert data.train_ds.x.shape == (11, 3, 8, 8) and bad not in data.train_ds.items


def test_validation_class_absent_from_training(tmp_path):
    make_folder(tmp_path)
    (tmp_path / 'test' / 'dog').mkdir()
    for k in range(2):
        Image.fromarray(pixels(1, k)).save(tmp_path / 'test' / 'dog' / f'{k}.png')
    with pytest.warns(UserWarning, match=r"validation classes absent from training.*'dog' \(2 images\)"):
        data = chain(tmp_path)
    assert data.classes == CLASSES and len(data.valid_ds) == 6


def test_other_sizes_and_modes_become_rgb_of_size(tmp_path):
    make_folder(tmp_path)
    big = np.random.default_rng(0).integers(0, 255, (16, 12, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / 'train' / 'ant' / 'big.png')
    Image.fromarray(np.full((8, 8), 77, np.uint8), mode='L').save(tmp_path / 'train' / 'bee' / 'gray.png')
    Image.fromarray(np.full((8, 8, 4), 200, np.uint8), mode='RGBA').save(tmp_path / 'train' / 'cat' / 'rgba.png')
    pal = Image.fromarray(np.full((8, 8, 3), (10, 20, 30), np.uint8)).convert('P', palette=Image.ADAPTIVE)
    pal.save(tmp_path / 'train' / 'cat' / 'pal.png')
    data = chain(tmp_path)
    names = [f.name for f in data.train_ds.items]
    x = data.train_ds.x
    assert x.shape == (16, 3, 8, 8)
    assert torch.equal(x[names.index('gray.png')], torch.full((3, 8, 8), 77, dtype=torch.uint8))
    assert torch.equal(x[names.index('rgba.png')], torch.full((3, 8, 8), 200, dtype=torch.uint8))
    assert x[names.index('pal.png')][:, 0, 0].tolist() == [10, 20, 30]
    ref = np.asarray(Image.fromarray(big).resize((8, 8), Image.BILINEAR)).transpose(2, 0, 1)
    assert torch.equal(x[names.index('big.png')], torch.from_numpy(ref.copy()))


def test_split_by_rand_pct(tmp_path):
    make_folder(tmp_path, n_train=10, n_valid=0, splits=('all', 'none'))
    il = ImageList.from_folder(tmp_path / 'all')
    a, b = il.split_by_rand_pct(0.2, seed=1), il.split_by_rand_pct(0.2, seed=1)
    assert a.valid.items == b.valid.items and len(a.valid) == 6 and len(a.train) == 24
    torch.manual_seed(5)
    c = il.split_by_rand_pct(0.2)
    torch.manual_seed(5)
    assert il.split_by_rand_pct(0.2).valid.items == c.valid.items  # unseeded: torch.manual_seed fixes it
    assert not set(a.valid.items) & set(a.train.items)
    assert il.split_by_rand_pct(0.2, seed=2).valid.items != a.valid.items
    data = a.label_from_folder().transform(size=8).databunch(bs=8, device='cpu')
    assert data.classes == CLASSES and len(data.valid_ds) == 6
    with pytest.raises(ValueError, match='valid_pct must be between 0 and 1'):
        il.split_by_rand_pct(1.5)


def test_show_batch_returns_titled_figure(tmp_path):
    make_folder(tmp_path)
    data = chain(tmp_path).normalize(cifar_stats)
    fig = data.show_batch(rows=2, figsize=(4, 4))
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    assert all(ax.get_title() in CLASSES for ax in fig.axes)
    img = fig.axes[0].images[0].get_array()
    assert img.shape == (8, 8, 3) and 0 <= img.min() and img.max() <= 1  # de-normalised


def test_one_batch_of_an_empty_loader_says_why():
    x = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    data = ImageDataBunch.from_tensors(x, [0] * 6, x[:0], [], classes=['a'], bs=8, device='cpu')
    with pytest.raises(ValueError, match=r'training loader has no batches \(6 items, batch_size=8, drop_last=True\)'):
        data.show_batch()
    with pytest.raises(ValueError, match=r'validation loader has no batches \(0 items'):
        data.one_batch(train=False)


def test_normalize_from_data_and_bad_stats(tmp_path):
    make_folder(tmp_path)
    data = chain(tmp_path).normalize()
    x = data.train_ds.x.float() / 255
    torch.testing.assert_close(data.stats[0], x.mean((0, 2, 3)))
    with pytest.raises(ValueError, match=r'3 means, 3 stds'):
        data.normalize(([0.5], [0.2]))


def test_from_tensors_numpy_nhwc_and_resize():
    rng = np.random.default_rng(0)
    xt = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    xv = rng.random((6, 16, 16, 3)).astype(np.float32)
    data = ImageDataBunch.from_tensors(xt, rng.integers(0, 4, 20), xv, rng.integers(0, 4, 6), size=8, bs=5,
                                       device='cpu')
    assert data.train_ds.x.shape == (20, 3, 8, 8) and data.train_ds.x.dtype == torch.uint8
    assert data.c == 4 and len(data.train_dl) == 4
    with pytest.raises(ValueError, match=r'float images must be in \[0, 1\]'):
        ImageDataBunch.from_tensors(xv * 255, [0] * 6, xv, [0] * 6)


def test_from_tensors_takes_integer_images_as_0_to_255():
    x = torch.arange(4 * 3 * 2 * 2).reshape(4, 3, 2, 2) * 5  # int64, as np.array(lists) gives
    data = ImageDataBunch.from_tensors(x, [0] * 4, x.numpy().astype(np.int16), [0] * 4, device='cpu')
    assert torch.equal(data.train_ds.x, x.to(torch.uint8)) and torch.equal(data.valid_ds.x, x.to(torch.uint8))
    with pytest.raises(ValueError, match=r'x_train: integer images must be in 0..255 \(they span 65..300\)'):
        ImageDataBunch.from_tensors(x + 65, [0] * 4, x, [0] * 4)
    mask = x % 2 == 1  # bool images (masks) keep meaning False -> 0 and True -> 255, not 0 and 1
    data = ImageDataBunch.from_tensors(mask, [0] * 4, mask, [0] * 4, device='cpu')
    assert torch.equal(data.train_ds.x, mask.to(torch.uint8) * 255)


def test_from_tensors_refuses_negative_floats_instead_of_clamping_them():
    x = torch.linspace(-1, 1, 4 * 3 * 2 * 2).reshape(4, 3, 2, 2)  # already normalised: max 1, half negative
    with pytest.raises(ValueError, match=r'x_valid: float images must be in \[0, 1\] \(they span \[-1, 1\]\)'):
        ImageDataBunch.from_tensors(x.clamp(0, 1), [0] * 4, x, [0] * 4)


def test_learner_fits_an_image_folder(tmp_path):
    make_folder(tmp_path, n_train=16, n_valid=4)
    data = chain(tmp_path).normalize()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 3))
    learn = Learner(data, model, silent=True)
    before = learn.validate(data.train_dl)[0]
    learn.fit(8, 1e-2)
    assert learn.validate(data.train_dl)[0] < before


def test_cifar100_bunch_from_a_tiny_pickle_on_disk(tmp_path):
    from minifast import cifar100, write_cifar
    g = torch.Generator().manual_seed(0)
    xt, xv = (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8) for n in (64, 32))
    yt, yv = torch.arange(64) % 100, torch.arange(32) % 100
    classes = [f'c{i}' for i in range(100)]
    write_cifar(tmp_path, 'cifar100', xt, yt, xv, yv, classes)
    data = cifar100(tmp_path, download=False, bs=16, device='cpu')
    assert torch.equal(data.train_ds.x, xt) and torch.equal(data.valid_ds.y, yv)
    assert data.classes == classes and data.c == 100 and len(data.train_dl) == 4
    mean, std = (torch.tensor(s)[None, :, None, None] for s in cifar_stats)
    xb, _ = next(iter(data.valid_dl))
    torch.testing.assert_close(xb, (xv[:16].float() / 255 - mean) / std)
    with pytest.raises(FileNotFoundError, match='cifar-10-batches-py'):
        from minifast import cifar10
        cifar10(tmp_path, download=False)


def test_fit_on_the_builtin_dataset_reduces_the_loss():
    from minifast import accuracy, synthetic_cifar
    torch.manual_seed(0)
    data = synthetic_cifar(n_classes=10, n_train=2048, n_valid=256, bs=64, device='cpu')
    assert data.c == 10 and data.train_ds.x.shape == (2048, 3, 32, 32)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 10))
    learn = Learner(data, model, metrics=[accuracy], silent=True)
    before = learn.validate()
    learn.fit(4, 5e-3)
    after = learn.validate()
    assert after[0] < before[0] - 0.05 and after[1] > 0.15  # chance is 0.10; the set is built to need real training
    assert learn.recorder.train_losses[-1] < learn.recorder.train_losses[0]


def test_transform_accepts_fastai_forms_and_names_a_bad_one(tmp_path):
    from minifast import FlipLR, RandomCropPad
    make_folder(tmp_path)
    ll = ImageList.from_folder(tmp_path).split_by_folder(valid='test').label_from_folder()
    assert [type(t) for t in ll.transform([[RandomCropPad(1)], [FlipLR()]], size=8).tfms[0]] == [RandomCropPad]
    assert [type(t) for t in ll.transform(FlipLR(), size=8).tfms[0]] == [FlipLR]
    assert [type(t) for t in ll.transform((RandomCropPad(1), FlipLR()), size=8).tfms[0]] == [RandomCropPad, FlipLR]
    with pytest.raises(TypeError, match=r"transform: train transform 1 is 'flip' \(str\), which is not callable"):
        ll.transform([FlipLR(), 'flip'])


def test_labels_must_fit_the_classes():
    x = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r'training label 9 is outside 0\.\.2 \(3 classes\)'):
        ImageDataBunch.from_tensors(x, [0, 1, 9, 0, 1, 2], x, [0] * 6, classes=['a', 'b', 'c'])
    with pytest.raises(ValueError, match=r'validation label -1 is outside'):
        ImageDataBunch.from_tensors(x, [0] * 6, x, [0, -1, 0, 0, 0, 0], classes=['a', 'b', 'c'])


def test_normalize_without_stats_uses_every_image():
    x = torch.cat([torch.full((100, 3, 2, 2), 25 * k, dtype=torch.uint8) for k in range(10)])
    y = torch.arange(1000) // 100
    data = ImageDataBunch.from_tensors(x, y, x[:10], y[:10], bs=10, device='cpu').normalize()
    v = x.double() / 255
    torch.testing.assert_close(data.stats[0].double(), v.mean((0, 2, 3)), atol=1e-6, rtol=0)
    torch.testing.assert_close(data.stats[1].double(), v.std((0, 2, 3), unbiased=False), atol=1e-6, rtol=0)


def test_predict_takes_a_raw_image_like_the_dataset_holds(tmp_path):
    make_folder(tmp_path)
    data = chain(tmp_path).normalize(cifar_stats)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
    learn = Learner(data, model, silent=True)
    img, _ = data.valid_ds[2]
    label, idx, probs = learn.predict(img)
    xb, _ = next(iter(data.valid_dl))
    with torch.no_grad():
        ref = model(xb[2:3])[0].softmax(-1)
    torch.testing.assert_close(probs, ref)
    assert label == CLASSES[idx]


def test_split_by_idx_checks_bounds(tmp_path):
    make_folder(tmp_path)
    il = ImageList.from_folder(tmp_path)
    with pytest.raises(IndexError, match=r'indices \[-1, 99\] are outside 0\.\.17 \(18 items\)'):
        il.split_by_idx([0, -1, 99])
    assert len(il.split_by_idx([0, 1]).valid) == 2


def test_random_split_of_a_train_test_layout_warns_nothing(tmp_path):
    make_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ll = ImageList.from_folder(tmp_path).split_by_rand_pct(0.25, seed=0).label_from_folder()
    assert ll.classes == CLASSES


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    make_folder(tmp_path)
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(ramp).save(tmp_path / 'train' / 'ant' / 'deep.png')
    data = chain(tmp_path)
    x = data.train_ds.x[[f.name for f in data.train_ds.items].index('deep.png')]
    assert torch.equal(x[0], torch.from_numpy(np.round(ramp / 65535 * 255).astype(np.uint8)))


def test_int_size_keeps_the_aspect_ratio_with_a_centre_crop(tmp_path):
    make_folder(tmp_path)
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, 4:12] = 200  # the middle half of a 2:1 image
    Image.fromarray(wide).save(tmp_path / 'train' / 'ant' / 'wide.png')
    data = chain(tmp_path, size=8)
    x = data.train_ds.x[[f.name for f in data.train_ds.items].index('wide.png')]
    assert torch.equal(x, torch.full((3, 8, 8), 200, dtype=torch.uint8))  # cropped, not squished
    squished = chain(tmp_path, size=(8, 8))
    x = squished.train_ds.x[[f.name for f in squished.train_ds.items].index('wide.png')]
    assert x[:, :, 0].max() < 200 and x[:, :, 4].min() == 200


def test_validation_split_of_classes_all_absent_from_training_is_refused(tmp_path):
    make_folder(tmp_path)
    for c in CLASSES:  # the validation folder holds only classes training has never seen
        for f in (tmp_path / 'test' / c).iterdir():
            f.unlink()
        (tmp_path / 'test' / c).rmdir()
    for c in ('dog', 'eel'):
        (tmp_path / 'test' / c).mkdir()
        Image.fromarray(pixels(1, 0)).save(tmp_path / 'test' / c / '0.png')
    with pytest.raises(ValueError, match=rf"label_from_folder: every validation image \({tmp_path / 'test'}\) is of a "
                                         r"class absent from training: 'dog' \(1 images\), 'eel' \(1 images\); the "
                                         r"training classes are \['ant', 'bee', 'cat'\]"):
        chain(tmp_path)


def test_from_tensors_refuses_nan_pixels_instead_of_zeroing_them():
    x = torch.rand(5, 3, 4, 4)
    x[1, 0, 0, 0] = x[3, 2, 1, 1] = x[3, 1, 0, 2] = float('nan')
    with pytest.raises(ValueError, match=r'x_valid: float images hold 3 NaN of 240 values, in 2 of 5 images \(the '
                                         r'first is image 1\); NaN would become 0'):
        ImageDataBunch.from_tensors(x.nan_to_num(), [0] * 5, x, [0] * 5)
    nhwc = x.nan_to_num().permute(0, 2, 3, 1).numpy().astype(np.float64)  # numpy NHWC float64, too
    nhwc[4, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r'x_train: float images hold 1 NaN of 240 values, in 1 of 5 images \(the '
                                         r'first is image 4\)'):
        ImageDataBunch.from_tensors(nhwc, [0] * 5, x.nan_to_num(), [0] * 5)


def test_decode_error_lists_every_unreadable_file(tmp_path):
    """ImageDecodeError.bad: (file, why) of each unreadable file, so a caller (the CLI) can word its own fix."""
    from minifast.data.cache import ImageDecodeError, decode_images
    good = tmp_path / 'good.png'
    from PIL import Image
    Image.new('RGB', (4, 4)).save(good)
    bad = [tmp_path / 'a.png', tmp_path / 'b.png']
    for f in bad:
        f.write_bytes(b'not an image')
    with pytest.raises(ImageDecodeError) as e:
        decode_images([good, *bad], (4, 4))
    assert [f for f, _ in e.value.bad] == bad and all(why for _, why in e.value.bad)


# ---- fastai v1's constructors and labelling functions (issue 18) ------------------------------------------------
def flat_pets(root, n=4):
    """A fastai-v1-pets-like folder: root/images/<class>_<k>.png (the label is in the name), 3 classes."""
    d = root / 'images'
    d.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(CLASSES):
        for k in range(n):
            Image.fromarray(pixels(c, k)).save(d / f'{name}_{k}.png')
    return sorted(d.iterdir())


def labels_of(data):
    """{file name: class name} over both splits."""
    return {f.name: data.classes[int(y)] for ds in (data.train_ds, data.valid_ds) for f, y in zip(ds.items, ds.y)}


def test_from_folder_is_the_chain_and_valid_pct_splits_the_whole_folder(tmp_path):
    make_folder(tmp_path, splits=('train', 'valid'))
    data = ImageDataBunch.from_folder(tmp_path, size=8, bs=4, device='cpu')
    ref = (ImageList.from_folder(tmp_path).split_by_folder().label_from_folder().transform(size=8)
           .databunch(bs=4, device='cpu'))
    assert data.classes == CLASSES and data.train_ds.items == ref.train_ds.items
    assert torch.equal(data.train_ds.x, ref.train_ds.x) and torch.equal(data.valid_ds.y, ref.valid_ds.y)
    assert data.train_dl.batch_size == 4 and data.size == (8, 8) and data.crop
    a = ImageDataBunch.from_folder(tmp_path, valid_pct=0.25, seed=3, size=(8, 8), device='cpu')
    b = ImageDataBunch.from_folder(tmp_path, valid_pct=0.25, seed=3, size=(8, 8), device='cpu')
    assert len(a.train_ds) == 14 and len(a.valid_ds) == 4 and a.valid_ds.items == b.valid_ds.items
    assert {f.parts[-3] for f in a.valid_ds.items + a.train_ds.items} == {'train', 'valid'}  # both folders mixed
    assert all(a.classes[int(y)] == f.parent.name for f, y in zip(a.valid_ds.items, a.valid_ds.y))


def test_from_folder_classes_keeps_their_order_and_drops_the_others(tmp_path):
    make_folder(tmp_path, splits=('train', 'valid'))
    with pytest.warns(UserWarning) as w:
        data = ImageDataBunch.from_folder(tmp_path, classes=['cat', 'ant'], size=8, device='cpu')
    assert [str(m.message) for m in w] == [
        "training classes absent from the classes given, their images are dropped: 'bee' (4 images)",
        "validation classes absent from the classes given, their images are dropped: 'bee' (2 images)"]
    assert data.classes == ['cat', 'ant'] and len(data.train_ds) == 8 and len(data.valid_ds) == 4
    assert all(data.classes[int(y)] == f.parent.name for f, y in zip(data.train_ds.items, data.train_ds.y))


def test_from_name_re_from_name_func_and_from_lists_agree(tmp_path):
    fnames = flat_pets(tmp_path)
    pat = r'/([^/]+)_\d+.png$'  # fastai v1's docs' pattern: searched in the whole path
    data = ImageDataBunch.from_name_re(tmp_path, fnames, pat, valid_pct=0.25, seed=0, size=8, bs=4, device='cpu')
    assert data.classes == CLASSES and len(data.valid_ds) == 3 and len(data.train_ds) == 9
    truth = {f.name: f.name.split('_')[0] for f in fnames}
    assert labels_of(data) == truth
    by_func = ImageDataBunch.from_name_func(tmp_path, fnames, lambda f: f.name.split('_')[0], valid_pct=0.25,
                                            seed=0, size=8, device='cpu')
    by_list = ImageDataBunch.from_lists(tmp_path, [f'images/{f.name}' for f in fnames],  # relative to path
                                        [truth[f.name] for f in fnames], valid_pct=0.25, seed=0, size=8, device='cpu')
    for other in (by_func, by_list):
        assert other.valid_ds.items == data.valid_ds.items and torch.equal(other.valid_ds.y, data.valid_ds.y)
        assert torch.equal(other.train_ds.x, data.train_ds.x)


def test_label_from_re_names_the_file_and_the_pattern(tmp_path):
    fnames = flat_pets(tmp_path)
    odd = tmp_path / 'images' / 'nolabel.png'
    Image.fromarray(pixels(0, 0)).save(odd)
    with pytest.raises(ValueError, match=rf"label_from_re: the pattern '.*' does not match {odd}"):
        ImageDataBunch.from_name_re(tmp_path, [*fnames, odd], r'/([a-z]+)_\d+.png$', size=8, seed=0)
    with pytest.raises(ValueError, match=r"the pattern '_\\\\d\+' has no group"):
        ImageList(fnames, tmp_path).split_by_idx([0]).label_from_re(r'_\d+')
    ll = ImageList([f.relative_to(tmp_path) for f in fnames], tmp_path).split_by_idx([0, 4, 8])
    with pytest.raises(ValueError, match='does not match images/ant_1.png'):  # as given: relative
        ll.label_from_re(r'^/.*/(\w+?)_')
    assert ll.label_from_re(r'^/.*/(\w+?)_', full_path=True).classes == CLASSES  # joined to path: absolute


def test_from_name_func_and_from_lists_check_their_input(tmp_path):
    fnames = flat_pets(tmp_path)
    with pytest.raises(FileNotFoundError, match=r'from_name_func: 1 of the 13 files do not exist \(the first: '
                                                r'.*gone.png'):
        ImageDataBunch.from_name_func(tmp_path, [*fnames, tmp_path / 'gone.png'], str)
    with pytest.raises(ValueError, match=r'label_from_func: <lambda> returned None for .*ant_0.png'):
        ImageList(fnames, tmp_path).split_by_idx([1]).label_from_func(lambda f: None)
    with pytest.raises(ValueError, match='from_lists: 12 files but 11 labels'):
        ImageDataBunch.from_lists(tmp_path, fnames, ['ant'] * 11)
    with pytest.raises(ValueError, match=r"ant_0.png is listed twice, as 'ant' and as 'bee'"):
        ImageDataBunch.from_lists(tmp_path, [fnames[0], *fnames], ['ant', 'bee', *['x'] * 11])
    with pytest.raises(ValueError, match='label_from_lists: 2 valid labels for 3 valid items'):
        ImageList(fnames, tmp_path).split_by_idx([0, 1, 2]).label_from_lists(['a'] * 9, ['a'] * 2)


def test_every_labelling_function_drops_unknown_validation_classes_the_same_way(tmp_path):
    fnames = flat_pets(tmp_path)
    src = ImageList(fnames, tmp_path).split_by_idx([0, 4, 5])  # valid: ant_0, bee_0, bee_1
    ytr = ['ant' if f.name.startswith('ant') else 'cat' for f in src.train.items]
    with pytest.warns(UserWarning, match=r"validation classes absent from training, their images are dropped: "
                                         r"'bee' \(2 images\)"):
        ll = src.label_from_lists(ytr, ['ant', 'bee', 'bee'])
    assert ll.classes == ['ant', 'cat'] and [f.name for f in ll.valid.items] == ['ant_0.png']
    with pytest.warns(UserWarning, match=r"'bee' \(2 images\)"):
        ll2 = src.label_from_func(lambda f: 'bee' if f in src.valid.items[1:] else ytr[src.train.items.index(f)]
                                  if f in src.train.items else 'ant')
    assert ll2.classes == ll.classes and ll2.y_valid == ['ant']
    with pytest.raises(ValueError, match=r"label_from_func: every validation image \(the validation split\) is of "
                                         r"a class absent from training: 'dog' \(3 images\)"):
        src.label_from_func(lambda f: 'dog' if f in src.valid.items else 'ant')
    with pytest.raises(ValueError, match=r"classes= names a class twice"):
        src.label_from_lists(ytr, ['ant'] * 3, classes=['ant', 'ant'])


def write_csv(file, rows):
    file.write_text(''.join(','.join(r) + '\n' for r in rows))


def test_from_csv_with_and_without_a_header(tmp_path):
    fnames = flat_pets(tmp_path)
    truth = {f.name: f.name.split('_')[0] for f in fnames}
    write_csv(tmp_path / 'labels.csv', [('name', 'label'), *((f'images/{n}', y) for n, y in truth.items())])
    data = ImageDataBunch.from_csv(tmp_path, size=8, bs=4, seed=0, device='cpu')  # fastai v1's defaults
    assert data.classes == CLASSES and len(data.train_ds) + len(data.valid_ds) == 12  # the header is no image
    assert labels_of(data) == truth
    # no header, names without the extension in a subfolder, columns swapped and a ';' delimiter
    (tmp_path / 'l2.csv').write_text(''.join(f'{y};{n[:-4]}\n' for n, y in truth.items()))
    d2 = ImageDataBunch.from_csv(tmp_path, folder='images', csv_labels='l2.csv', fn_col=1, label_col=0,
                                 suffix='.png', delimiter=';', header=None, seed=0, size=8, device='cpu')
    assert labels_of(d2) == truth and d2.valid_ds.items == data.valid_ds.items
    # columns by header name; ImageList.from_csv + label_from_df is the same chain
    write_csv(tmp_path / 'l3.csv', [('label', 'file'), *((y, n) for n, y in truth.items())])
    ll = ImageList.from_csv(tmp_path, 'l3.csv', cols='file', folder='images').split_by_idx([0, 5]).label_from_df(
        cols='label')
    assert ll.classes == CLASSES and ll.y_valid == ['ant', 'bee']
    d4 = ImageDataBunch.from_csv(tmp_path, folder='images', csv_labels='l3.csv', fn_col='file', label_col='label',
                                 seed=0, size=8, device='cpu')
    assert labels_of(d4) == truth


def test_from_csv_errors_name_the_file_the_line_and_the_image(tmp_path):
    fnames = flat_pets(tmp_path)
    rows = [(f'images/{f.name}', f.name.split('_')[0]) for f in fnames]
    write_csv(tmp_path / 'labels.csv', [('name', 'label'), *rows[:3], ('images/missing.png', 'ant'), *rows[3:]])
    csv_file = tmp_path / 'labels.csv'
    with pytest.raises(FileNotFoundError, match=rf'from_csv: 1 of the 13 images named in {csv_file} do not exist; '
                                                rf'the first, on line 5, is {tmp_path / "images/missing.png"}'):
        ImageDataBunch.from_csv(tmp_path, size=8)
    with pytest.warns(UserWarning, match='those rows are skipped'):
        data = ImageDataBunch.from_csv(tmp_path, size=8, ignore_errors=True, device='cpu')
    assert len(data.train_ds) + len(data.valid_ds) == 12
    write_csv(csv_file, [('name', 'label'), *rows[:2], (rows[2][0],), *rows[3:]])
    with pytest.raises(ValueError, match=rf"label_from_df: the label column 1: line 4 of {csv_file} has 1 column"):
        ImageDataBunch.from_csv(tmp_path, size=8)
    with pytest.raises(ValueError, match=r"column 'labels' is not in the header of .*: \['name', 'label'\]"):
        ImageDataBunch.from_csv(tmp_path, label_col='labels', size=8)
    with pytest.raises(FileNotFoundError, match=r"no csv file .*nope.csv \(csv files there: \['labels.csv'\]\)"):
        ImageDataBunch.from_csv(tmp_path, csv_labels='nope.csv')
    with pytest.raises(ValueError, match='multi-label'):
        ImageDataBunch.from_csv(tmp_path, label_delim=' ')
    with pytest.raises(ValueError, match=r'these items do not come from a csv file'):
        ImageList(fnames, tmp_path).split_by_idx([0]).label_from_df()


def test_get_image_files(tmp_path):
    fnames = flat_pets(tmp_path)
    (tmp_path / 'images' / 'notes.txt').write_text('not an image')
    (tmp_path / 'images' / '.hidden.png').write_bytes(b'')
    (tmp_path / 'images' / 'sub').mkdir()
    Image.fromarray(pixels(0, 0)).save(tmp_path / 'images' / 'sub' / 'deep.png')
    from minifast import get_image_files
    assert get_image_files(tmp_path / 'images') == fnames
    assert get_image_files(tmp_path / 'images', recurse=True) == sorted([*fnames, tmp_path / 'images/sub/deep.png'])
    assert tmp_path / 'images' / 'notes.txt' in get_image_files(tmp_path / 'images', check_ext=False)
    with pytest.raises(NotADirectoryError, match='get_image_files: .*nope is not a folder'):
        get_image_files(tmp_path / 'nope')
