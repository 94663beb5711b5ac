"""Folder locks (minifast.lock): one process at a time writes a folder; the second gets an error naming the folder and
the holder's PID at once; the lock dies with its process (a stale lock file does not block); one process may take it
again; a forked child neither holds nor releases its parent's lock."""
import fcntl
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minifast import lock
from minifast.lock import LOCK_FILE, FolderLockedError, acquire, folder_lock, holds, release
from helpers import LOCK_PY, lock_holder

# a child that tries to take `folder` once and says what happened
PROBE = textwrap.dedent('''
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location('lock', sys.argv[1])
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    try:
        lock.acquire(sys.argv[2], 'probe')
    except lock.FolderLockedError as e:
        print('locked', e.pid)
    else:
        print('free')
''')


def _probe(folder):
    """'free', or 'locked <pid>', as another process sees `folder`."""
    return subprocess.run([sys.executable, '-c', PROBE, str(LOCK_PY), str(folder)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_second_process_is_refused_at_once_naming_folder_and_pid_and_sigkill_frees_it(tmp_path):
    folder = tmp_path / 'run'
    child = lock_holder(folder)
    try:
        t0 = time.perf_counter()
        with pytest.raises(FolderLockedError) as e:
            acquire(folder, 'test')
        assert time.perf_counter() - t0 < 0.5  # at once, not after waiting for the holder
        assert str(folder) in str(e.value) and f'PID {child.pid}' in str(e.value)
        assert e.value.pid == child.pid and e.value.folder == folder.resolve()
        assert holds(folder) == 0
    finally:
        child.kill()  # SIGKILL: the process cannot clean up; the OS drops its lock
        child.wait()
    assert (folder / LOCK_FILE).read_text().strip() == str(child.pid)  # a stale lock file: it must not block
    with folder_lock(folder, 'test'):
        assert (folder / LOCK_FILE).read_text().strip() == str(os.getpid())
        assert _probe(folder) == f'locked {os.getpid()}'
    assert not (folder / LOCK_FILE).exists()  # released: the lock file goes
    assert _probe(folder) == 'free'


def test_holder_that_ends_normally_releases_and_removes_the_lock_file(tmp_path):
    folder = tmp_path / 'run'
    child = lock_holder(folder, 'release')
    assert child.stdout.readline().strip() == 'released'
    assert child.wait() == 0
    assert not (folder / LOCK_FILE).exists()
    assert _probe(folder) == 'free'


def test_one_process_takes_a_folder_again_and_the_last_release_frees_it(tmp_path, monkeypatch):
    folder = tmp_path / 'a' / 'run'
    key = acquire(folder)
    assert folder.is_dir() and key == folder.resolve()
    monkeypatch.chdir(tmp_path)  # another spelling of the same folder counts as the same
    assert acquire(Path('a/run/../run')) == key and holds(folder) == 2
    release(folder)
    assert holds(folder) == 1 and _probe(folder) == f'locked {os.getpid()}'
    release(key)
    assert holds(folder) == 0 and _probe(folder) == 'free'
    release(folder)  # one release too many: nothing happens


def test_folder_lock_is_released_on_an_error_and_on_ctrl_c(tmp_path):
    for exc in (ValueError, KeyboardInterrupt):
        with pytest.raises(exc):
            with folder_lock(tmp_path / 'run'):
                raise exc()
        assert holds(tmp_path / 'run') == 0 and not (tmp_path / 'run' / LOCK_FILE).exists()


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # fork() in a process with threads (torch's)
def test_forked_child_neither_holds_nor_releases_its_parents_lock(tmp_path):
    """A DataLoader worker is a fork: it inherits the lock's descriptor. It must not count itself a holder, and its
    release must not unlock the parent (LOCK_UN on the shared descriptor would)."""
    folder = tmp_path / 'run'
    with folder_lock(folder):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then exit without running pytest's cleanup
            code = 1
            try:
                held = holds(folder)
                release(folder)
                try:
                    acquire(folder)
                    what = 'took it'
                except FolderLockedError as e:
                    what = f'locked {e.pid}'
                os.write(w, f'{held} {what}'.encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r) as f:
            said = f.read()
        os.waitpid(pid, 0)
        assert said == f'0 locked {os.getpid()}'
        assert _probe(folder) == f'locked {os.getpid()}'  # still ours after the child's release and exit
    assert _probe(folder) == 'free'


def test_without_fcntl_folders_are_not_locked_and_nothing_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, 'fcntl', None)  # as on Windows
    with folder_lock(tmp_path / 'run') as key:
        assert key.is_dir() and not (key / LOCK_FILE).exists()


def test_a_lock_file_removed_by_its_releasing_holder_meanwhile_is_not_trusted(tmp_path, monkeypatch):
    """The race of removing lock files: we open the file, its holder removes it and unlocks, we lock the removed
    file, and a third process creating the file anew would lock too. acquire must end up holding the file at the
    path. (A descriptor of our own on the file stands for the other process: flock locks conflict per open file.)"""
    folder = tmp_path / 'run'
    folder.mkdir()
    other = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    real, calls = fcntl.flock, []

    class Shim:
        LOCK_EX, LOCK_NB, LOCK_UN = fcntl.LOCK_EX, fcntl.LOCK_NB, fcntl.LOCK_UN

        @staticmethod
        def flock(fd, op):
            calls.append(op)
            if len(calls) == 1:  # the holder releases between our open and our flock
                (folder / LOCK_FILE).unlink()
                real(other, fcntl.LOCK_UN)
                os.close(other)
            return real(fd, op)
    monkeypatch.setattr(lock, 'fcntl', Shim)
    with folder_lock(folder):
        third = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(third)
    assert len(calls) == 3  # locked the removed file, then the file at the path; then released it


def test_weight_snapshots_and_grid_search_logs_are_locked_too(tmp_path):
    """WeightSnapshots(path=) and grid_search(log=) write a folder like a Checkpoint does: while another process holds
    it, the fit stops at before_fit (no snapshot written, the model unchanged) and the grid at once (no learner made,
    no run trained, nothing appended); this process holds the folder only while it writes."""
    import torch
    import minifast
    from minifast import Learner, WeightSnapshots, grid_search
    from conftest import make_data

    def learner():
        made.append(1)
        return Learner(make_data(n_train=32), torch.nn.Linear(8, 3), silent=True)

    made, folder = [], tmp_path / 'shared'
    learn = learner()
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    child = lock_holder(folder)
    try:
        with pytest.raises(minifast.CallbackException) as e:
            learn.fit(1, 1e-2, callbacks=[WeightSnapshots(path=folder)])
        assert isinstance(e.value.__cause__, FolderLockedError) and f'PID {child.pid}' in str(e.value.__cause__)
        assert 'WeightSnapshots' in str(e.value.__cause__)
        assert learn.train_iter == 0 and all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())
        made.clear()
        with pytest.raises(FolderLockedError, match=r'grid_search\(log=...\): the folder .*shared is in use'):
            grid_search(learner, {'wd': [0.]}, epochs=1, log=folder / 'runs.jsonl')
        assert made == [] and sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]
    finally:
        child.kill()
        child.wait()

    seen = []

    class Look(minifast.Callback):
        def after_epoch(self, learn):
            seen.append(holds(folder))
    learn.fit(1, 1e-2, callbacks=[WeightSnapshots(path=folder), Look()])
    res = grid_search(learner, {'wd': [0.]}, epochs=1, log=folder / 'runs.jsonl')
    assert seen == [1] and holds(folder) == 0 and not (folder / LOCK_FILE).exists()
    assert (folder / 'snapshot_0.pth').exists() and len(res.runs) == 1 and (folder / 'runs.jsonl').exists()


# a child that appends `n` records of `size` bytes to a JSONL log through grid.append_record
APPENDER = textwrap.dedent('''
    import sys
    from minifast.grid import append_record
    file, tag, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    for i in range(n):
        append_record(file, {'tag': tag, 'i': i, 'pad': 'x' * size})
''')


def test_appending_holds_an_exclusive_flock_on_the_file_until_the_body_ends(tmp_path):
    file = tmp_path / 'log' / 'runs.jsonl'
    with lock.appending(file) as f:
        f.write(b'{}\n')
        other = os.open(file, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # another writer would wait here
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    other = os.open(file, os.O_RDONLY)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at the end of the body
    finally:
        os.close(other)
    assert file.read_bytes() == b'{}\n'


def test_processes_appending_to_one_log_at_once_leave_only_whole_records(tmp_path):
    import json
    file = tmp_path / 'runs.jsonl'
    file.write_bytes(b'{"cut": ')  # a record cut short by a kill: the next append starts on a line of its own
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, '-c', APPENDER, str(file), t, '40', '70000'], env=env)
             for t in 'abc']
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    lines = file.read_text().splitlines()
    assert lines[0] == '{"cut": '
    recs = [json.loads(x) for x in lines[1:]]
    assert sorted((r['tag'], r['i']) for r in recs) == [(t, i) for t in 'abc' for i in range(40)]
    for t in 'abc':  # each writer's records in its own order
        assert [r['i'] for r in recs if r['tag'] == t] == list(range(40))
