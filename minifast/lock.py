"""Folder locks: one process at a time writes a folder (a checkpoint folder, a `minifast smith` run folder).

The lock is `fcntl.flock` on `<folder>/.minifast.lock`, which holds the holder's PID for the error message and is
removed when the lock is released. The operating system drops the lock when its process ends, however it ends (an
error, Ctrl-C, SIGKILL), so a lock file left by a killed process never blocks: the next process reuses it. A process
may take a folder it already holds again (a fit inside a fit, a Checkpoint fit inside a held folder): the lock counts
and is released by the last `release`. Without fcntl (Windows) or on a file system that refuses flock, folders are not
locked (a warning says so in the latter case).
"""
import errno
import os
import threading
import time
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: not a target; folders are simply not locked there
    fcntl = None

__all__ = ['FolderLockedError', 'LOCK_FILE', 'acquire', 'release', 'folder_lock', 'holds', 'appending']

LOCK_FILE = '.minifast.lock'
_PID_WAIT = 1.0  # seconds to wait for a holder that has just taken the lock to write its PID

_held = {}  # resolved folder -> [fd, count] of the locks this process holds
_mutex = threading.Lock()


def _forget_after_fork():
    # a forked child (e.g. a DataLoader worker) shares its parent's lock but does not hold it: it must neither count
    # on it nor release it (LOCK_UN on the inherited descriptor would unlock the parent)
    global _mutex
    _held.clear()
    _mutex = threading.Lock()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_forget_after_fork)


class FolderLockedError(RuntimeError):
    """Another process is writing the folder (it holds the folder's lock)."""

    def __init__(self, folder, pid, who='minifast'):
        self.folder, self.pid = Path(folder), pid
        holder = f'PID {pid}' if pid is not None else 'PID unknown'
        super().__init__(f'{who}: the folder {folder} is in use by another process ({holder}), which holds its lock '
                         f'file {LOCK_FILE}; two processes writing one folder overwrite each other\'s files. Wait for '
                         f'that process to end (the lock goes with it), or use another folder.')


def _key(folder):
    return Path(folder).resolve()


def _read_pid(file):
    try:
        text = Path(file).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _unsupported(e):
    return e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, 'ENOTSUP', errno.EOPNOTSUPP), errno.EINVAL)


def _same_file(fd, file):
    try:
        a, b = os.fstat(fd), os.stat(file)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _lock_file(key, who):
    """Open and flock `key`'s lock file without blocking; its descriptor (None when the file system cannot lock).
    FolderLockedError when another process holds it."""
    file = key / LOCK_FILE
    deadline = time.monotonic() + _PID_WAIT
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if _unsupported(e):
                warnings.warn(f'{who}: {key} is not locked against other processes: its file system refuses '
                              f'flock ({e.strerror}); do not run two processes on it at once')
                return None
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pid = _read_pid(file)
            if pid is not None or time.monotonic() > deadline:
                raise FolderLockedError(key, pid, who) from None
            time.sleep(0.02)  # the holder has the lock but has not written its PID yet (or is releasing it)
            continue
        if not _same_file(fd, file):  # its holder removed it on release after we opened it: lock the new one
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
        except OSError:  # e.g. a full disk: the lock holds all the same, others are told 'PID unknown'
            pass
        return fd


def acquire(folder, who='minifast'):
    """Take `folder`'s lock (creating the folder), or raise FolderLockedError naming the folder and the holder's PID
    at once when another process holds it. A process that holds it already takes it again (counted). Returns the
    folder, resolved: pass it to `release`."""
    key = _key(folder)
    key.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return key
    with _mutex:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
            return key
        _held[key] = [_lock_file(key, who), 1]
    return key


def release(folder):
    """Give back one `acquire` of `folder`; the last one unlocks it and removes its lock file."""
    key = Path(folder)
    with _mutex:
        if key not in _held:  # not the path `acquire` returned: resolve it as acquire did
            key = _key(folder)
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        fd = entry[0]
        if fd is None:
            return
        try:
            # removed while still locked: a process that opened it meanwhile finds, once it gets the lock, that the
            # path no longer names its file, and locks the path anew (see _lock_file)
            (key / LOCK_FILE).unlink(missing_ok=True)
        except OSError:
            with suppress(OSError):
                os.ftruncate(fd, 0)  # at least no PID of a process that no longer holds the folder
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: a forked child's copy of fd would keep it locked
            finally:
                os.close(fd)


def holds(folder):
    """How many times this process holds `folder`'s lock (0: not at all)."""
    entry = _held.get(_key(folder))
    return 0 if entry is None else entry[1]


@contextmanager
def folder_lock(folder, who='minifast'):
    """`acquire` for the body of a with statement, released however it ends; yields the resolved folder."""
    key = acquire(folder, who)
    try:
        yield key
    finally:
        release(key)


@contextmanager
def appending(file):
    """`file` opened for appending in binary, under an exclusive flock held for the body of the with statement, so
    that writers in several processes (search workers sharing one JSONL export) append whole lines one at a time;
    a writer waits for the one before it. Without fcntl, or where the file system refuses flock, it is not locked."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, 'a+b') as f:
        if fcntl is not None:
            with suppress(OSError):  # a file system without flock: append unlocked, as folders are then
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield f
        finally:
            f.flush()
            if fcntl is not None:
                with suppress(OSError):
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
