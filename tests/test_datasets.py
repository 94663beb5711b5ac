"""Datasets: CIFAR's pickle format against hand-built files, missing and corrupt files, the generated image set."""
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from minifast.data.datasets import (CIFAR_URL, HUES, SHAPES, load_cifar, synthetic_images, write_cifar,
                                    write_image_folder)

CIFAR10_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def tiny_cifar(n_train, n_valid, n_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x_train=torch.randint(0, 256, (n_train, 3, 32, 32), generator=g, dtype=torch.uint8),
                y_train=torch.randint(0, n_classes, (n_train,), generator=g),
                x_valid=torch.randint(0, 256, (n_valid, 3, 32, 32), generator=g, dtype=torch.uint8),
                y_valid=torch.randint(0, n_classes, (n_valid,), generator=g))


def raw(path):
    with open(path, 'rb') as f:
        return pickle.load(f, encoding='bytes')


def hand_pixel(row, channel, r, c):
    """CIFAR's documented layout: 1024 R, 1024 G, 1024 B values, each 32x32 in row-major order."""
    return int(row[channel * 1024 + r * 32 + c])


def test_cifar10_round_trip_and_layout(tmp_path):
    d = tiny_cifar(50, 20, 10)
    folder = write_cifar(tmp_path, 'cifar10', **d, classes=CIFAR10_NAMES)
    assert folder == tmp_path / 'cifar-10-batches-py'
    batches = [raw(folder / f'data_batch_{i}') for i in range(1, 6)]
    assert [len(b[b'labels']) for b in batches] == [10] * 5
    assert raw(folder / 'batches.meta')[b'label_names'] == [n.encode() for n in CIFAR10_NAMES]
    # The file holds rows in CIFAR's layout: check one against a hand decoding of the written images.
    row = batches[1][b'data'][3]                      # image 13 of the training set
    assert row.dtype == np.uint8 and row.shape == (3072,)
    assert hand_pixel(row, 1, 0, 1) == row[1024 + 1] == d['x_train'][13, 1, 0, 1]
    for ch, r, c in [(0, 0, 0), (2, 31, 31), (0, 5, 17), (2, 17, 5)]:
        assert hand_pixel(row, ch, r, c) == d['x_train'][13, ch, r, c]
    assert batches[1][b'labels'][3] == d['y_train'][13]

    got = load_cifar(tmp_path, 'cifar10', download=False)
    for k in ('x_train', 'y_train', 'x_valid', 'y_valid'):
        assert torch.equal(got[k], d[k]), k
    assert got['x_train'].dtype == torch.uint8 and got['x_train'].shape == (50, 3, 32, 32)
    assert got['y_train'].dtype == torch.int64
    assert got['classes'] == CIFAR10_NAMES


def test_cifar100_round_trip(tmp_path):
    d = tiny_cifar(200, 100, 100, seed=1)
    classes = [f'class_{i:02d}' for i in range(100)]
    write_cifar(tmp_path, 'cifar100', **d, classes=classes)
    assert sorted(p.name for p in (tmp_path / 'cifar-100-python').iterdir()) == ['meta', 'test', 'train']
    assert raw(tmp_path / 'cifar-100-python' / 'test')[b'fine_labels'] == d['y_valid'].tolist()
    got = load_cifar(tmp_path, 'cifar100', download=False)
    for k in ('x_train', 'y_train', 'x_valid', 'y_valid'):
        assert torch.equal(got[k], d[k]), k
    assert got['classes'] == classes


def test_load_decodes_hand_built_files(tmp_path):
    """Files built here with plain pickle, independent of write_cifar, decode pixel by pixel as documented."""
    rng = np.random.default_rng(0)
    folder = tmp_path / 'cifar-100-python'
    folder.mkdir()
    rows = {}
    for name, n in (('train', 6), ('test', 4)):
        rows[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, 'wb') as f:
            pickle.dump({b'data': rows[name], b'fine_labels': list(range(n)), b'coarse_labels': [0] * n}, f,
                        protocol=2)
    with open(folder / 'meta', 'wb') as f:
        pickle.dump({b'fine_label_names': [f'n{i}'.encode() for i in range(100)], b'coarse_label_names': []}, f)
    got = load_cifar(tmp_path, download=False)
    assert got['classes'][:3] == ['n0', 'n1', 'n2'] and len(got['classes']) == 100
    assert got['y_train'].tolist() == list(range(6)) and got['y_valid'].tolist() == list(range(4))
    for i, row in enumerate(rows['train']):
        assert got['x_train'][i, 1, 0, 1] == row[1024 + 1]                    # G at (r=0, c=1)
        for ch, r, c in [(0, 0, 0), (0, 1, 0), (1, 31, 0), (2, 0, 31), (2, 31, 31)]:
            assert got['x_train'][i, ch, r, c] == hand_pixel(row, ch, r, c)
    assert torch.equal(got['x_valid'].reshape(4, -1), torch.from_numpy(rows['test']))


@pytest.mark.parametrize('name, folder, a_file', [('cifar10', 'cifar-10-batches-py', 'data_batch_1'),
                                                  ('cifar100', 'cifar-100-python', 'train')])
def test_missing_files_name_folder_and_url(tmp_path, name, folder, a_file):
    with pytest.raises(FileNotFoundError) as e:
        load_cifar(tmp_path, name, download=False)
    msg = str(e.value)
    assert str(tmp_path / folder) in msg and CIFAR_URL in msg and a_file in msg and 'python version' in msg


def test_partly_missing_names_the_missing_file(tmp_path):
    write_cifar(tmp_path, 'cifar10', **tiny_cifar(10, 5, 10), classes=CIFAR10_NAMES)
    (tmp_path / 'cifar-10-batches-py' / 'data_batch_4').unlink()
    with pytest.raises(FileNotFoundError, match='missing: data_batch_4'):
        load_cifar(tmp_path, 'cifar10', download=False)


def fake_torchvision(monkeypatch, dataset):
    """Stands in for torchvision (no network, no slow import): `dataset` plays torchvision.datasets.CIFAR100."""
    tv = types.ModuleType('torchvision')
    tv.datasets = types.SimpleNamespace(CIFAR100=dataset)
    monkeypatch.setitem(sys.modules, 'torchvision', tv)


def test_failed_download_reports_the_error(tmp_path, monkeypatch):
    calls = []

    def offline(root, train=True, download=False):
        calls.append((root, download))
        raise OSError('<urlopen error [Errno -3] Temporary failure in name resolution>')

    fake_torchvision(monkeypatch, offline)
    with pytest.raises(FileNotFoundError) as e:
        load_cifar(tmp_path, 'cifar100', download=True)
    assert calls == [(str(tmp_path), True)]
    msg = str(e.value)
    assert str(tmp_path / 'cifar-100-python') in msg and CIFAR_URL in msg
    assert 'OSError' in msg and 'name resolution' in msg


def test_download_then_read(tmp_path, monkeypatch):
    d = tiny_cifar(30, 10, 100)
    classes = [f'c{i}' for i in range(100)]

    def downloads(root, train=True, download=False):
        write_cifar(root, 'cifar100', **d, classes=classes)     # what extracting the real archive leaves

    fake_torchvision(monkeypatch, downloads)
    got = load_cifar(tmp_path, 'cifar100', download=True)
    assert torch.equal(got['x_train'], d['x_train']) and got['classes'] == classes


def test_truncated_or_unsafe_pickle_names_the_file(tmp_path):
    folder = write_cifar(tmp_path, 'cifar100', **tiny_cifar(20, 10, 100), classes=[str(i) for i in range(100)])
    test = folder / 'test'
    test.write_bytes(test.read_bytes()[:1000])
    with pytest.raises(ValueError, match='truncated') as e:
        load_cifar(tmp_path, 'cifar100', download=False)
    assert str(test) in str(e.value)

    # A pickle calling anything beyond numpy's array rebuild is refused, not run.
    class Evil:
        def __reduce__(self):
            return (print, ('this must not run',))

    with open(test, 'wb') as f:
        pickle.dump({b'data': Evil()}, f)
    with pytest.raises(ValueError, match='refusing to load global builtins.print') as e:
        load_cifar(tmp_path, 'cifar100', download=False)
    assert str(test) in str(e.value)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='cifar10'):
        load_cifar(tmp_path, 'cifar1000')
    d = tiny_cifar(4, 2, 10)
    with pytest.raises(ValueError, match='x_train must be uint8'):
        write_cifar(tmp_path, 'cifar10', **{**d, 'x_train': d['x_train'].float()}, classes=CIFAR10_NAMES)
    with pytest.raises(ValueError, match='10 classes'):
        write_cifar(tmp_path, 'cifar10', **{**d, 'y_valid': torch.tensor([0, 10])}, classes=CIFAR10_NAMES)


@pytest.fixture(scope='module')
def default_set():
    return synthetic_images()


def test_synthetic_default_shapes_and_balance(default_set):
    d = default_set
    assert d['x_train'].shape == (5000, 3, 32, 32) and d['x_valid'].shape == (1000, 3, 32, 32)
    assert d['x_train'].dtype == torch.uint8 and d['y_train'].dtype == torch.int64
    assert torch.bincount(d['y_train'], minlength=10).tolist() == [500] * 10
    assert torch.bincount(d['y_valid'], minlength=10).tolist() == [100] * 10
    assert d['classes'] == list(SHAPES)  # its generation time: benchmarks/data.py prints it


def test_synthetic_uses_the_value_range(default_set):
    x = default_set['x_train']
    share = torch.bincount(x.flatten().long(), minlength=256).float().reshape(8, 32).sum(1) / x.numel()
    assert share.min() > 0.01, f'share of pixel values per eighth of 0..255: {share.tolist()}'
    assert x.float().std() > 40


def test_synthetic_is_deterministic():
    # 1100 images cross a rendering-chunk boundary.
    a, b = synthetic_images(10, 1000, 100, size=16, seed=3), synthetic_images(10, 1000, 100, size=16, seed=3)
    c = synthetic_images(10, 1000, 100, size=16, seed=4)
    for k in ('x_train', 'y_train', 'x_valid', 'y_valid'):
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a['x_train'], c['x_train']) and not torch.equal(a['y_train'], c['y_train'])


def test_synthetic_class_counts_and_names():
    d = synthetic_images(100, 250, 130, size=24, seed=0)
    assert len(d['classes']) == len(set(d['classes'])) == 100
    assert d['classes'][0] == 'disc_red' and d['classes'][99] == 'dots_magenta'
    assert {c.split('_')[0] for c in d['classes']} == set(SHAPES)
    assert {c.split('_')[1] for c in d['classes']} == {h for h, _ in HUES}
    assert d['x_train'].shape == (250, 3, 24, 24)
    for y in (d['y_train'], d['y_valid']):                       # balanced: counts differ by at most one
        counts = torch.bincount(y, minlength=100)
        assert counts.max() - counts.min() <= 1
    for n in (2, 7, 37):
        d = synthetic_images(n, 3 * n, n, size=16)
        assert len(set(d['classes'])) == n and d['y_train'].max() == n - 1
        assert torch.bincount(d['y_train']).tolist() == [3] * n
    # With more than ten classes and fewer than ten hues, the hues in play are spread round the wheel.
    assert synthetic_images(20, 20, 0, size=8)['classes'][10] == 'disc_cyan'
    for bad in (1, 101):
        with pytest.raises(ValueError, match='n_classes'):
            synthetic_images(bad, 10, 10)


def test_write_image_folder_layout_and_pixels(tmp_path):
    d = synthetic_images(3, 12, 5, size=16, seed=1)
    folder = write_image_folder(tmp_path, d['x_train'], d['y_train'], d['classes'])
    assert folder == tmp_path / 'train'
    assert sorted(p.name for p in folder.iterdir()) == sorted(d['classes'])
    for i, (img, label) in enumerate(zip(d['x_train'], d['y_train'].tolist())):
        path = folder / d['classes'][label] / f'{i:02d}.png'
        with Image.open(path) as im:
            assert im.mode == 'RGB' and im.size == (16, 16)
            assert torch.equal(torch.from_numpy(np.array(im)).permute(2, 0, 1), img)
    assert sum(1 for _ in folder.rglob('*.png')) == 12
    valid = write_image_folder(tmp_path, d['x_valid'], d['y_valid'], d['classes'], split='test')
    assert valid == tmp_path / 'test' and sum(1 for _ in valid.rglob('*.png')) == 5


def test_write_image_folder_grey_and_bad_input(tmp_path):
    x = torch.arange(2 * 8 * 8, dtype=torch.uint8).reshape(2, 1, 8, 8)
    folder = write_image_folder(tmp_path, x, torch.tensor([1, 1]), ['a', 'b'])
    with Image.open(folder / 'b' / '1.png') as im:
        assert im.mode == 'L' and np.array_equal(np.asarray(im), x[1, 0].numpy())
    with pytest.raises(ValueError, match='folder name'):
        write_image_folder(tmp_path, x, torch.tensor([0, 1]), ['a', '../b'])
    with pytest.raises(ValueError, match='2 images but y has 3 labels'):
        write_image_folder(tmp_path, x, torch.tensor([0, 1, 1]), ['a', 'b'])
    with pytest.raises(ValueError, match='there are 1 classes'):
        write_image_folder(tmp_path, x, torch.tensor([0, 1]), ['a'])


def test_failed_download_does_not_suggest_download_true_and_names_its_parts(tmp_path, monkeypatch):
    """The message after a failed download said 'or call load_cifar(..., download=True)': what had just failed."""
    from minifast.data.datasets import DatasetNotFoundError

    def offline(root, train=True, download=False):
        raise OSError('no network')
    fake_torchvision(monkeypatch, offline)
    with pytest.raises(DatasetNotFoundError) as e:
        load_cifar(tmp_path, 'cifar100', download=True)
    assert 'download=True' not in str(e.value) and 'no network' in str(e.value)
    assert e.value.folder == tmp_path / 'cifar-100-python' and e.value.missing == ['train', 'test', 'meta']
    assert e.value.url == CIFAR_URL and isinstance(e.value.download_error, OSError)
    with pytest.raises(FileNotFoundError, match=r"download=True\)\.$"):  # not tried: offered
        load_cifar(tmp_path, 'cifar100', download=False)
