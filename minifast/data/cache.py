"""Decode image files once into a uint8 tensor (N, 3, H, W), cached on disk and invalidated when the files change."""
import hashlib
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_save

__all__ = ['decode_images', 'cached_decode', 'ImageDecodeError', 'CACHE_DIR_NAME']

CACHE_DIR_NAME = '.minifast_cache'
_FORMAT = 1  # bump when the cache layout or the decoding changes
_PARALLEL_MIN = 2000  # below this many files, starting worker processes costs more than it saves


class ImageDecodeError(ValueError):
    """An image file that cannot be read; the message names the file."""


def _decode_one(file, size):
    from PIL import Image
    try:
        with Image.open(file) as im:
            im.load()  # decode now, inside the try: truncated files fail here, not later
            if im.mode == 'P' and 'transparency' in im.info:
                im = im.convert('RGBA')
            im = im.convert('RGB')  # grayscale, palette, RGBA, CMYK -> RGB (alpha dropped)
            h, w = size
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for bad files
        return f'{type(e).__name__}: {e}'


def _decode_chunk(args):
    files, size = args
    return [_decode_one(f, size) for f in files]


def decode_images(files, size, num_workers=None, ignore_errors=False):
    """Decode `files` to a uint8 tensor (N, 3, H, W), resizing to `size` = (H, W); returns (tensor, kept indices).

    A file that cannot be read raises ImageDecodeError naming it; with ignore_errors=True such files are skipped and
    listed in one warning. Worker processes (num_workers, default: the CPU count) are used for large folders only.
    """
    files = [Path(f) for f in files]
    size = tuple(size)
    n_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    if n_workers > 1 and len(files) >= _PARALLEL_MIN:
        chunk = max(256, len(files) // (n_workers * 4))
        parts = [(files[i:i + chunk], size) for i in range(0, len(files), chunk)]
        with ProcessPoolExecutor(n_workers) as ex:
            out = [r for part in ex.map(_decode_chunk, parts) for r in part]
    else:
        out = _decode_chunk((files, size))
    bad = [(f, r) for f, r in zip(files, out) if isinstance(r, str)]
    if bad and not ignore_errors:
        f, why = bad[0]
        more = f' (and {len(bad) - 1} more unreadable files)' if len(bad) > 1 else ''
        raise ImageDecodeError(f'cannot read image {f}: {why}{more}; pass ignore_errors=True to skip such files')
    if bad:
        listing = '\n'.join(f'  {f}: {why}' for f, why in bad)
        warnings.warn(f'skipped {len(bad)} unreadable image file(s):\n{listing}')
    keep = [i for i, r in enumerate(out) if not isinstance(r, str)]
    if not keep:
        return torch.zeros(0, 3, *size, dtype=torch.uint8), keep
    return torch.from_numpy(np.stack([out[i] for i in keep])), keep


def _fingerprint(files, root, size):
    """A hash of the file list, each file's size and mtime, and the target size: any change gives a new cache."""
    h = hashlib.sha256(f'{_FORMAT}|{size[0]}x{size[1]}'.encode())
    for f in files:
        st = os.stat(f)
        h.update(f'|{os.path.relpath(f, root)}|{st.st_size}|{st.st_mtime_ns}'.encode())
    return h.hexdigest()[:20]


def _cache_dirs(root):
    yield Path(root) / CACHE_DIR_NAME
    yield Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'minifast'


def cached_decode(files, root, size, name, num_workers=None, ignore_errors=False, cache=True):
    """decode_images with a disk cache under root/.minifast_cache (or ~/.cache/minifast if root is read-only).

    Returns (tensor, kept indices, cache file or None). The cache is keyed by the files' relative paths, sizes and
    mtimes and the target size, so adding, removing, replacing or touching a file re-decodes; stale cache files of
    the same `name` are removed. Cache files are read with torch's weights-only loader.
    """
    files = [Path(f) for f in files]
    if not cache:
        return (*decode_images(files, size, num_workers, ignore_errors), None)
    key = _fingerprint(files, root, size)
    # the root's hash keeps datasets apart in the shared user cache, where stale files are also cleaned up
    name = f'{name}-{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]}'
    fname = f'{name}_{size[0]}x{size[1]}_{key}.pt'
    for d in _cache_dirs(root):
        p = d / fname
        if p.exists():
            try:
                state = torch.load(p, weights_only=True)
                if state.get('key') == key and (ignore_errors or not state['bad']):
                    if state['bad']:
                        warnings.warn(f"skipped {len(state['bad'])} unreadable image file(s) (cached in {p}): "
                                      + ', '.join(state['bad']))
                    return state['x'], state['keep'], p
            except Exception as e:  # a damaged cache is re-made, never trusted
                warnings.warn(f'ignoring unreadable cache file {p}: {e}')
    x, keep = decode_images(files, size, num_workers, ignore_errors)
    kept = set(keep)
    bad = [str(f) for i, f in enumerate(files) if i not in kept]
    state = {'key': key, 'x': x, 'keep': keep, 'bad': bad}
    for d in _cache_dirs(root):
        try:
            d.mkdir(parents=True, exist_ok=True)
            for old in d.glob(f'{name}_{size[0]}x{size[1]}_*.pt'):
                if old.name != fname:
                    old.unlink()
            atomic_save(state, d / fname)
            return x, keep, d / fname
        except OSError:
            continue  # read-only dataset folder: try the user cache
    warnings.warn(f'could not write a decode cache for {root}; images will be decoded again next time')
    return x, keep, None
