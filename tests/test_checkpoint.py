"""load_state never runs code from a file and names the file in every error; Learner.load keeps the model."""
import errno
import os
import pickle
import re
import subprocess
import sys
import threading
import types
import warnings
import zipfile

import pytest
import torch
from torch import nn

from minifast import Learner, checkpoint
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
    monkeypatch.setitem(sys.modules, 'safetensors', None)  # import safetensors.torch now raises ImportError ...
    monkeypatch.setitem(sys.modules, 'safetensors.torch', None)  # ... also once timm (say) has imported it
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


# ---- issue 16: checksums, stale temp files, a full disk ---------------------------------------------------------
def _files_minifast_writes(tmp_path):
    """One file of each kind minifast writes: a Checkpoint file, a learn.save file, a WeightSnapshots file."""
    from minifast import Checkpoint, WeightSnapshots
    learn = _learner(tmp_path)
    learn.fit(1, callbacks=[Checkpoint(every='epoch'), WeightSnapshots(path=tmp_path / 'snaps')])
    (ckpt,) = (tmp_path / 'checkpoints').glob('*.pth')
    return learn, {'checkpoint': ckpt, 'learn.save': learn.save('stage1'), 'snapshot': tmp_path / 'snaps' /
                   'snapshot_0.pth'}


def _entry_spans(file):
    """{zip entry name: (start, end) of its data in the file}."""
    spans = {}
    with zipfile.ZipFile(file) as z, open(file, 'rb') as f:
        for info in z.infolist():
            f.seek(info.header_offset + 26)
            n_name, n_extra = int.from_bytes(f.read(2), 'little'), int.from_bytes(f.read(2), 'little')
            start = info.header_offset + 30 + n_name + n_extra
            spans[info.filename] = (start, start + info.compress_size)
    return spans


@pytest.mark.parametrize('overlap', ['inline', 'thread'])
def test_every_file_minifast_writes_refuses_any_flipped_byte(tmp_path, monkeypatch, overlap):
    from minifast import CorruptCheckpointError
    if overlap == 'thread':  # the path of large files: the checksum computed in a thread while torch reads
        monkeypatch.setattr(checkpoint, '_OVERLAP', 0)
    _, files = _files_minifast_writes(tmp_path)
    for kind, file in files.items():
        good = file.read_bytes()
        assert zipfile.ZipFile(file).comment.startswith(b'minifast-checksum-1 '), kind
        n = len(good)
        spans = _entry_spans(file)
        pkl = next(v for k, v in spans.items() if k.endswith('data.pkl'))
        # spread over the file, its first and last bytes, the pickle, a tensor's data, the zip's end record
        data = spans[next(k for k in spans if '/data/' in k)]
        positions = sorted({*range(0, n, max(1, n // 24)), n - 1, n - 30, n - 50,
                            *range(*pkl, max(1, (pkl[1] - pkl[0]) // 8)),
                            *range(*data, max(1, (data[1] - data[0]) // 5))})
        silently = 0
        for i, pos in enumerate(positions):
            bad = bytearray(good)
            bad[pos] ^= (0x01, 0x80, 0xFF)[i % 3]
            file.write_bytes(bad)
            with pytest.raises(CorruptCheckpointError) as err:
                load_state(file)
            assert str(file) in str(err.value) and err.value.file == file, (kind, pos, str(err.value))
            if pkl[0] <= pos < pkl[1]:
                assert 'the pickled structure' in str(err.value), (kind, pos, str(err.value))
            if i % 2:
                continue
            try:  # what torch.load alone makes of it (no check): values changed without a word, often
                with warnings.catch_warnings():
                    warnings.simplefilter('ignore')
                    torch.load(file, weights_only=True)
                silently += 1
            except Exception:
                pass
        if kind == 'snapshot':  # every byte of the zip's end record and the checksum after it, 0x20 too (a's case)
            for pos in range(n - 66, n):
                for mask in (0x01, 0x20):
                    bad = bytearray(good)
                    bad[pos] ^= mask
                    file.write_bytes(bad)
                    with pytest.raises(CorruptCheckpointError, match=re.escape(str(file))):
                        load_state(file)
        file.write_bytes(good)
        load_state(file)
        assert silently > len(positions) // 8, (kind, silently, len(positions))  # the check is what catches them


def test_corrupt_files_are_refused_where_users_load_them(tmp_path):
    from minifast import CorruptCheckpointError
    learn, files = _files_minifast_writes(tmp_path)
    for file in files.values():  # a flip in the data of a tensor: torch.load alone returns a changed value
        start, end = max(v for k, v in _entry_spans(file).items() if '/data/' in k)
        bad = bytearray(file.read_bytes())
        bad[(start + end) // 2] ^= 0x10
        file.write_bytes(bad)
    snap = snapshot(learn.model)
    with pytest.raises(CorruptCheckpointError, match=r'stage1\.pth is corrupt: checksum [0-9a-f/]+ expected, '
                                                     r'[0-9a-f/]+ found \(in entry .*/data'):
        learn.load('stage1')
    assert identical(learn.model, snap)
    with pytest.raises(CorruptCheckpointError, match=files['checkpoint'].name):
        learn.fit(1, resume=files['checkpoint'])  # the file named: no other one stands in for it
    assert identical(learn.model, snap)
    from minifast import WeightSnapshots
    with pytest.raises(CorruptCheckpointError, match='snapshot_0.pth'):
        WeightSnapshots().load_state_dict({'files': {0: str(files['snapshot'])}, 'snapshots': {}})
    assert issubclass(CorruptCheckpointError, ValueError)


def _open_fds():
    return len(os.listdir('/proc/self/fd')) if os.path.isdir('/proc/self/fd') else None


@pytest.mark.parametrize('failure', [None, 'torch', 'interrupt', 'corrupt'])
def test_the_threaded_check_leaves_no_thread_or_descriptor(tmp_path, monkeypatch, failure):
    """A large file's checksum is computed in a thread on a descriptor of its own; whatever torch.load does (load,
    fail, be interrupted), the load returns only once that thread is done and its descriptor closed, and Ctrl-C
    stays Ctrl-C."""
    from minifast import CorruptCheckpointError
    monkeypatch.setattr(checkpoint, '_OVERLAP', 1 << 10)
    monkeypatch.setattr(checkpoint, '_CHUNK', 1 << 10)  # many reads: the thread is still busy when torch fails
    sd = {'w': torch.randn(64, 1000)}
    file = atomic_save(sd, tmp_path / 'big.pth')
    if failure == 'corrupt':
        bad = bytearray(file.read_bytes())
        bad[len(bad) // 2] ^= 0x04
        file.write_bytes(bad)
    elif failure is not None:
        def broken(*args, **kwargs):
            raise KeyboardInterrupt if failure == 'interrupt' else RuntimeError('torch failed')
        monkeypatch.setattr(checkpoint.torch, 'load', broken)
    threads, fds = threading.active_count(), _open_fds()
    expected = {None: None, 'torch': CorruptCheckpointError, 'interrupt': KeyboardInterrupt,
                'corrupt': CorruptCheckpointError}[failure]
    if expected is None:
        assert torch.equal(load_state(file)['w'], sd['w'])
    else:
        with pytest.raises(expected) as err:
            load_state(file)
        if failure == 'torch':  # the file is intact: torch's own failure is reported, naming the file
            assert 'torch failed' in str(err.value) and 'checksum' not in str(err.value)
        if failure == 'corrupt':
            assert 'checksum' in str(err.value)
    assert threading.active_count() == threads and _open_fds() == fds


def test_the_checksum_reads_the_same_through_pread_as_through_the_file(tmp_path, monkeypatch):
    file = atomic_save({'w': torch.randn(5, 333)}, tmp_path / 'a.pth')  # no multiple of 512 bytes
    size = file.stat().st_size
    with open(file, 'rb') as f:
        ref = checkpoint._digest(f, size)
        f.seek(0)
        assert checkpoint._digest(f.fileno(), size) == ref and f.tell() == 0  # pread: the offset stays
        monkeypatch.delattr(checkpoint.os, 'preadv', raising=False)  # platforms with pread only
        assert checkpoint._digest(f.fileno(), size) == ref and f.tell() == 0
        assert checkpoint._digest(f, size, mapped=True) == ref


def test_files_without_a_checksum_still_load(tmp_path):
    sd = snapshot(bn_model())
    for i, kw in enumerate([{}, {'_use_new_zipfile_serialization': False}]):  # torch.save, old minifast, legacy
        file = tmp_path / f'plain{i}.pth'
        torch.save({'model': sd}, file, **kw)
        assert all(torch.equal(load_state(file)['model'][k], v) for k, v in sd.items())
    learn = _learner(tmp_path)
    learn.load(tmp_path / 'plain0.pth')
    assert identical(learn.model, sd)


def test_a_checksummed_file_is_a_plain_torch_zip_file(tmp_path):
    sd = {'w': torch.randn(3, 700), 'n': 3, 'empty': torch.empty(0)}  # a size that is no multiple of 512
    file = atomic_save(sd, tmp_path / 'a.pth')
    with zipfile.ZipFile(file) as z:
        assert z.testzip() is None  # torch's own per-entry CRCs still hold
    for loaded in (torch.load(file, weights_only=True), load_state(file)):
        assert torch.equal(loaded['w'], sd['w']) and loaded['n'] == 3 and loaded['empty'].numel() == 0


def _dead_pid():
    p = subprocess.Popen([sys.executable, '-c', 'pass'])
    p.wait()
    return p.pid


def test_stale_temp_files_of_dead_writers_are_removed_at_the_next_save(tmp_path):
    import fcntl
    import time
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    zombie = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        zombie.kill()  # killed, not reaped yet: a zombie, whose file is stale all the same
        for _ in range(500):
            if open(f'/proc/{zombie.pid}/stat').read().rsplit(')', 1)[1].split()[0] == 'Z':
                break
            time.sleep(0.01)
        names = {'dead': f'.ckpt_00001.pth.p{dead}.abcd_123.tmp', 'zombie': f'.m.pth.p{zombie.pid}.zzzzzzzz.tmp',
                 'live': f'.ckpt_00002.pth.p{live.pid}.abcdefgh.tmp', 'own': f'.x.pth.p{os.getpid()}.q1w2e3r4.tmp',
                 'locked': f'.y.pth.p{dead}.lockedxx.tmp', 'old pattern': '.ckpt_00003.pth.abcdefgh.tmp',
                 'other': 'notes.p1.abcdefgh.tmp'}
        for name in names.values():
            (tmp_path / name).write_bytes(b'partial')
        with open(tmp_path / names['locked'], 'rb') as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # a writer on another machine of a shared folder (its PID means nothing)
            atomic_save({'w': torch.ones(2)}, tmp_path / 'model.pth')
        left = {k for k, name in names.items() if (tmp_path / name).exists()}
        assert left == {'live', 'own', 'locked', 'old pattern', 'other'}
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp') and 'p' + str(os.getpid())
                      in p.name and p.name != names['own']) == []  # the save's own temp file is gone
        atomic_save({'w': torch.ones(2)}, tmp_path / 'model.pth')
        assert not (tmp_path / names['locked']).exists()  # its lock is gone
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def test_temp_file_of_a_save_carries_its_writers_pid_and_lock(tmp_path, monkeypatch):
    import fcntl
    seen = []
    real_save = torch.save

    def spying_save(obj, f, *a, **k):
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]
        seen.append(tmp.name)
        with open(tmp, 'rb') as g, pytest.raises(BlockingIOError):
            fcntl.flock(g, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', spying_save)
    atomic_save({'w': torch.ones(2)}, tmp_path / 'model.pth')
    assert re.fullmatch(rf'\.model\.pth\.p{os.getpid()}\.[a-z0-9_]{{8}}\.tmp', seen[0]), seen


class _FullDisk:
    """A file whose device fills up after `room` bytes, as torch sees it: write raises OSError(ENOSPC)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        n = memoryview(b).nbytes
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize('room', [0, 3000])
def test_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch, room):
    learn = _learner(tmp_path)
    file = learn.save('stage1')
    good = file.read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, 'save', lambda obj, f, *a, **k: real_save(obj, _FullDisk(f, room), *a, **k))
    # with room for a part of it, torch itself reports `RuntimeError: [enforce fail at inline_container.cc:...]
    # . unexpected pos ...` (the OSError only as its context)
    with pytest.raises(OSError, match=r'stage1\.pth: no space left on device while writing it \(\d+ bytes free '
                                      r'after \d+ bytes written\); the previous stage1\.pth is unchanged and no '
                                      r'partial file was left') as err:
        learn.save('stage1')
    assert err.value.errno == errno.ENOSPC
    if room:
        assert 'unexpected pos' in str(err.value.__cause__)
    assert file.read_bytes() == good
    assert sorted(p.name for p in file.parent.iterdir()) == ['stage1.pth']


def test_full_disk_without_an_errno_is_told_by_the_free_space(tmp_path, monkeypatch):
    import shutil

    def failing_save(obj, f, *a, **k):  # torch writing to a path: only the enforce failure comes back
        f.write(b'x' * 100)
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 800256 vs 800144')
    monkeypatch.setattr(torch, 'save', failing_save)
    with pytest.raises(RuntimeError, match='unexpected pos 800256'):  # room left: not a full disk, left as it is
        atomic_save({'w': torch.ones(2)}, tmp_path / 'a.pth')
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: usage._replace(free=512))
    with pytest.raises(OSError, match=r'a\.pth: no space left on device while writing it \(512 bytes free after '
                                      r'100 bytes written\)'):
        atomic_save({'w': torch.ones(2)}, tmp_path / 'a.pth')
    assert list(tmp_path.iterdir()) == []


def test_full_disk_at_fsync_names_the_file(tmp_path, monkeypatch):
    atomic_save({'w': torch.zeros(2)}, tmp_path / 'a.pth')

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'fsync', fsync)
    with pytest.raises(OSError, match=r'a\.pth: no space left on device'):
        atomic_save({'w': torch.ones(2)}, tmp_path / 'a.pth')
    monkeypatch.undo()
    assert torch.equal(load_state(tmp_path / 'a.pth')['w'], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ['a.pth']


def test_checkpoint_io_benchmark_smoke_run(capsys):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'checkpoint_io.py')
    spec = importlib.util.spec_from_file_location('bench_checkpoint_io', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(['--rounds', '1', '--mb', '0.2'])
    assert out['minifast/unchecked save+load'] > 0
    assert 'RESULT checksum cost' in capsys.readouterr().out
