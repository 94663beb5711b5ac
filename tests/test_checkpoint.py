"""load_state never runs code from a file and names the file in every error; Learner.load keeps the model."""
import os
import pickle
import sys
import types
import zipfile

import pytest
import torch
from torch import nn

from minifast import Learner
from minifast.checkpoint import UnsafeCheckpointError, atomic_save, load_state
from conftest import make_data

pytestmark = pytest.mark.filterwarnings('ignore:Detected pickle protocol:UserWarning')


def _make_marker(path):
    """What a malicious file would run on load: leaves a file behind."""
    open(path, 'w').close()


class MarkerPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_make_marker, (str(self.marker),))


class PlainObject:
    """An arbitrary class: refused too, as unpickling it would import and build it."""


class ShellPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def _write(kind, obj, file):
    if kind == 'torch':
        torch.save({'model': obj}, file)
    elif kind == 'torch_legacy':
        torch.save({'model': obj}, file, _use_new_zipfile_serialization=False)
    else:
        with open(file, 'wb') as f:
            pickle.dump({'model': obj}, f, protocol=pickle.HIGHEST_PROTOCOL if kind == 'pickle' else 2)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def identical(model, snap):
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in snap)


@pytest.mark.parametrize('kind', ['torch', 'torch_legacy', 'pickle', 'pickle2'])
@pytest.mark.parametrize('payload, name', [(MarkerPayload, '_make_marker'), (ShellPayload, 'system')])
def test_pickled_code_is_refused_and_never_run(tmp_path, kind, payload, name):
    marker, file = tmp_path / 'marker', tmp_path / 'evil.pth'
    _write(kind, payload(marker), file)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_state(file)
    msg = str(info.value)
    assert str(file) in msg and name in msg
    assert 'never runs code' in msg and 'weights_only=False' in msg
    assert isinstance(info.value, ValueError)
    assert not marker.exists()


def test_os_system_is_named_as_such(tmp_path):
    file = tmp_path / 'evil.pth'
    torch.save(ShellPayload(tmp_path / 'marker'), file)
    with pytest.raises(UnsafeCheckpointError, match=r'os\.system'):
        load_state(file)
    assert not (tmp_path / 'marker').exists()


def test_builtin_and_class_globals_are_named(tmp_path):
    file = tmp_path / 'eval.pth'
    with open(file, 'wb') as f:  # a hand-made protocol-0 pickle: builtins.eval('1+1')
        f.write(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafeCheckpointError, match=r'builtins\.eval'):
        load_state(file)
    file = tmp_path / 'obj.pth'
    torch.save({'opt': PlainObject()}, file)
    with pytest.raises(UnsafeCheckpointError, match=r'refers to [\w.]*PlainObject'):
        load_state(file)


def test_plain_data_in_a_pickle_torch_refuses_says_why(tmp_path):
    file = tmp_path / 'data.pth'
    with open(file, 'wb') as f:
        pickle.dump({'lr': 0.1}, f, protocol=5)
    with pytest.raises(UnsafeCheckpointError, match=r'data\.pth: refused to load: it uses pickle opcodes '
                                                    r'\(Unsupported operand \d+\)'):
        load_state(file)


def _state_file(tmp_path, name='good.pth'):
    file = tmp_path / name
    atomic_save({'model': bn_model().state_dict()}, file)
    return file


def test_truncated_file_names_file_and_size(tmp_path):
    file = _state_file(tmp_path)
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError) as info:
        load_state(file)
    assert not isinstance(info.value, UnsafeCheckpointError)
    msg = str(info.value)
    assert str(file) in msg and f'({len(data) // 2} bytes)' in msg and 'truncated or not a torch file' in msg


@pytest.mark.parametrize('content', [b'', b'epoch,loss\n0,1.5\n', bytes(range(256)) * 4, b'PK\x03\x04broken zip'],
                         ids=['empty', 'text', 'binary', 'broken_zip'])
def test_files_that_are_not_torch_files(tmp_path, content):
    file = tmp_path / 'model.pth'
    file.write_bytes(content)
    with pytest.raises(ValueError, match=rf'{len(content)} bytes\) is truncated or not a torch file') as info:
        load_state(file)
    assert str(file) in str(info.value) and not isinstance(info.value, UnsafeCheckpointError)


def test_zip_that_is_not_a_torch_file(tmp_path):
    file = tmp_path / 'model.pth'
    with zipfile.ZipFile(file, 'w') as z:
        z.writestr('notes.txt', 'hello')
    with pytest.raises(ValueError, match='is truncated or not a torch file') as info:
        load_state(file)
    assert str(file) in str(info.value)


def test_missing_file_lists_files_nearby(tmp_path):
    _state_file(tmp_path, 'stage1.pth')
    with pytest.raises(FileNotFoundError, match=r'no such file: .*stage2\.pth \(files there: stage1\.pth\)'):
        load_state(tmp_path / 'stage2.pth')


def _learner(tmp_path):
    return Learner(make_data(), bn_model(), path=tmp_path, silent=True)


@pytest.mark.parametrize('bad', ['malicious', 'truncated'])
def test_learner_load_of_a_bad_file_leaves_model_unchanged(tmp_path, bad):
    learn = _learner(tmp_path)
    learn.fit(1)  # non-trivial weights, BatchNorm statistics and optimizer state
    file = learn.save('stage1')
    if bad == 'malicious':
        torch.save({'model': ShellPayload(tmp_path / 'marker')}, file)
    else:
        data = file.read_bytes()
        file.write_bytes(data[:len(data) // 2])
    torch.manual_seed(1)
    for p in learn.model.parameters():  # differ from what the file held before it was spoilt
        p.data.normal_()
    snap = snapshot(learn.model)
    with pytest.raises(UnsafeCheckpointError if bad == 'malicious' else ValueError, match='stage1.pth'):
        learn.load('stage1')
    assert identical(learn.model, snap)
    assert not (tmp_path / 'marker').exists()


def test_save_load_round_trip(tmp_path):
    learn = _learner(tmp_path)
    learn.fit(1)
    saved = snapshot(learn.model)
    learn.save('stage1')
    learn.fit(1)
    assert not identical(learn.model, saved)
    learn.load('stage1')
    assert identical(learn.model, saved)
    sd = load_state(tmp_path / 'models' / 'stage1.pth')
    assert all(torch.equal(sd['model'][k], v) for k, v in saved.items())


def test_safetensors_needs_the_package(tmp_path, monkeypatch):
    file = tmp_path / 'model.safetensors'
    file.write_bytes(b'not read')
    monkeypatch.setitem(sys.modules, 'safetensors', None)  # import safetensors.torch now raises ImportError
    with pytest.raises(ImportError, match=r'model\.safetensors.*`safetensors` package'):
        load_state(file)


def test_safetensors_files_go_through_safetensors(tmp_path, monkeypatch):
    calls = []

    def load_file(path, device='cpu'):
        calls.append((path, device))
        if path.endswith('bad.safetensors'):
            raise RuntimeError('header too large')
        return {'w': torch.ones(2)}

    pkg, mod = types.ModuleType('safetensors'), types.ModuleType('safetensors.torch')
    mod.load_file, pkg.torch = load_file, mod
    monkeypatch.setitem(sys.modules, 'safetensors', pkg)
    monkeypatch.setitem(sys.modules, 'safetensors.torch', mod)
    good, bad = tmp_path / 'good.safetensors', tmp_path / 'bad.safetensors'
    good.write_bytes(b'x' * 10)
    bad.write_bytes(b'x' * 7)
    assert torch.equal(load_state(good)['w'], torch.ones(2))
    assert calls == [(str(good), 'cpu')]
    with pytest.raises(ValueError, match=r'bad\.safetensors \(7 bytes\) is truncated or not a torch file'):
        load_state(bad)


def test_learner_load_of_another_optimizers_state_is_refused(tmp_path):
    from functools import partial
    learn = _learner(tmp_path)  # AdamW
    learn.fit(1)
    learn.save('adamw')
    sgd = Learner(make_data(), bn_model(), path=tmp_path, silent=True, opt_func=partial(torch.optim.SGD, momentum=0.9))
    sgd.fit(1)
    snap, opt_before = snapshot(sgd.model), sgd.opt.state_dict()
    with pytest.raises(ValueError, match=r"adamw\.pth: its optimizer state is not one of this learner's SGD.*"
                                         r"'momentum'"):
        sgd.load('adamw')
    assert identical(sgd.model, snap)
    assert sgd.opt.state_dict()['param_groups'] == opt_before['param_groups']
    sgd.fit(1)  # the optimizer still steps
    sgd.load('adamw', with_opt=False)
    assert identical(sgd.model, snapshot(learn.model))


def test_atomic_save_gives_the_file_the_usual_mode(tmp_path):
    file = atomic_save({'x': torch.ones(2)}, tmp_path / 'a.pth')  # under the process's umask, as read at import
    torch.save({'x': torch.ones(2)}, tmp_path / 'b.pth')
    mode = (tmp_path / 'b.pth').stat().st_mode & 0o777
    assert file.stat().st_mode & 0o777 == mode, oct(mode)  # mkstemp alone gives 0o600 (0o644 expected here)


@pytest.mark.parametrize('prefix', ['module.', '_orig_mod.', '_orig_mod.module.'])
def test_learner_load_of_a_wrapped_models_state_dict(tmp_path, prefix):
    learn = _learner(tmp_path)  # a file torch.save'd from a DDP / DataParallel / torch.compile wrapper's state_dict
    learn.fit(1)
    saved = snapshot(learn.model)
    (tmp_path / 'models').mkdir(exist_ok=True)
    torch.save({prefix + k: v for k, v in saved.items()}, tmp_path / 'models' / 'wrapped.pth')
    other = _learner(tmp_path)
    other.load('wrapped')
    assert identical(other.model, saved)
