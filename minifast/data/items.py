"""One image as a user has it (a file, a PIL image, an array, a tensor) and fastai v1's `open_image` / `Image`: each
becomes the uint8 (3, H, W) tensor an ImageDataBunch holds, decoded and resized exactly as the data's own files were,
so a prediction on a file equals the prediction on the dataset's copy of it."""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..callbacks.recorder import new_figure
from .cache import ImageDecodeError, fit_to_size, read_rgb, to_rgb_array

__all__ = ['Image', 'open_image', 'image_uint8', 'is_image_item', 'resize_uint8']


class Image:
    """fastai v1's Image: `data` is the float (3, H, W) tensor in [0, 1]; `show()` draws it; a notebook displays it."""

    def __init__(self, data, file=None):
        if not isinstance(data, torch.Tensor) or data.ndim != 3 or data.shape[0] != 3:
            raise ValueError(f'Image: data must be a (3, H, W) tensor, got '
                             f'{tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__}')
        self.data, self.file = data, file

    @property
    def shape(self):
        """(3, H, W)."""
        return tuple(self.data.shape)

    @property
    def size(self):
        """(H, W)."""
        return tuple(self.data.shape[1:])

    def __repr__(self):
        return f'Image {self.shape}' + (f' from {self.file}' if self.file else '')

    def show(self, ax=None, figsize=(3, 3), title=None):
        """Draw the image (on `ax`, or a new figure); returns the Figure."""
        fig, (ax,) = new_figure(ax, figsize=figsize)
        ax.imshow(self.data.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(title if title is not None else (Path(self.file).name if self.file else 'image'))
        ax.axis('off')
        return fig

    def _repr_png_(self):
        from PIL import Image as PILImage
        import io
        buf = io.BytesIO()
        PILImage.fromarray(self.uint8().permute(1, 2, 0).numpy()).save(buf, format='png')
        return buf.getvalue()

    def uint8(self):
        """The image as uint8 (3, H, W), exactly as decoded (open_image divides by 255; this undoes it)."""
        return (self.data * 255).round().clamp(0, 255).to(torch.uint8)


def open_image(fn, div=True, convert_mode='RGB'):
    """The image in file `fn` as an Image (float in [0, 1] with div=True, else 0..255), at its own size; decoded as
    dataset images are (grayscale, palette, 16-bit and alpha images become RGB)."""
    if convert_mode != 'RGB':
        raise ValueError(f"open_image: only convert_mode='RGB' is supported (models here take 3 channels), got "
                         f"{convert_mode!r}")
    fn = Path(fn)
    if not fn.is_file():
        raise FileNotFoundError(f'open_image: {fn} does not exist' if not fn.exists() else
                                f'open_image: {fn} is not a file')
    try:
        a = read_rgb(fn)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for bad files
        raise ImageDecodeError(f'open_image: cannot read image {fn}: {type(e).__name__}: {e}',
                               [(fn, str(e))]) from e
    x = torch.from_numpy(a.transpose(2, 0, 1).copy()).float()
    return Image(x.div_(255) if div else x, fn)


def is_image_item(x):
    """Whether `x` is one image in a form image_uint8 takes (a path, an Image, a PIL image)."""
    return isinstance(x, (str, Path, Image)) or type(x).__module__.startswith('PIL.')


def _hwc_uint8(x, what):
    """An array or tensor holding one image (H×W, H×W×C or C×H×W; 0..255 integers or [0, 1] floats) as an RGB uint8
    array (H, W, 3)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f'{what}: one image must be H×W, H×W×C or C×H×W, got shape {a.shape}')
    if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.shape[-1] not in (1, 3):
        raise ValueError(f'{what}: expected 1 or 3 channels, got shape {a.shape}')
    if a.dtype == np.uint8:
        pass
    elif np.issubdtype(a.dtype, np.floating):
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0., 0.)
        if np.isnan(lo) or np.isnan(hi) or lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f'{what}: a float image must hold values in [0, 1] (it spans [{lo:.3g}, {hi:.3g}]); '
                             f'pass uint8 for 0..255 values, and the image before normalisation')
        a = (a.astype(np.float32) * 255).round().astype(np.uint8)  # float32, as ImageDataBunch.from_tensors does
    elif np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 255:
            raise ValueError(f'{what}: an integer image must hold values in 0..255 (it spans {lo}..{hi})')
        a = a.astype(np.uint8) * (255 if a.dtype == np.bool_ else 1)
    else:
        raise TypeError(f'{what}: cannot read an image of dtype {a.dtype}')
    return np.ascontiguousarray(np.repeat(a, 3, axis=2) if a.shape[-1] == 1 else a)


def resize_uint8(x, size, chunk=1024):
    """uint8 images (N, C, H, W) resized to `size` = (H, W) as ImageDataBunch.from_tensors resizes them: torch's
    antialiased bilinear interpolation, rounded back to uint8, in chunks of `chunk` images."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    out = [F.interpolate(x[i:i + chunk].float(), size=tuple(size), mode='bilinear', antialias=True,
                         align_corners=False).round().clamp(0, 255).to(torch.uint8) for i in range(0, len(x), chunk)]
    return torch.cat(out)


def image_uint8(x, size, crop=False, what='predict', resize='pil'):
    """One image as the uint8 (3, H, W) tensor of `size` an ImageDataBunch holds: a file path (decoded and resized
    as the data's files were), an Image (open_image), a PIL image, or an array/tensor (H×W, H×W×C or C×H×W; 0..255
    or [0, 1]). A uint8 (3, H, W) tensor already of `size` is returned as it is. `resize`: 'pil' resizes as image
    files are decoded (crop or squish, PIL's bilinear), 'torch' as ImageDataBunch.from_tensors does."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and tuple(x.shape) == (3, *size):
        return x
    if isinstance(x, (str, Path)):
        f = Path(x)
        if not f.is_file():
            raise FileNotFoundError(f'{what}: {f} does not exist' if not f.exists() else f'{what}: {f} is not a file')
        try:
            a = read_rgb(f)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for bad files
            raise ImageDecodeError(f'{what}: cannot read image {f}: {type(e).__name__}: {e}', [(f, str(e))]) from e
    elif isinstance(x, Image):
        a = x.uint8().permute(1, 2, 0).numpy()
    elif type(x).__module__.startswith('PIL.'):
        a = to_rgb_array(x)
    else:
        a = _hwc_uint8(x, what)
    if resize == 'torch':
        return resize_uint8(torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None], size)[0]
    return torch.from_numpy(np.ascontiguousarray(fit_to_size(a, tuple(size), crop).transpose(2, 0, 1)))
