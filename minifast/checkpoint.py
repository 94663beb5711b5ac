"""Atomic saving and safe loading of state files, with a checksum of every file minifast writes."""
import errno
import mmap
import os
import pickle
import pickletools
import re
import shutil
import struct
import tempfile
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # not on Windows: stale temp files are then recognised by their writer's PID alone
    fcntl = None

__all__ = ['atomic_save', 'load_state', 'check_state_dict', 'remove_stale_temps', 'UnsafeCheckpointError',
           'CorruptCheckpointError', 'pid_alive']

# the process's umask, read once at import: reading it means setting it, which would race with threads creating files
_UMASK = os.umask(0o022)
os.umask(_UMASK)

# atomic_save's temporary files: .{name}.p{writer's PID}.{mkstemp's 8 random characters}.tmp
_TEMP = re.compile(r'^\..+\.p(\d+)\.[a-z0-9_]{8}\.tmp$')

# The checksum sits in the zip's end record as its comment (a torch zip file carries none), so the file stays a
# plain torch file that torch.load, zipfile and unzip read. It covers every byte before the comment: the sum
# (mod 2**64) of the file's little-endian 64-bit words, which changes with any single changed word, hence any
# flipped byte, and the CRC-32 of the sums of its 512-byte blocks, which catches changes spread over blocks; both
# run at memory speed through numpy (zlib.crc32 of the whole file would cost more than the 10% the issue allows).
_MAGIC = b'minifast-checksum-1 '
_COMMENT = struct.Struct('<20s8s16s')  # magic, CRC-32 of the block sums (hex), sum of the words (hex)
_EOCD, _EOCD_SIZE = b'PK\x05\x06', 22  # a zip's end of central directory record (its comment follows it)
_BLOCK, _CHUNK = 512, 4 << 20  # block size of the summed words; bytes read at a time (a multiple of _BLOCK)
_OVERLAP = 8 << 20  # a file at least this large is checked in a thread while torch loads it
_LOW_SPACE = 4 << 20  # torch's bare write failure counts as a full disk when less than this is free


class CorruptCheckpointError(ValueError):
    """A state file whose bytes are not the ones written: its checksum differs, or torch cannot read it."""

    def __init__(self, file, detail, message=None):
        self.file, self.detail = Path(file), detail
        super().__init__(message or f'{file} is corrupt: {detail}')


def remove_stale_temps(folder):
    """Remove the temporary files `atomic_save` left in `folder` when their writer was killed (its PID is gone and
    no process holds the file's lock); the files of live writers, and any other file, stay."""
    if os.name == 'nt':  # os.kill(pid, 0) would send a Ctrl-C event there
        return []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder (yet), or one we cannot list: nothing of ours to remove
        return []
    removed = []
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or pid_alive(int(m.group(1))) or _locked(entry.path):
            continue
        try:
            os.remove(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:  # another process cleaned it first
            pass
    return removed


def pid_alive(pid):
    """Whether process `pid` exists (a zombie counts as gone); True when that cannot be told."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by another user
        return True
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:  # killed but not yet reaped by its parent: gone all the same
            return f.read().rsplit(b')', 1)[1].split()[0] != b'Z'
    except (OSError, IndexError):
        return True


def _locked(path):
    """Whether a writer holds `path`'s lock (atomic_save's writers lock their temp file: on a folder shared between
    machines, a PID says nothing about the other machine's processes)."""
    if fcntl is None:
        return False
    try:
        with open(path, 'rb') as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except FileNotFoundError:
        return True  # gone already: nothing to remove
    except OSError:  # held by a writer (or locks unsupported here: keep the file rather than guess)
        return True
    return False


def atomic_save(obj, file):
    """torch.save `obj` to `file` through a temporary file in the same folder and os.replace, with a checksum.

    A write that fails (disk full, interrupt) leaves any previous file intact and no partial file behind; a
    writer killed outright leaves its temporary file, which the next save in that folder (or a resume from it)
    removes. The checksum (in the zip's comment: the file stays a plain torch file) is verified by `load_state`.
    """
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(file.parent)
    fd, tmp = tempfile.mkstemp(prefix=f'.{file.name}.p{os.getpid()}.', suffix='.tmp', dir=file.parent)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # live while we write; dies with this process
            except OSError:  # a filesystem without locks: the PID in the name still marks the file as ours
                pass
        # mkstemp makes the file readable by its owner only; give it the mode torch.save(file) would (0o666 less
        # the umask), so a checkpoint in a shared folder stays readable by whoever could read it before
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, 'w+b') as f:
            torch.save(obj, f)
            f.flush()
            _seal(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException as e:
        full = _disk_full(e, tmp)
        if os.path.exists(tmp):
            os.remove(tmp)
        if full is not None:
            kept = f'the previous {file.name} is unchanged and ' if file.exists() else ''
            raise OSError(errno.ENOSPC, f'{file}: no space left on device while writing it ({full}); {kept}no '
                                        f'partial file was left. Free some space or save to another disk') from e
        raise
    return file


def _disk_full(err, tmp):
    """A note on the free space when `err` (raised while writing `tmp`) comes from a full disk, else None.

    torch reports a failed write as `RuntimeError: [enforce fail at inline_container.cc] . unexpected pos`, with
    the OSError it swallowed as the context (when the file is a Python object) or not at all (a path)."""
    e, seen = err, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC)):
            break
        e = e.__cause__ or e.__context__
    else:
        if not (isinstance(err, RuntimeError) and 'unexpected pos' in str(err)):
            return None
        e = None
    try:
        written = os.path.getsize(tmp)
        free = shutil.disk_usage(os.path.dirname(tmp)).free
    except OSError:
        return 'disk full' if e is not None else None
    if e is None and free >= _LOW_SPACE:  # torch's failure without a sign of a full disk: leave it as it is
        return None
    what = 'disk quota exceeded' if e is not None and e.errno != errno.ENOSPC else f'{free} bytes free'
    return f'{what} after {written} bytes written'


def _seal(f):
    """Append the checksum of the torch zip file open in `f` as its zip comment (a file that is not a torch zip
    file, e.g. an old pickle-format one, is left as it is)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - _EOCD_SIZE))
    end = f.read(_EOCD_SIZE)
    if len(end) != _EOCD_SIZE or end[:4] != _EOCD or end[-2:] != b'\0\0':
        return
    f.seek(size - 2)
    f.write(struct.pack('<H', _COMMENT.size))  # the comment's length is part of the checked bytes
    f.flush()
    crc, total = _digest(f, size, mapped=True)  # our own locked temp file: nobody truncates it
    f.seek(size)
    f.write(_COMMENT.pack(_MAGIC, b'%08x' % crc, b'%016x' % total))


def _digest(f, size, mapped=False):
    """(CRC-32 of the 512-byte blocks' word sums, sum of all words mod 2**64) of the first `size` bytes of `f` (a
    file object, or a file descriptor read with pread); the last block is padded with zeros. `mapped`: read through mmap (no copy; only for a file no other process
    can truncate meanwhile, as a truncated mapping kills the process with SIGBUS)."""
    crc, total, full = 0, 0, size - size % _BLOCK

    def add(words):
        nonlocal crc, total
        sums = words.reshape(-1, _BLOCK // 8).sum(1, dtype=np.uint64)
        crc = zlib.crc32(sums.astype('<u8', copy=False), crc)
        total = (total + int(sums.sum(dtype=np.uint64))) & 0xFFFFFFFFFFFFFFFF

    try:
        mm = mmap.mmap(f if isinstance(f, int) else f.fileno(), full, access=mmap.ACCESS_READ) if mapped and full else None
    except (OSError, ValueError):  # a filesystem that cannot map files: read it instead
        mm = None
    if mm is not None:
        with mm:
            for off in range(0, full, _CHUNK):
                words = np.frombuffer(mm, dtype='<u8', count=min(_CHUNK, full - off) // 8, offset=off)
                add(words)
                del words  # the mapping closes only once no array views it
    else:
        buf = bytearray(min(_CHUNK, full) or _BLOCK)
        view = memoryview(buf)
        for off in range(0, full, len(buf)):
            _read_exactly(f, view[:min(len(buf), full - off)], off)
            add(np.frombuffer(buf, dtype='<u8', count=min(len(buf), full - off) // 8))
    if size > full:
        last = bytearray(_BLOCK)
        _read_exactly(f, memoryview(last)[:size - full], full)
        add(np.frombuffer(last, dtype='<u8'))
    return crc, total


def _read_exactly(f, view, offset):
    """Fill `view` from `offset` of `f` (a file object, or a file descriptor read with pread: its offset, shared
    with whoever else reads that file, stays where it is)."""
    k = 0
    if isinstance(f, int):
        read = (lambda v, at: os.preadv(f, [v], at)) if hasattr(os, 'preadv') else _pread_into(f)
    else:
        f.seek(offset)
        read = lambda v, at: f.readinto(v)  # noqa: E731
    while k < len(view):
        n = read(view[k:], offset + k)
        if not n:
            raise EOFError(f'the file ended {len(view) - k} bytes early')
        k += n


def _pread_into(fd):
    def read(view, at):
        data = os.pread(fd, len(view), at)
        view[:len(data)] = data
        return len(data)
    return read


class _Verification:
    """The check of the checksum of the state file open in `f`, begun at once: the zip's end record (where the
    checksum sits) is read now, and a damaged one raises CorruptCheckpointError here. The digest of a small file is
    computed now too; that of a large one in a thread, on a descriptor of its own read with pread, while torch
    reads the same open file (a second core hides the check's cost). `result()` waits for it: False for a file that
    carries no checksum (torch.save's, an older minifast's), True when it matches; CorruptCheckpointError otherwise.
    """

    def __init__(self, f, file):
        self.file, self.found, self.error, self.thread = file, None, None, None
        size = os.fstat(f.fileno()).st_size
        n = _COMMENT.size
        f.seek(max(0, size - _EOCD_SIZE - n))
        tail = f.read()
        comment, end = tail[-n:], tail[-n - _EOCD_SIZE:-n]
        ours = comment.startswith(_MAGIC)
        sized = end[:4] == _EOCD and end[-2:] == struct.pack('<H', n)  # an end record announcing our comment's size
        self.comment = comment if ours or sized else None
        if self.comment is None:
            return
        if not (ours and sized and len(tail) == n + _EOCD_SIZE):
            raise CorruptCheckpointError(file, f'its zip end record or the checksum stored in it is damaged '
                                               f'(last {len(tail)} bytes: {tail!r})')
        if size - n < _OVERLAP or not hasattr(os, 'pread'):
            self.found = _digest(f, size - n)
            return
        fd = os.dup(f.fileno())  # closed by the thread; pread leaves the offset torch reads from alone
        self.thread = threading.Thread(target=self._digest, args=(fd, size - n), name='minifast-checksum', daemon=True)
        self.thread.start()

    def _digest(self, fd, size):
        try:
            self.found = _digest(fd, size)
        except BaseException as e:  # handed to result(), in the thread that loads
            self.error = e
        finally:
            os.close(fd)

    def wait(self):
        if self.thread is not None:
            self.thread.join()

    def result(self):
        self.wait()
        if self.comment is None:
            return False
        if self.error is not None:
            raise self.error
        crc, total = self.found
        if self.comment != _COMMENT.pack(_MAGIC, b'%08x' % crc, b'%016x' % total):  # as bytes: a digit's case too
            expected = self.comment[len(_MAGIC):].decode('ascii', 'replace')
            raise CorruptCheckpointError(
                self.file, f'checksum {expected[:8]}/{expected[8:]} expected, {crc:08x}/{total:016x} found '
                           f'({_damaged_entry(self.file)}). It changed after it was written (a disk or copy error, '
                           f'or an edit): use an older copy, or save it again')
        return True


def _damaged_entry(file):
    """Where in the zip the damage is, by the zip's own per-entry CRCs (torch writes them but never checks them)."""
    what = {'data.pkl': 'the pickled structure', 'version': "the format's version record",
            'byteorder': 'the byte order record'}
    try:
        with zipfile.ZipFile(file) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        return f'its zip structure is damaged: {e}'
    if bad is None:
        return 'outside the entries\' data: in the zip headers'
    tail = bad.split('/', 1)[-1]
    kind = what.get(tail, 'the data of a stored tensor' if tail.startswith('data/') else 'an entry')
    return f'in entry {bad}, {kind}'


def load_state(file, device=None):
    """Load a file written by `atomic_save` (or a plain state dict) with torch's weights-only unpickler.

    Only tensors and plain containers are accepted; nothing in the file is ever run. A file holding pickled code or
    objects raises `UnsafeCheckpointError`; one whose checksum differs (any changed byte), or a truncated or
    unreadable one, `CorruptCheckpointError` (a ValueError); a missing one FileNotFoundError. Files without a
    checksum (written by torch.save or an older minifast) load unchecked. Files ending in `.safetensors` are read
    with the optional `safetensors` package.
    """
    file = Path(file)
    if not file.exists():
        pattern = '*.safetensors' if file.suffix == '.safetensors' else '*.pth'
        near = sorted(p.name for p in file.parent.glob(pattern)) if file.parent.exists() else []
        raise FileNotFoundError(f"no such file: {file}" + (f" (files there: {', '.join(near)})" if near else ''))
    if file.suffix == '.safetensors':
        return _load_safetensors(file, device)
    if file.is_dir():
        raise ValueError(f'{file} is a folder, not a state file')
    with open(file, 'rb') as f:  # checked and loaded through one handle: a file replaced meanwhile is not mixed in
        try:
            check = _Verification(f, file)
            try:
                f.seek(0)
                state = torch.load(f, map_location=device, weights_only=True)
            except Exception:
                check.result()  # a changed byte explains torch's failure better than torch's message does
                raise
            finally:
                check.wait()  # also on Ctrl-C: no thread outlives the load
            check.result()
            return state
        except CorruptCheckpointError:
            raise
        except pickle.UnpicklingError as e:
            if 'weights only load failed' in str(e).lower() or 'unsupported global' in str(e).lower():
                what, readable = _refused_global(e, file)
                if what or readable:  # a well-formed pickle that torch refused
                    m = re.search(r'Unsupported operand \d+', str(e))
                    raise UnsafeCheckpointError(file, what, m.group(0) if m else None) from None
            raise _corrupt(file, e) from e
        except Exception as e:
            if device is not None and isinstance(e, RuntimeError) and ('device' in str(e) or 'cuda' in str(e).lower()):
                raise ValueError(f'{file} could not be loaded onto device {device}: {e}') from e
            raise _corrupt(file, e) from e


def check_state_dict(model, sd, file, strict=True):
    """Raise, naming `file` and the mismatched keys/shapes, unless `sd` loads into `model` cleanly."""
    if not isinstance(sd, dict):
        raise ValueError(f'{file} holds a {type(sd).__name__}, not a state dict')
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f'{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}'
              for k, v in own.items() if k in sd and hasattr(sd[k], 'shape') and sd[k].shape != v.shape]
    problems = []
    if strict and missing:
        problems.append(f'missing keys {missing[:5]}' + (f' and {len(missing) - 5} more' if len(missing) > 5 else ''))
    if strict and unexpected:
        problems.append(f'unexpected keys {unexpected[:5]}' + (f' and {len(unexpected) - 5} more'
                                                                 if len(unexpected) > 5 else ''))
    if shapes:
        problems.append('shape mismatch ' + '; '.join(shapes[:5]))
    if problems:
        raise ValueError(f'{file} does not match the model ({type(model).__name__}): ' + '; '.join(problems)
                         + '. The model was left unchanged.')


class UnsafeCheckpointError(ValueError):
    """A state file that holds pickled code or objects, which `load_state` refuses to unpickle."""

    def __init__(self, file, what=None, reason=None):
        self.file, self.what = Path(file), what
        found = (f'it refers to {what}' if what else f'it uses pickle opcodes ({reason})' if reason
                 else 'it holds pickled code or objects')
        super().__init__(
            f'{file}: refused to load: {found}, which torch\'s weights-only unpickler does not allow. minifast '
            f'loads tensors and plain containers (dict, list, tuple, numbers, strings) only and never runs code '
            f'from a file. If you trust where the file came from, load it yourself with '
            f'torch.load({os.fspath(file)!r}, weights_only=False) and pass on the state dict it holds.')


# torch names the refused global in one of these forms, depending on the version and on why it was refused
_GLOBAL_RES = (re.compile(r'unsupported GLOBAL ([\w.]+) whose module'),
               re.compile(r'Unsupported global: GLOBAL ([\w.]+) was not'),
               re.compile(r'GLOBAL ([\w.]+)'))
_OS_MODULES = {'posix': 'os', 'nt': 'os'}


def _name_global(name):
    """'eval' -> 'builtins.eval'; 'posix.system' -> 'posix.system (os.system)'."""
    if '.' not in name:
        return f'builtins.{name}'
    mod, _, rest = name.partition('.')
    return f'{name} ({_OS_MODULES[mod]}.{rest})' if mod in _OS_MODULES else name


def _refused_global(err, file):
    """(the global torch refused or None, whether the file's pickle reads cleanly).

    The global comes from torch's message, or else from reading (never running) the file's pickle opcodes.
    """
    for msg in (str(err), str(err.__cause__ or '')):
        for r in _GLOBAL_RES:
            m = r.search(msg)
            if m:
                return _name_global(m.group(1)), True
    found, readable = _scan_globals(file)
    return (_name_global(found) if found else None), readable


def _pickle_bytes(file, limit=64 << 20):
    """The pickle stream of a torch zip file (its data.pkl) or of a plain pickle file, at most `limit` bytes."""
    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as z:
            names = [n for n in z.namelist() if n.endswith('data.pkl')]
            if not names:
                return b''
            with z.open(names[0]) as f:
                return f.read(limit)
    with open(file, 'rb') as f:
        return f.read(limit)


def _scan_globals(file):
    """(the first global outside torch and collections that the file's pickle names, or None; whether it parsed).

    pickletools only decodes the opcodes; nothing is imported or called.
    """
    safe = ('torch', 'collections', '_codecs', 'numpy')
    found, memo, strings = None, {}, []
    try:
        for op, arg, _ in pickletools.genops(_pickle_bytes(file)):
            if op.name in ('GLOBAL', 'INST'):
                name = '.'.join(str(arg).split(' ', 1))
            elif op.name == 'STACK_GLOBAL' and len(strings) >= 2:
                name = f'{strings[-2]}.{strings[-1]}'
            else:
                if isinstance(arg, str) and 'UNICODE' in op.name:
                    strings.append(arg)
                elif op.name == 'MEMOIZE' and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ('PUT', 'BINPUT', 'LONG_BINPUT') and strings:
                    memo[arg] = strings[-1]
                elif op.name in ('GET', 'BINGET', 'LONG_BINGET') and arg in memo:
                    strings.append(memo[arg])
                continue
            if found is None and name.split('.', 1)[0] not in safe:
                found = name
    except Exception:  # not a pickle, or a cut one: report what was found, if anything
        return found, False
    return found, True


def _corrupt(file, err):
    """CorruptCheckpointError for a file torch cannot read: truncated, corrupt, or not a torch file at all."""
    try:
        size = f'{file.stat().st_size} bytes'
    except OSError:
        size = 'unknown size'
    detail = f'{type(err).__name__}: {err}' if str(err) else type(err).__name__
    return CorruptCheckpointError(
        file, f'torch.load failed with {detail}',
        f'{file} ({size}) is truncated or not a torch file (for example an interrupted copy or download, or a file '
        f'of another kind): torch.load failed with {detail}. Save it again, or copy it again from its source.')


def _load_safetensors(file, device=None):
    """A .safetensors file as a dict of tensors, through the optional `safetensors` package."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(f'{file} is a .safetensors file, and reading it needs the `safetensors` package, which is '
                          f'not installed: pip install safetensors') from None
    try:
        return load_file(os.fspath(file), device='cpu' if device is None else str(device))
    except Exception as e:
        raise _corrupt(file, e) from e
