"""Batched data augmentation: every transform maps a batch (N, C, H, W) to a batch of the same shape, dtype and
device, drawing its own random parameters for each sample, with no per-sample Python loop.

The loader runs the leading index-only transforms (flips, pad-and-crop) on the uint8 batch, converts to float in
[0, 1], then runs the rest (AffineWarp, Lighting) before normalising; `split_index_only` makes that split.
Randomness comes from torch's generator on the batch's device, so `torch.manual_seed` makes a run repeatable.
"""
import math

import torch
import torch.nn.functional as F

__all__ = ['BatchTransform', 'FlipLR', 'FlipUD', 'Dihedral', 'RandomCropPad', 'AffineWarp', 'Lighting', 'ZoomCrop',
           'get_transforms', 'cifar_transforms', 'apply_tfms', 'split_index_only', 'flips_lr', 'tta_kept']


class BatchTransform:
    """Base of batch transforms: `tfm(x)` returns a new batch and never changes `x` in place (a disabled one may
    return `x` itself); `p` is the probability that a sample is transformed, `last_params` what the last call drew."""
    index_only = False
    p = 1.0
    last_params = None
    _repr_names = ('p',)

    def __call__(self, x):
        raise NotImplementedError(f'{type(self).__name__} must define __call__(self, x)')

    def __repr__(self):
        args = ', '.join(f'{k}={getattr(self, k)!r}' for k in self._repr_names)
        return f'{type(self).__name__}({args})'

    def _check(self, x):
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'{name} expects a batch tensor of shape (N, C, H, W), got {got}')
        if not self.index_only and not x.is_floating_point():
            raise TypeError(f'{name} needs float input in [0, 1], got dtype {x.dtype}: convert with x.float() / 255 '
                            f'first (only index-only transforms such as FlipLR and RandomCropPad take uint8)')


def _check_p(name, p):
    if not 0 <= p <= 1:
        raise ValueError(f'{name}: p must be in [0, 1], got {p}')
    return float(p)


def _rand(x):
    return torch.rand(x.shape[0], device=x.device)


def _pick_flipped_by(x, pick, op):
    # Selecting rows of cat((x, op(x))) copies whole samples; torch.where on uint8 is ~4x slower on CPU.
    n = x.shape[0]
    idx = torch.arange(n, device=x.device) + n * pick.long()
    return torch.cat((x, op(x))).index_select(0, idx)


def _pick_flipped(x, flip, dim):
    return _pick_flipped_by(x, flip, lambda t: t.flip(dim))


class _Flip(BatchTransform):
    """Flips a random subset of samples along `dim`, each with probability `p`."""
    index_only, dim = True, 3

    def __init__(self, p=0.5):
        self.p = _check_p(type(self).__name__, p)

    def __call__(self, x):
        self._check(x)
        flip = _rand(x) < self.p
        self.last_params = {'flip': flip}
        if self.p == 0:
            return x
        return x.flip(self.dim) if self.p == 1 else _pick_flipped(x, flip, self.dim)


class FlipLR(_Flip):
    """Flips a random subset of samples left-right, each with probability `p`."""
    dim = 3


class FlipUD(_Flip):
    """Flips a random subset of samples upside down, each with probability `p`."""
    dim = 2


class Dihedral(BatchTransform):
    """One of the 8 symmetries of the square (flips, transposes, quarter turns), uniformly at random, for a random
    subset of samples (probability `p`); non-square images get one of the 4 flips. fastai v1's flip_vert=True.

    `last_params['k']` per sample: bit 4 transposes, then bit 1 flips left-right, then bit 2 upside down.
    """
    index_only = True

    def __init__(self, p=1.0):
        self.p = _check_p('Dihedral', p)

    def __call__(self, x):
        self._check(x)
        n = x.shape[0]
        k = torch.randint(0, 8, (n,), device=x.device) * (_rand(x) < self.p)  # 0: identity
        if x.shape[2] != x.shape[3]:
            k = k & 3  # no transpose keeps the shape: last_params then says what was applied
        self.last_params = {'k': k}
        if self.p == 0:
            return x
        if x.shape[2] == x.shape[3]:
            x = _pick_flipped_by(x, (k & 4) > 0, lambda t: t.transpose(2, 3))
        x = _pick_flipped(x, (k & 1) > 0, 3)
        return _pick_flipped(x, (k & 2) > 0, 2)


_CROP_PAD_MODES = {'zeros': 'zeros', 'reflect': 'reflect', 'reflection': 'reflect'}


class RandomCropPad(BatchTransform):
    """Pads each side by `padding` ('zeros' or 'reflect') and crops back to H x W at a random offset per sample.

    `last_params` holds 'row_offset' and 'col_offset' in [0, 2 * padding], the crop's top-left corner in the padded
    image; a sample left alone (probability 1 - p) gets (padding, padding), the identity.
    """
    index_only = True
    _repr_names = ('padding', 'pad_mode', 'p')

    def __init__(self, padding=4, pad_mode='zeros', p=1.0):
        if int(padding) != padding or padding < 0:
            raise ValueError(f'RandomCropPad: padding must be a non-negative integer, got {padding}')
        if pad_mode not in _CROP_PAD_MODES:
            raise ValueError(f"RandomCropPad: pad_mode must be one of {sorted(_CROP_PAD_MODES)}, got {pad_mode!r}")
        self.padding, self.pad_mode, self.p = int(padding), _CROP_PAD_MODES[pad_mode], _check_p('RandomCropPad', p)

    def __call__(self, x):
        self._check(x)
        n, c, h, w = x.shape
        pad, dev = self.padding, x.device
        rows = torch.randint(0, 2 * pad + 1, (n,), device=dev)
        cols = torch.randint(0, 2 * pad + 1, (n,), device=dev)
        if self.p < 1:
            keep = _rand(x) >= self.p
            rows, cols = rows.masked_fill(keep, pad), cols.masked_fill(keep, pad)
        self.last_params = {'row_offset': rows, 'col_offset': cols}
        if pad == 0 or self.p == 0 or x.numel() == 0:
            return x
        if self.pad_mode == 'zeros':
            padded = F.pad(x, (pad, pad, pad, pad))
        else:
            if pad >= h or pad >= w:
                raise ValueError(f"RandomCropPad: 'reflect' padding {pad} must be smaller than the image ({h}x{w})")
            # Reflecting by index works for every dtype (uint8 included) and device.
            padded = x.index_select(2, _reflect(h, pad, dev)).index_select(3, _reflect(w, pad, dev))
        hp, wp = h + 2 * pad, w + 2 * pad
        # Every H x W window of the flat padded batch is one row of an overlapping strided view, so the whole crop is
        # a single index_select of each sample's window start (~6x faster on CPU than a per-pixel gather).
        flat = padded.contiguous().view(-1)
        windows = flat.as_strided((flat.numel() - (c - 1) * hp * wp - (h - 1) * wp - (w - 1), c, h, w),
                                  (1, hp * wp, wp, 1))
        starts = torch.arange(n, device=dev) * (c * hp * wp) + rows * wp + cols
        return windows.index_select(0, starts)


def _reflect(size, pad, dev):
    """Source indices of a reflect-padded axis (edge not repeated): 2 1 | 0 1 2 ... n-1 | n-2 n-3."""
    i = torch.arange(-pad, size + pad, device=dev).abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


_GRID_PAD_MODES = ('reflection', 'zeros', 'border')


class AffineWarp(BatchTransform):
    """fastai v1's rotate, zoom and symmetric perspective warp, each drawn per sample with probability `p_affine`,
    composed into one sampling grid and applied with one bilinear `F.grid_sample` (align_corners=False).

    `last_params` holds per sample: 'rotate', 'zoom', 'warp' (bool masks), 'degrees', 'scale', 'row_pct',
    'col_pct', 'magnitude' (N, 4) and 'matrix' (N, 3, 3), the homography from output to input coordinates in
    grid_sample's normalised (x, y) convention.
    """
    _repr_names = ('max_rotate', 'max_zoom', 'max_warp', 'p_affine', 'pad_mode')

    def __init__(self, max_rotate=10., max_zoom=1.1, max_warp=0.2, p_affine=0.75, pad_mode='reflection'):
        if pad_mode not in _GRID_PAD_MODES:
            raise ValueError(f'AffineWarp: pad_mode must be one of {_GRID_PAD_MODES}, got {pad_mode!r}')
        if max_zoom <= 0:
            raise ValueError(f'AffineWarp: max_zoom must be > 0, got {max_zoom}')
        self.max_rotate, self.max_zoom, self.max_warp = float(max_rotate), float(max_zoom), float(max_warp)
        self.p_affine, self.pad_mode = _check_p('AffineWarp', p_affine), pad_mode

    @property
    def p(self):
        """The probability of each of rotate, zoom and warp (an alias of `p_affine`)."""
        return self.p_affine

    @p.setter
    def p(self, value):
        self.p_affine = _check_p('AffineWarp', value)

    def __call__(self, x):
        self._check(x)
        n, _, h, w = x.shape
        prm = self._draw(n, x.device)
        prm['matrix'] = m = self._matrices(prm, h, w)
        self.last_params = prm
        if self.p_affine == 0 or (self.max_rotate == 0 and self.max_zoom == 1 and self.max_warp == 0):
            return x
        grid = _sampling_grid(m, h, w, projective=self.max_warp != 0).to(x.dtype)
        out = F.grid_sample(x, grid, mode='bilinear', padding_mode=self.pad_mode, align_corners=False)
        # Sampling at pixel centres is exact only up to rounding; this keeps untouched samples bit-identical.
        return _select(prm['rotate'] | prm['zoom'] | prm['warp'], out, x)

    def _draw(self, n, dev):
        u = torch.rand(n, 7, device=dev)
        rot = (u[:, 0] < self.p_affine) & (self.max_rotate != 0)
        zoom = (u[:, 1] < self.p_affine) & (self.max_zoom != 1)
        warp = (u[:, 2] < self.p_affine) & (self.max_warp != 0)
        degrees = torch.where(rot, (2 * u[:, 3] - 1) * self.max_rotate, 0.)
        scale = torch.where(zoom, 1 + u[:, 4] * (self.max_zoom - 1), 1.)
        mag = torch.where(warp[:, None], (2 * torch.rand(n, 4, device=dev) - 1) * self.max_warp, 0.)
        return {'rotate': rot, 'zoom': zoom, 'warp': warp, 'degrees': degrees, 'scale': scale,
                'row_pct': u[:, 5], 'col_pct': u[:, 6], 'magnitude': mag}

    def _matrices(self, prm, h, w):
        n, dev = prm['degrees'].shape[0], prm['degrees'].device
        a = prm['degrees'] * (math.pi / 180)
        cos, sin = torch.cos(a), torch.sin(a)
        # Normalised x and y have different pixel units on a non-square image: rescale so rotation stays rigid.
        rot = _mat3(cos, -sin * (h / w), 0 * a, sin * (w / h), cos, 0 * a)
        # Zoom centre (col_c, row_c) keeps the window [c - 1/s, c + 1/s] inside [-1, 1].
        s = prm['scale']
        k = 1 - 1 / s
        zoom = _mat3(1 / s, 0 * s, k * (2 * prm['col_pct'] - 1), 0 * s, 1 / s, k * (2 * prm['row_pct'] - 1))
        eye = torch.eye(3, device=dev).expand(n, 3, 3)
        warp = eye
        if self.max_warp != 0:
            warp = torch.where(prm['warp'][:, None, None], _symmetric_warp(prm['magnitude']), eye)
        # fastai v1's order: output coords are warped, then zoomed, then rotated into input coords.
        return rot @ zoom @ warp


def _mat3(a, b, c, d, e, f):
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack((a, b, c, d, e, f, zero, zero, one), 1).view(-1, 3, 3)


_CORNERS = ((-1., -1.), (-1., 1.), (1., -1.), (1., 1.))


def _symmetric_warp(mag):
    """Per sample, the homography taking fastai v1's symmetrically moved corners back to the image corners."""
    m0, m1, m2, m3 = mag.unbind(1)
    targ = torch.stack((torch.stack((-1 - m3, -1 - m1), 1), torch.stack((-1 - m2, 1 + m1), 1),
                        torch.stack((1 + m3, -1 - m0), 1), torch.stack((1 + m2, 1 + m0), 1)), 1)   # (N, 4, 2)
    orig = torch.tensor(_CORNERS, device=mag.device, dtype=mag.dtype).expand_as(targ)
    X, Y = targ.unbind(2)
    u, v = orig.unbind(2)
    one, zero = torch.ones_like(X), torch.zeros_like(X)
    # H (X, Y, 1) ~ (u, v, 1) with H[2, 2] = 1: two linear equations in the other 8 entries per corner.
    row_u = torch.stack((X, Y, one, zero, zero, zero, -u * X, -u * Y), 2)
    row_v = torch.stack((zero, zero, zero, X, Y, one, -v * X, -v * Y), 2)
    A = torch.stack((row_u, row_v), 2).view(-1, 8, 8)
    b = torch.stack((u, v), 2).view(-1, 8)
    coef, _ = torch.linalg.solve_ex(A, b)        # solve_ex: no error check, so no host sync on CUDA
    return torch.cat((coef, torch.ones_like(coef[:, :1])), 1).view(-1, 3, 3)


def _sampling_grid(m, h, w, projective=True):
    """(N, H, W, 2) input (x, y) for each output pixel centre: the homographies `m` (N, 3, 3) applied to the grid."""
    dev = m.device
    m = m.float()
    # align_corners=False: pixel centres sit at (2i + 1) / size - 1.
    xs = (torch.arange(w, device=dev, dtype=torch.float32) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=dev, dtype=torch.float32) * 2 + 1) / h - 1
    # x and y vary along separate axes, so all of (x', y', z') is one broadcast add of a row term and a column term
    # (several times faster on CPU than a batched (N, H*W, 3) @ (N, 3, 3) matmul).
    k = 3 if projective else 2
    row = (m[:, :k, 0:1] * xs + m[:, :k, 2:3]).transpose(1, 2)        # (N, W, k)
    col = (m[:, :k, 1:2] * ys).transpose(1, 2)                         # (N, H, k)
    grid = row[:, None] + col[:, :, None]                              # (N, H, W, k)
    return grid[..., :2] / grid[..., 2:] if projective else grid


class Lighting(BatchTransform):
    """fastai v1's brightness and contrast in logit space, each drawn per sample with probability `p`.

    A sample becomes sigmoid((logit(x) + logit(b)) * s); `last_params` holds 'brightness' b (0.5 when not drawn),
    'contrast' s (1 when not drawn) and the bool masks 'do_brightness', 'do_contrast'.
    """
    _repr_names = ('max_lighting', 'p')
    eps = 1e-7

    def __init__(self, max_lighting=0.2, p=0.75):
        if not 0 <= max_lighting < 1:
            raise ValueError(f'Lighting: max_lighting must be in [0, 1), got {max_lighting}')
        self.max_lighting, self.p = float(max_lighting), _check_p('Lighting', p)

    def __call__(self, x):
        self._check(x)
        n, ml = x.shape[0], self.max_lighting
        u = torch.rand(n, 4, device=x.device)
        do_b, do_c = u[:, 0] < self.p, u[:, 1] < self.p
        b = torch.where(do_b, 0.5 * (1 - ml) + u[:, 2] * ml, 0.5)
        # Log-uniform in [1 - ml, 1 / (1 - ml)], so lowering and raising the contrast are equally likely.
        log_lo = math.log1p(-ml) if ml else 0.
        s = torch.where(do_c, torch.exp(log_lo * (1 - 2 * u[:, 3])), 1.)
        self.last_params = {'do_brightness': do_b, 'do_contrast': do_c, 'brightness': b, 'contrast': s}
        if self.p == 0 or ml == 0:
            return x
        # torch.logit clamps to [eps, 1 - eps]; at least float32, as in half precision 1 - eps rounds to 1.
        lx = torch.logit(x if x.dtype in (torch.float32, torch.float64) else x.float(), eps=self.eps)
        shift, scale = torch.logit(b).to(lx.dtype).view(n, 1, 1, 1), s.to(lx.dtype).view(n, 1, 1, 1)
        out = lx.add_(shift).mul_(scale).sigmoid_().to(x.dtype)
        return _select(do_b | do_c, out, x)


def _select(mask, a, b):
    """Per sample, `a` where `mask` else `b`, for float batches."""
    # lerp with a 0/1 weight returns an end point exactly, and is ~4x faster than torch.where on CPU.
    return torch.lerp(b, a, mask.to(a.dtype).view(-1, *(1,) * (a.ndim - 1)))


class ZoomCrop(BatchTransform):
    """Zooms every sample by `scale` and crops back to H x W with the window at (`row_pct`, `col_pct`) (0: top or
    left edge, 1: bottom or right edge): deterministic, fastai v1's zoom at a fixed centre (TTA's corner views).

    The same as resizing to (H * scale, W * scale) with bilinear interpolation (align_corners=False) and slicing the
    H x W window at that offset; one `F.grid_sample` for the batch, and scale 1 returns `x` itself.
    """
    _repr_names = ('scale', 'row_pct', 'col_pct')

    def __init__(self, scale=1.35, row_pct=0.5, col_pct=0.5):
        if not scale > 0:
            raise ValueError(f'ZoomCrop: scale must be > 0, got {scale}')
        for name, v in (('row_pct', row_pct), ('col_pct', col_pct)):
            if not 0 <= v <= 1:
                raise ValueError(f'ZoomCrop: {name} must be in [0, 1], got {v}')
        self.scale, self.row_pct, self.col_pct = float(scale), float(row_pct), float(col_pct)

    def __call__(self, x):
        self._check(x)
        n, _, h, w = x.shape
        s = torch.full((1,), self.scale, device=x.device)
        self.last_params = {'scale': s.expand(n)}
        if self.scale == 1 or n == 0:
            return x
        k = 1 - 1 / s  # AffineWarp's zoom matrix: the window [c - 1/s, c + 1/s] with c at row_pct, col_pct
        m = _mat3(1 / s, 0 * s, k * (2 * self.col_pct - 1), 0 * s, 1 / s, k * (2 * self.row_pct - 1))
        grid = _sampling_grid(m, h, w, projective=False).to(x.dtype).expand(n, h, w, 2)
        return F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=False)


def flips_lr(tfms):
    """Whether the transforms `tfms` flip images left-right (a FlipLR or a Dihedral with p > 0): the model was then
    trained to be indifferent to the flip, so test-time augmentation may use it."""
    return any(isinstance(t, (FlipLR, Dihedral)) and t.p > 0 for t in _listify(tfms))


def tta_kept(tfms):
    """The training transforms test-time augmentation keeps, as fastai v1 did: all but flips, crops and zooms (an
    AffineWarp is kept as a copy without zoom: its rotation and warp stay random)."""
    kept = []
    for t in _listify(tfms):
        if isinstance(t, (_Flip, Dihedral, RandomCropPad, ZoomCrop)):
            continue
        if isinstance(t, AffineWarp):
            if t.max_rotate == 0 and t.max_warp == 0:
                continue
            t = AffineWarp(t.max_rotate, 1., t.max_warp, t.p_affine, t.pad_mode)
        kept.append(t)
    return kept


def _listify(o):
    if o is None:
        return []
    return list(o) if isinstance(o, (list, tuple)) else [o]


def get_transforms(do_flip=True, flip_vert=False, max_rotate=10., max_zoom=1.1, max_lighting=0.2, max_warp=0.2,
                   p_affine=0.75, p_lighting=0.75, xtra_tfms=None):
    """fastai v1's default augmentation as batch transforms: (train_tfms, valid_tfms), the validation list empty."""
    train = []
    if do_flip:
        train.append(Dihedral() if flip_vert else FlipLR(0.5))
    if max_rotate or max_zoom > 1 or max_warp:
        train.append(AffineWarp(max_rotate, max(max_zoom, 1.), max_warp, p_affine))
    if max_lighting:
        train.append(Lighting(max_lighting, p_lighting))
    return train + _listify(xtra_tfms), []


def cifar_transforms(padding=4):
    """The classic CIFAR augmentation: random pad-and-crop by `padding` pixels, then a random left-right flip."""
    return [RandomCropPad(padding), FlipLR()], []


def apply_tfms(tfms, x):
    """Applies the transforms `tfms` to the batch `x` in order."""
    for t in _listify(tfms):
        x = t(x)
    return x


def split_index_only(tfms):
    """(the leading index-only transforms, the rest): the first list can run on uint8 before conversion to float."""
    tfms = _listify(tfms)
    i = 0
    while i < len(tfms) and getattr(tfms[i], 'index_only', False):
        i += 1
    return tfms[:i], tfms[i:]
