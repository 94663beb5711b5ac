"""Decode image files once into a uint8 tensor (N, 3, H, W), cached on disk and invalidated when the files change."""
import hashlib
import os
import warnings
import zlib
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_save

__all__ = ['decode_images', 'cached_decode', 'default_cache_dir', 'ImageDecodeError', 'read_rgb', 'fit_to_size',
           'to_rgb_array']

_FORMAT = 3  # bump when the cache layout or the decoding changes
_PARALLEL_MIN = 2000  # below this many files, starting worker processes costs more than it saves


class ImageDecodeError(ValueError):
    """An image file that cannot be read; the message names the file, `bad` lists (file, why) of every such file."""

    def __init__(self, message, bad=()):
        super().__init__(message)
        self.bad = list(bad)


def default_cache_dir():
    """$MINIFAST_CACHE, else $XDG_CACHE_HOME/minifast, else ~/.cache/minifast (outside the dataset folder, so other
    tools that scan it, such as torchvision's ImageFolder, never see our files)."""
    if os.environ.get('MINIFAST_CACHE'):
        return Path(os.environ['MINIFAST_CACHE'])
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'minifast'


def to_rgb_array(im):
    """RGB uint8 array of a PIL image; 16-bit and float images are scaled to 0..255, not clipped."""
    if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith('I;16') or a.max() <= 65535 else float(a.max())
        a = np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if im.mode == 'F':
        a = np.asarray(im, dtype=np.float64)
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ValueError(f'float image with values in [{a.min():.3g}, {a.max():.3g}]; expected [0, 1]')
        return np.repeat((a * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    if im.mode == 'P' and 'transparency' in im.info:
        im = im.convert('RGBA')
    return np.asarray(im.convert('RGB'), dtype=np.uint8)  # grayscale, palette, RGBA, CMYK -> RGB (alpha dropped)


def read_rgb(file):
    """The image in `file` as an RGB uint8 array (H, W, 3), decoded as dataset images are; raises what PIL raises."""
    from PIL import Image
    with Image.open(file) as im:
        im.load()  # decode now: truncated files fail here, not later
        return to_rgb_array(im)


def fit_to_size(a, size, crop):
    """An RGB uint8 array (H, W, 3) resized to `size` = (H, W) as dataset images are: `crop`: short side to size,
    then the centre crop, keeping the aspect ratio; else squished. Already that size: `a` itself."""
    from PIL import Image
    h, w = size
    if a.shape[:2] == (h, w):
        return a
    img = Image.fromarray(a)
    if crop:
        s = max(h / img.height, w / img.width)
        img = img.resize((max(w, round(img.width * s)), max(h, round(img.height * s))), Image.BILINEAR)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        img = img.crop((left, top, left + w, top + h))
    else:
        img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _decode_one(file, size, crop):
    try:
        return fit_to_size(read_rgb(file), size, crop).transpose(2, 0, 1).copy()
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for bad files
        return f'{type(e).__name__}: {e}'


def _decode_chunk(args):
    files, size, crop = args
    return [_decode_one(f, size, crop) for f in files]


def _n_cpus():
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use, not the host's
    except AttributeError:
        return os.cpu_count() or 1


def decode_images(files, size, num_workers=None, ignore_errors=False, crop=False):
    """Decode `files` to a uint8 tensor (N, 3, H, W) of `size` = (H, W); returns (tensor, kept indices).

    Images of another size are resized (`crop`: short side then centre crop, else squished). A file that cannot be
    read raises ImageDecodeError naming it; with ignore_errors=True such files are skipped and listed in one
    warning. Folders of 2000 files or more are decoded by `num_workers` forked processes (default: the usable
    CPUs; threads were slower than one thread for small images, the GIL); where fork is not available (Windows,
    macOS), decoding is serial, so scripts need no `if __name__ == '__main__'` guard.
    """
    files = [Path(f) for f in files]
    size = tuple(size)
    n_workers = _n_cpus() if num_workers is None else max(int(num_workers), 1)
    if n_workers > 1 and len(files) >= _PARALLEL_MIN and 'fork' in mp.get_all_start_methods():
        chunk = max(256, len(files) // (n_workers * 4))
        parts = [(files[i:i + chunk], size, crop) for i in range(0, len(files), chunk)]
        with ProcessPoolExecutor(n_workers, mp_context=mp.get_context('fork')) as ex:
            out = [r for part in ex.map(_decode_chunk, parts) for r in part]
    else:
        out = _decode_chunk((files, size, crop))
    bad = [(f, r) for f, r in zip(files, out) if isinstance(r, str)]
    if bad and not ignore_errors:
        f, why = bad[0]
        more = f' (and {len(bad) - 1} more unreadable files)' if len(bad) > 1 else ''
        raise ImageDecodeError(f'cannot read image {f}: {why}{more}; pass ignore_errors=True to skip such files',
                               bad)
    if bad:
        listing = '\n'.join(f'  {f}: {why}' for f, why in bad)
        warnings.warn(f'skipped {len(bad)} unreadable image file(s):\n{listing}')
    keep = [i for i, r in enumerate(out) if not isinstance(r, str)]
    if not keep:
        return torch.zeros(0, 3, *size, dtype=torch.uint8), keep
    return torch.from_numpy(np.stack([out[i] for i in keep])), keep


def _fingerprint(files, root, size, crop):
    """A hash of the file list and each file's size, mtime, ctime and inode, with the target size: adding,
    removing, replacing or touching a file gives a new key (ctime also changes when a copy restores the mtime)."""
    h = hashlib.sha256(f'{_FORMAT}|{size[0]}x{size[1]}|{crop}'.encode())
    cut = len(str(root).rstrip(os.sep)) + 1
    for f in files:
        st = os.stat(f)
        h.update(f'|{str(f)[cut:]}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}'.encode())
    return h.hexdigest()[:20]


def cached_decode(files, root, size, num_workers=None, ignore_errors=False, cache=True, crop=False):
    """decode_images through a disk cache; returns (tensor, kept indices, cache file or None).

    `cache`: True uses default_cache_dir(), a path uses that folder, False decodes without a cache. Files are
    named by the dataset root's hash and the key of `files`, so splits of the same files share one cache entry,
    and stale entries of the same root and size are removed. Cache files are read with torch's weights-only loader
    and checked against a CRC-32 of the images; a damaged one is decoded again, never trusted.
    """
    files = [Path(f) for f in files]
    if cache is False or cache is None:
        return (*decode_images(files, size, num_workers, ignore_errors, crop), None)
    folder = default_cache_dir() if cache is True else Path(cache)
    key = _fingerprint(files, root, size, crop)
    stem = f'{Path(root).name}-{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]}'
    prefix = f'{stem}_{size[0]}x{size[1]}{"c" if crop else ""}_'
    p = folder / f'{prefix}{key}.pt'
    if p.exists():
        try:
            state = torch.load(p, weights_only=True)
            if state.get('key') == key and (ignore_errors or not state['bad']):
                # torch.load does not check the zip's CRCs, so a flipped byte would otherwise come back as pixels
                x = state['x']
                if tuple(x.shape) != (len(state['keep']), 3, *size) or zlib.crc32(x.numpy()) != state['crc']:
                    raise ValueError(f"its images (shape {tuple(x.shape)}, for {len(state['keep'])} files of "
                                     f"{size[0]}x{size[1]}) do not match their shape or checksum")
                if state['bad']:
                    warnings.warn(f"skipped {len(state['bad'])} unreadable image file(s) (as cached in {p}): "
                                  + ', '.join(state['bad']))
                return x, state['keep'], p
        except Exception as e:  # a damaged cache is re-made, never trusted
            warnings.warn(f'ignoring unreadable or damaged cache file {p}: {e}')
    x, keep = decode_images(files, size, num_workers, ignore_errors, crop)
    kept = set(keep)
    state = {'key': key, 'x': x, 'keep': keep, 'bad': [str(f) for i, f in enumerate(files) if i not in kept],
             'crc': zlib.crc32(x.numpy())}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save(state, p)
    except OSError as e:
        warnings.warn(f'could not write the decode cache {p} ({e}); the images will be decoded again next time')
        return x, keep, None
    for old in folder.glob(f'{prefix}*.pt'):
        if old != p:
            old.unlink(missing_ok=True)  # another process may have removed it already
    return x, keep, p
