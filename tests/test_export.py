"""learn.export / load_learner: a folder of weights and a JSON manifest, no pickle; predictions equal bit for bit
after a round trip (also in a fresh process); tampered, hostile and mismatched exports are refused naming the file;
an interrupted export leaves the previous one as it was."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minifast.export as export_mod
from minifast import (CorruptExportError, DataBunch, ExportError, ImageDataBunch, Learner, UnsafeExportError,
                      cifar_resnet, create_cnn, load_learner)
from minifast.checkpoint import CorruptCheckpointError
from minifast.data.core import TensorDataLoader
from minifast.models import model_spec

from conftest import make_data

ROOT = Path(__file__).resolve().parent.parent

# a model class in an importable module of the user's (written into tmp_path, put on sys.path)
MYMODELS = '''
import pathlib
from os import getcwd  # a name from elsewhere: trusting mymodels does not trust os
from torch import nn
pathlib.Path(__file__).with_name('imported.txt').write_text('imported')  # shows whether anything imported this

class Net(nn.Module):
    def __init__(self, n_in=8, n_out=3, hidden=16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.out(self.body(x))
'''


def image_learner(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (56, 3, 12, 12), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 3, (56,), generator=g)
    data = ImageDataBunch.from_tensors(x[:40], y[:40], x[40:], y[40:], classes=['a', 'b', 'c'], bs=8,
                                       device='cpu').normalize()
    torch.manual_seed(seed)
    learn = Learner(data, cifar_resnet(8, 3), path=path, device='cpu', silent=True)
    learn.fit(1, 1e-3)
    return learn


@pytest.fixture
def img_learn(tmp_path):
    return image_learner(tmp_path)


@pytest.fixture
def mymodels(tmp_path, monkeypatch):
    d = tmp_path / 'userpkg'
    d.mkdir()
    (d / 'mymodels.py').write_text(MYMODELS)
    monkeypatch.syspath_prepend(str(d))
    yield d
    sys.modules.pop('mymodels', None)


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def edit_manifest(folder, fn):
    m = json.loads((folder / 'manifest.json').read_text())
    fn(m)
    (folder / 'manifest.json').write_text(json.dumps(m))


def test_model_functions_record_how_they_were_built():
    assert model_spec(cifar_resnet(8, 3)) == ({'factory': 'minifast.models.cifar:cifar_resnet',
                                                'args': {'depth': 8, 'num_classes': 3}}, None)
    import torchvision.models as tvm
    spec, _ = model_spec(create_cnn(tvm.resnet18, 4, lin_ftrs=[32]))
    assert spec['factory'] == 'minifast.models.cnn:create_cnn'
    assert spec['args']['arch'] == 'torchvision.models.resnet:resnet18'
    assert spec['args']['pretrained'] is False and spec['args']['lin_ftrs'] == [32] and spec['args']['nc'] == 4
    spec, reason = model_spec(create_cnn(tvm.resnet18, 4, cut=lambda m: nn.Sequential(*list(m.children())[:-2])))
    assert spec is None and 'cut' in reason


def test_image_learner_round_trip_in_a_fresh_process(img_learn, tmp_path):
    """The exported folder alone (no training data) rebuilds, in another process, a learner whose probabilities
    equal the live learner's bit for bit on the same validation images."""
    folder = img_learn.export('exp')
    assert sorted(os.listdir(folder)) == ['manifest.json', 'weights.pth']
    xv, yv = img_learn.data.valid_ds.x, img_learn.data.valid_ds.y
    torch.save({'x': xv, 'y': yv}, tmp_path / 'valid.pt')
    live = img_learn.get_preds()[0]
    live_one = img_learn.predict(xv[3])
    script = textwrap.dedent(f'''
        import torch
        torch.set_num_threads({torch.get_num_threads()})
        from minifast import load_learner
        from minifast.data.core import TensorDataLoader
        learn = load_learner({str(tmp_path)!r}, 'exp')
        assert len(learn.data.train_ds) == 0 and len(learn.data.valid_ds) == 0
        v = torch.load({str(tmp_path / 'valid.pt')!r}, weights_only=True)
        dl = TensorDataLoader(v['x'], v['y'], batch_size=8, after_batch=learn.data.valid_dl.after_batch)
        torch.save({{'preds': learn.get_preds(dl=dl)[0], 'one': learn.predict(v['x'][3])}},
                   {str(tmp_path / 'out.pt')!r})
    ''')
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'MPLBACKEND': 'Agg'}
    r = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = torch.load(tmp_path / 'out.pt', weights_only=True)
    assert torch.equal(out['preds'], live)
    assert out['one'][:2] == live_one[:2] and torch.equal(out['one'][2], live_one[2])


def test_image_learner_round_trip_keeps_inputs_spec_and_cannot_train(img_learn, tmp_path):
    img_learn.export()
    learn = load_learner(tmp_path)
    assert learn.data.classes == ['a', 'b', 'c'] and learn.data.size == (12, 12)
    assert torch.equal(learn.data.stats[0], img_learn.data.stats[0])
    assert torch.equal(learn.get_preds(dl=img_learn.data.valid_dl)[0], img_learn.get_preds()[0])
    with pytest.raises(ValueError, match='no training data') as e:
        learn.fit(1)
    assert 'learn.load(' in str(e.value) and 'cifar_resnet(depth=8, num_classes=3)' in str(e.value)
    # what the message says to do works: the weights load into a learner built with data
    again = Learner(img_learn.data, cifar_resnet(8, 3), device='cpu', silent=True)
    again.load(str(tmp_path / 'export' / 'weights.pth'))
    assert torch.equal(again.get_preds()[0], img_learn.get_preds()[0])


def test_tensor_databunch_round_trip_with_a_loss_class(tmp_path):
    data = make_data()
    torch.manual_seed(0)
    learn = Learner(data, nn.Linear(8, 3), loss_func=nn.CrossEntropyLoss(label_smoothing=0.1), path=tmp_path,
                    device='cpu', silent=True)
    learn.fit(1, 1e-2)
    learn.export(factory=nn.Linear, args={'in_features': 8, 'out_features': 3})
    m = json.loads((tmp_path / 'export' / 'manifest.json').read_text())
    assert m['loss'] == {'class': 'torch.nn.modules.loss:CrossEntropyLoss', 'activation': 'softmax',
                         'kwargs': {'weight': None, 'ignore_index': -100, 'reduction': 'mean',
                                    'label_smoothing': 0.1}}
    assert m['data']['kind'] == 'tensor' and m['data']['inputs'] == [{'shape': [8], 'dtype': 'float32'}]
    back = load_learner(tmp_path)
    assert isinstance(back.data.train_ds, torch.utils.data.TensorDataset) and len(back.data.train_ds) == 0
    assert back.data.c == 3 and back.loss_func.label_smoothing == 0.1
    live, loaded = learn.get_preds(with_loss=True), back.get_preds(dl=data.valid_dl, with_loss=True)
    assert all(torch.equal(a, b) for a, b in zip(live, loaded))
    assert back.predict(data.valid_ds[0][0])[1] == learn.predict(data.valid_ds[0][0])[1]


def test_create_cnn_round_trip(tmp_path):
    import torchvision.models as tvm
    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(24) % 2
    data = ImageDataBunch.from_tensors(x[:16], y[:16], x[16:], y[16:], bs=8, device='cpu')
    learn = Learner(data, create_cnn(tvm.resnet18, 2, lin_ftrs=[16]), path=tmp_path, device='cpu', silent=True)
    learn.model.eval()
    learn.export()
    back = load_learner(tmp_path)
    assert torch.equal(back.get_preds(dl=data.valid_dl)[0], learn.get_preds()[0])


def test_tampered_weights_are_refused_naming_the_file(img_learn, tmp_path):
    folder = img_learn.export()
    w = folder / 'weights.pth'
    b = bytearray(w.read_bytes())
    b[len(b) // 2] ^= 0x01
    w.write_bytes(bytes(b))
    with pytest.raises(CorruptExportError, match='sha256') as e:
        load_learner(tmp_path)
    assert e.value.file == w and str(w) in str(e.value)
    # a manifest rewritten to match the changed file: the weights file's own checksum still refuses it
    digest = export_mod._sha256(w)
    edit_manifest(folder, lambda m: m['weights'].update(sha256=digest))
    with pytest.raises(CorruptCheckpointError, match='checksum') as e:
        load_learner(tmp_path)
    assert str(w) in str(e.value)
    w.write_bytes(bytes(b[:100]))
    with pytest.raises(CorruptExportError, match='100 bytes'):
        load_learner(tmp_path)


def test_a_broken_manifest_is_refused_naming_it(img_learn, tmp_path):
    folder = img_learn.export()
    mf = folder / 'manifest.json'
    good = mf.read_text()
    mf.write_text(good[:-20])
    with pytest.raises(CorruptExportError, match='not valid JSON') as e:
        load_learner(tmp_path)
    assert e.value.file == mf
    for edit, what in ((lambda m: m.pop('weights'), 'weights'), (lambda m: m['model'].pop('factory'), 'factory'),
                       (lambda m: m['weights'].update(file='../../x.pth'), 'weights.file'),
                       (lambda m: m.update(version=99), 'upgrade')):
        mf.write_text(good)
        edit_manifest(folder, edit)
        with pytest.raises(CorruptExportError, match=what):
            load_learner(tmp_path)
    mf.unlink()
    with pytest.raises(CorruptExportError, match='no manifest.json'):
        load_learner(tmp_path)
    (tmp_path / 'export.pkl').write_bytes(b'\x80\x04pickle')
    with pytest.raises(ExportError, match='never loads'):
        load_learner(tmp_path, 'export.pkl')


def test_an_untrusted_factory_is_refused_without_importing_it(img_learn, tmp_path, mymodels):
    folder = img_learn.export()
    for name in ('os:system', 'mymodels:Net', 'minifast.learner:Path', 'minifast.checkpoint:atomic_save',
                 'minifast.models.cifar:_model_dict', 'torchvision.models:get_model'):
        edit_manifest(folder, lambda m: m['model'].update(factory=name, args={}))
        with pytest.raises(UnsafeExportError, match=name.split(':')[0]) as e:
            load_learner(tmp_path)
        assert e.value.file == folder / 'manifest.json'
    assert not (mymodels / 'imported.txt').exists() and 'mymodels' not in sys.modules
    assert "trust=('mymodels',)" in str(_refusal(tmp_path, folder, 'mymodels:Net'))
    edit_manifest(folder, lambda m: m['model'].update(factory='mymodels:getcwd', args={}))
    with pytest.raises(UnsafeExportError, match='getcwd, outside the trusted modules'):
        load_learner(tmp_path, trust=('mymodels',))
    # a loss outside the trusted modules is refused too
    edit_manifest(folder, lambda m: m.update(model={'factory': 'minifast.models.cifar:cifar_resnet',
                                                    'args': {'depth': 8, 'num_classes': 3}},
                                             loss={'function': 'builtins:eval', 'activation': 'none'}))
    with pytest.raises(UnsafeExportError, match='builtins:eval'):
        load_learner(tmp_path)
    # an argument that would fetch weights is refused
    edit_manifest(folder, lambda m: m.update(model={'factory': 'minifast.models.cnn:create_cnn',
                                                    'args': {'arch': 'torchvision.models.resnet:resnet18', 'nc': 3,
                                                             'pretrained': True}}))
    with pytest.raises(UnsafeExportError, match='pretrained=True'):
        load_learner(tmp_path)


def _refusal(path, folder, factory):
    edit_manifest(folder, lambda m: m['model'].update(factory=factory, args={}))
    with pytest.raises(UnsafeExportError) as e:
        load_learner(path)
    return e.value


def test_shape_mismatched_weights_are_refused_naming_the_keys(img_learn, tmp_path):
    folder = img_learn.export()
    edit_manifest(folder, lambda m: m['model']['args'].update(num_classes=5))
    with pytest.raises(CorruptExportError, match=r'head\.8\.weight') as e:
        load_learner(tmp_path)
    assert e.value.file == folder / 'weights.pth'


def test_a_notebook_model_gets_a_clear_error_and_exports_with_factory(tmp_path, mymodels):
    class NotebookNet(nn.Module):  # as a class defined in a notebook: another process cannot import it
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            return self.lin(x)

    data = make_data()
    learn = Learner(data, NotebookNet(), path=tmp_path, device='cpu', silent=True)
    with pytest.raises(ExportError, match='NotebookNet') as e:
        learn.export()
    assert 'factory=' in str(e.value) and 'args=' in str(e.value)
    with pytest.raises(ExportError, match='not a top-level name'):
        learn.export(factory=NotebookNet)
    NotebookNet.__module__, NotebookNet.__qualname__ = '__main__', 'NotebookNet'
    with pytest.raises(ExportError, match='__main__'):
        learn.export(factory=NotebookNet)
    assert not (tmp_path / 'export').exists()

    import mymodels
    torch.manual_seed(0)
    learn = Learner(data, mymodels.Net(hidden=4), path=tmp_path, device='cpu', silent=True)
    learn.fit(1, 1e-2)
    with pytest.raises(ExportError, match='Net'):
        learn.export()
    with pytest.raises(ExportError, match='body.0.weight'):  # arguments that build another model
        learn.export(factory='mymodels:Net')
    learn.export(factory=mymodels.Net, args={'hidden': 4})
    with pytest.raises(UnsafeExportError, match="trust=\\('mymodels',\\)"):
        load_learner(tmp_path)
    back = load_learner(tmp_path, trust=('mymodels',))
    assert torch.equal(back.get_preds(dl=data.valid_dl)[0], learn.get_preds()[0])


def test_an_interrupted_export_leaves_the_previous_one(img_learn, tmp_path, monkeypatch):
    folder = img_learn.export()
    before = folder_bytes(folder)
    img_learn.fit(1, 1e-3)  # other weights: a finished export would differ

    def cut_short(obj, file):
        Path(file).write_bytes(b'PK\x03\x04 half a file')
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, 'atomic_save', cut_short)
    with pytest.raises(KeyboardInterrupt):
        img_learn.export()
    assert folder_bytes(folder) == before
    assert sorted(os.listdir(tmp_path)) == ['export']
    monkeypatch.undo()

    # interrupted while the new folder takes the old one's place: the old one is put back
    real_rename, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new folder into the old one's place
            raise KeyboardInterrupt
        return real_rename(a, b)

    monkeypatch.setattr(export_mod.os, 'rename', rename)
    with pytest.raises(KeyboardInterrupt):
        img_learn.export()
    monkeypatch.undo()
    assert len(calls) == 3 and calls[2][1] == folder  # the third puts the old export back
    assert folder_bytes(folder) == before
    assert sorted(os.listdir(tmp_path)) == ['export']
    img_learn.export()  # and a complete export replaces it
    assert folder_bytes(folder) != before and sorted(os.listdir(tmp_path)) == ['export']


def test_export_replaces_only_an_export_and_leaves_the_rng_alone(img_learn, tmp_path):
    other = tmp_path / 'mine'
    other.mkdir()
    (other / 'notes.txt').write_text('keep me')
    with pytest.raises(ExportError, match='not an export'):
        img_learn.export('mine')
    assert (other / 'notes.txt').read_text() == 'keep me'
    rng = torch.get_rng_state()
    img_learn.export(tmp_path / 'abs')
    load_learner(tmp_path, 'abs')
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ExportError, match='args= was given without factory='):
        img_learn.export(args={'depth': 8})


def test_safetensors_round_trip(img_learn, tmp_path):
    pytest.importorskip('safetensors')
    folder = img_learn.export(format='safetensors')
    assert sorted(os.listdir(folder)) == ['manifest.json', 'weights.safetensors']
    back = load_learner(tmp_path)
    assert torch.equal(back.get_preds(dl=img_learn.data.valid_dl)[0], img_learn.get_preds()[0])
    w = folder / 'weights.safetensors'
    b = bytearray(w.read_bytes())
    b[-3] ^= 0x10
    w.write_bytes(bytes(b))
    with pytest.raises(CorruptExportError, match='weights.safetensors'):
        load_learner(tmp_path)


def test_safetensors_missing_says_how_to_install(img_learn, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'safetensors', None)
    monkeypatch.setitem(sys.modules, 'safetensors.torch', None)
    with pytest.raises(ImportError, match='pip install safetensors'):
        img_learn.export(format='safetensors')
    assert os.listdir(tmp_path) == []


def test_an_unrecorded_loss_still_predicts_alike(tmp_path):
    data = make_data()
    learn = Learner(data, nn.Linear(8, 3), loss_func=lambda o, t: F.cross_entropy(o, t), path=tmp_path,
                    device='cpu', silent=True)
    with pytest.warns(UserWarning, match='lambda'):
        learn.export(factory='torch.nn:Linear', args={'in_features': 8, 'out_features': 3})
    back = load_learner(tmp_path)
    assert torch.equal(back.get_preds(dl=data.valid_dl)[0], learn.get_preds()[0])
    with pytest.raises(RuntimeError, match='without its loss'):
        back.get_preds(dl=data.valid_dl, with_loss=True)


def test_tensor_spec_round_trip():
    data = make_data()
    spec = data.input_spec()
    assert spec == {'kind': 'tensor', 'classes': None, 'c': 3, 'inputs': [{'shape': [8], 'dtype': 'float32'}],
                    'target': {'shape': [], 'dtype': 'int64'}}
    back = DataBunch.from_spec(json.loads(json.dumps(spec)))
    assert isinstance(back.valid_dl, TensorDataLoader) and back.input_spec() == spec
    with pytest.raises(ValueError, match='dtype'):
        DataBunch.from_spec({**spec, 'inputs': [{'shape': [8], 'dtype': 'os.system'}]})


def test_debris_of_a_killed_export_is_put_back_or_removed(img_learn, tmp_path):
    folder = img_learn.export()
    before = folder_bytes(folder)
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                          text=True).stdout.strip()
    aside, half = tmp_path / f'.export.p{dead}.0123abcd.old', tmp_path / f'.export.p{dead}.4567cdef.tmp'
    os.rename(folder, aside)  # killed between moving the old export aside and moving the new one in
    half.mkdir()
    (half / 'weights.pth').write_bytes(b'half')
    with pytest.raises(FileNotFoundError, match='moved aside'):
        load_learner(tmp_path)
    export_mod._clean_stale(folder)
    assert sorted(os.listdir(tmp_path)) == ['export'] and folder_bytes(folder) == before
    (tmp_path / f'.export.p{dead}.89abcdef.old').mkdir()  # killed after the swap, before removing the old one
    img_learn.export()
    assert sorted(os.listdir(tmp_path)) == ['export']


def test_wrappers_are_removed_from_the_exported_weights(img_learn, tmp_path):
    inner = img_learn.model
    assert export_mod.bare_model(torch.compile(nn.DataParallel(inner))) is inner
    img_learn.model = nn.DataParallel(inner)
    img_learn.export()
    img_learn.model = inner
    m = json.loads((tmp_path / 'export' / 'manifest.json').read_text())
    assert m['model']['class'] == 'CifarResNet' and m['weights']['keys'] == len(inner.state_dict())
    assert torch.equal(load_learner(tmp_path).get_preds(dl=img_learn.data.valid_dl)[0], img_learn.get_preds()[0])


def test_a_timm_arch_in_a_manifest_is_a_registered_name_and_fetches_nothing(img_learn, tmp_path):
    pytest.importorskip('timm')
    folder = img_learn.export()
    cases = [({'arch': 'hf-hub:timm/resnet10t.c3_in1k'}, UnsafeExportError, 'not an importable name'),
             ({'arch': 'os'}, ExportError, "'os' is not a timm model name"),
             ({'arch': 'resnet10t', 'arch_kwargs': {'checkpoint_path': 'w.pth'}}, ExportError,
              'arch_kwargs may not hold checkpoint_path')]
    for args, err, msg in cases:
        edit_manifest(folder, lambda m: m.update(model={'factory': 'minifast.models.cnn:create_cnn',
                                                        'args': {'nc': 3, **args}}))
        with pytest.raises(err, match=msg):
            load_learner(tmp_path)
