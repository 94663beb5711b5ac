"""Batch augmentation: per-sample randomness, exact flips and pad-crops, affine/warp grids and lighting checked
against hand-written references, and fastai v1's get_transforms defaults."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minifast.data.augment import (AffineWarp, BatchTransform, Dihedral, FlipLR, FlipUD, Lighting, RandomCropPad,
                                   apply_tfms, cifar_transforms, get_transforms, split_index_only)

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def float_batch(n=16, h=12, w=10, device='cpu', seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g).to(device)


def uint8_batch(n=16, h=12, w=10, device='cpu', seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8).to(device)


def all_transforms():
    return [FlipLR(), FlipUD(), RandomCropPad(3), RandomCropPad(3, 'reflect'), RandomCropPad(2, p=0.5),
            AffineWarp(), AffineWarp(30, 1.5, 0.4, 1., 'zeros'), AffineWarp(pad_mode='border'), Lighting(),
            Lighting(0.5, 1.)]


def pixel_grid(h, w):
    """(H*W, 3) float64 (x, y, 1) at the pixel centres, in grid_sample's align_corners=False coordinates."""
    ys, xs = np.meshgrid((2 * np.arange(h) + 1) / h - 1, (2 * np.arange(w) + 1) / w - 1, indexing='ij')
    return np.stack([xs.ravel(), ys.ravel(), np.ones(h * w)], 1)


def warp_by_matrices(x, mats, pad_mode):
    """Reference: each sample resampled through its own 3x3 homography, one grid_sample per sample."""
    n, _, h, w = x.shape
    out = []
    for i in range(n):
        q = pixel_grid(h, w) @ np.asarray(mats[i], dtype=np.float64).T
        grid = torch.tensor(q[:, :2] / q[:, 2:], dtype=x.dtype).view(1, h, w, 2)
        out.append(F.grid_sample(x[i:i + 1], grid, mode='bilinear', padding_mode=pad_mode, align_corners=False))
    return torch.cat(out)


# --- shapes, dtypes, devices, ranges ---------------------------------------------------------------------------

@pytest.mark.parametrize('device', DEVICES)
def test_float_batches_keep_shape_dtype_device_and_range(device):
    x = float_batch(device=device)
    x0 = x.clone()
    for tfm in all_transforms():
        torch.manual_seed(0)
        y = tfm(x)
        assert (y.shape, y.dtype, y.device) == (x.shape, x.dtype, x.device), tfm
        assert y.min() >= 0 and y.max() <= 1, tfm
        assert torch.equal(x, x0), f'{tfm} changed its input in place'


@pytest.mark.parametrize('device', DEVICES)
def test_index_only_transforms_take_uint8_and_the_others_refuse_it(device):
    x = uint8_batch(device=device)
    for tfm in all_transforms():
        if tfm.index_only:
            y = tfm(x)
            assert (y.shape, y.dtype, y.device) == (x.shape, torch.uint8, x.device), tfm
        else:
            with pytest.raises(TypeError, match=rf'{type(tfm).__name__} needs float input in \[0, 1\]'):
                tfm(x)
    assert [t.index_only for t in (FlipLR(), FlipUD(), RandomCropPad(), AffineWarp(), Lighting())] == \
        [True, True, True, False, False]
    assert issubclass(AffineWarp, BatchTransform) and issubclass(FlipLR, BatchTransform)


def test_bad_arguments_and_shapes_name_the_transform():
    with pytest.raises(ValueError, match=r'FlipLR expects a batch tensor of shape \(N, C, H, W\), got \(3, 8, 8\)'):
        FlipLR()(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match='RandomCropPad: pad_mode'):
        RandomCropPad(4, 'wrap')
    with pytest.raises(ValueError, match='AffineWarp: pad_mode'):
        AffineWarp(pad_mode='reflect')
    with pytest.raises(ValueError, match=r'Lighting: max_lighting must be in \[0, 1\)'):
        Lighting(1.0)
    with pytest.raises(ValueError, match=r'FlipLR: p must be in \[0, 1\]'):
        FlipLR(1.5)
    with pytest.raises(ValueError, match="'reflect' padding 4 must be smaller"):
        RandomCropPad(4, 'reflect')(torch.rand(2, 3, 4, 4))


def test_empty_batch_passes_through():
    for tfm in all_transforms():
        assert tfm(float_batch(n=0)).shape == (0, 3, 12, 10), tfm


# --- per-sample randomness and the p=0 / p=1 ends ------------------------------------------------------------

def distinct(y):
    return len({tuple(s.flatten().tolist()) for s in y.cpu()})


def test_each_sample_draws_its_own_parameters():
    torch.manual_seed(0)
    x = float_batch(n=1, h=16, w=16).expand(64, -1, -1, -1)
    y = FlipLR()(x)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert 0 < flipped.sum() < 64 and torch.equal(flipped, ~kept)
    assert distinct(RandomCropPad(4)(x)) >= 20
    assert distinct(AffineWarp()(x)) >= 20
    assert distinct(Lighting()(x)) >= 20


def test_p0_is_the_identity_and_p1_flips_everything():
    x = float_batch()
    for tfm in (FlipLR(0.), FlipUD(0.), RandomCropPad(4, p=0.), AffineWarp(p_affine=0.), Lighting(p=0.)):
        assert torch.equal(tfm(x), x), tfm
    assert torch.equal(FlipLR(1.)(x), x.flip(3))
    assert torch.equal(FlipUD(1.)(x), x.flip(2))
    xu = uint8_batch()
    assert torch.equal(FlipLR(1.)(xu), xu.flip(3))


@pytest.mark.parametrize('device', DEVICES)
def test_flips_follow_their_drawn_mask(device):
    torch.manual_seed(1)
    for tfm, dim in ((FlipLR(), 3), (FlipUD(), 2)):
        for x in (float_batch(n=400, device=device), uint8_batch(n=400, device=device)):
            y = tfm(x)
            flip = tfm.last_params['flip']
            ref = torch.stack([s.flip(dim - 1) if f else s for s, f in zip(x, flip.tolist())])
            assert torch.equal(y, ref)
            assert 0.4 < flip.float().mean() < 0.6


def test_same_seed_same_batch():
    x = float_batch()
    tfms = get_transforms()[0] + cifar_transforms()[0]
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(apply_tfms(tfms, x))
    assert torch.equal(*outs)


# --- RandomCropPad against F.pad and slicing -----------------------------------------------------------------

@pytest.mark.parametrize('device', DEVICES)
def test_random_crop_pad_is_a_zero_padded_shift_and_all_offsets_appear(device):
    h, w, pad = 12, 11, 4
    ramp = (torch.arange(h * w) + 1).to(torch.uint8).view(1, 1, h, w).expand(3000, 3, h, w).to(device)
    torch.manual_seed(0)
    tfm = RandomCropPad(pad)
    y = tfm(ramp)
    # All (2p+1)^2 shifted windows of the zero-padded image, by hand.
    padded = F.pad(ramp[:1], (pad,) * 4)
    offsets = [(r, c) for r in range(2 * pad + 1) for c in range(2 * pad + 1)]
    cands = torch.cat([padded[:, :, r:r + h, c:c + w] for r, c in offsets])        # (81, 3, H, W)
    match = (y[:, None] == cands[None]).flatten(2).all(2)                          # (N, 81)
    assert torch.equal(match.sum(1), torch.ones(len(y), dtype=torch.long, device=device))
    found = match.float().argmax(1).cpu()
    drawn = tfm.last_params['row_offset'].cpu() * (2 * pad + 1) + tfm.last_params['col_offset'].cpu()
    assert torch.equal(found, drawn)
    assert set(found.tolist()) == set(range(len(offsets)))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('mode', ['zeros', 'reflect'])
def test_random_crop_pad_matches_pad_and_slice_per_sample(device, mode):
    torch.manual_seed(2)
    for x in (float_batch(n=32, device=device), uint8_batch(n=32, device=device)):
        tfm = RandomCropPad(3, mode, p=0.7)
        y = tfm(x)
        r, c = tfm.last_params['row_offset'].tolist(), tfm.last_params['col_offset'].tolist()
        padded = F.pad(x.float(), (3,) * 4, mode='constant' if mode == 'zeros' else 'reflect').to(x.dtype)
        ref = torch.stack([padded[i, :, r[i]:r[i] + 12, c[i]:c[i] + 10] for i in range(len(x))])
        assert torch.equal(y, ref)
        left = [i for i in range(len(x)) if (r[i], c[i]) == (3, 3)]
        assert left and torch.equal(y[left], x[left])


# --- AffineWarp against hand-built matrices and grids ---------------------------------------------------------

def rotation(deg, h, w):
    a = math.radians(deg)
    # fastai v1's rotation, with the aspect correction that keeps it rigid in pixels on a non-square image.
    return np.array([[math.cos(a), -math.sin(a) * h / w, 0], [math.sin(a) * w / h, math.cos(a), 0], [0, 0, 1]])


def zoom(scale, row_pct, col_pct):
    k = 1 - 1 / scale
    return np.array([[1 / scale, 0, k * (2 * col_pct - 1)], [0, 1 / scale, k * (2 * row_pct - 1)], [0, 0, 1]])


def symmetric_warp(m):
    """Homography taking fastai v1's moved corners back to the image corners, solved in float64 by numpy."""
    m0, m1, m2, m3 = m
    targ = [(-1 - m3, -1 - m1), (-1 - m2, 1 + m1), (1 + m3, -1 - m0), (1 + m2, 1 + m0)]
    orig = [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    a, b = [], []
    for (X, Y), (u, v) in zip(targ, orig):
        a += [[X, Y, 1, 0, 0, 0, -u * X, -u * Y], [0, 0, 0, X, Y, 1, -v * X, -v * Y]]
        b += [u, v]
    return np.append(np.linalg.solve(np.array(a), np.array(b)), 1).reshape(3, 3), targ, orig


def test_rotation_only_matches_affine_grid_with_the_drawn_angle():
    torch.manual_seed(0)
    x = float_batch(n=12, h=16, w=16)
    tfm = AffineWarp(max_rotate=30., max_zoom=1., max_warp=0., p_affine=1., pad_mode='zeros')
    y = tfm(x)
    deg = tfm.last_params['degrees']
    assert tfm.last_params['rotate'].all() and (deg.abs() <= 30).all() and deg.std() > 5
    a = deg.double() * math.pi / 180
    theta = torch.stack([torch.stack([a.cos(), -a.sin(), 0 * a], 1), torch.stack([a.sin(), a.cos(), 0 * a], 1)], 1)
    ref = F.grid_sample(x, F.affine_grid(theta.float(), x.shape, align_corners=False), padding_mode='zeros',
                        align_corners=False)
    assert torch.allclose(y, ref, atol=1e-5)


def test_rotation_is_rigid_in_pixels_on_a_non_square_image():
    torch.manual_seed(0)
    h, w = 12, 20
    tfm = AffineWarp(max_rotate=45., max_zoom=1., max_warp=0., p_affine=1.)
    tfm(float_batch(n=8, h=h, w=w))
    mats = tfm.last_params['matrix'].double().numpy()
    to_pix, to_norm = np.diag([w / 2, h / 2]), np.diag([2 / w, 2 / h])
    for m, deg in zip(mats, tfm.last_params['degrees'].tolist()):
        r = to_pix @ m[:2, :2] @ to_norm
        a = math.radians(deg)
        assert np.allclose(r, [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], atol=1e-6)
        assert np.allclose(m, rotation(deg, h, w), atol=1e-6)


def test_zoom_only_stays_inside_the_image_and_matches_affine_grid():
    torch.manual_seed(0)
    x = float_batch(n=64, h=16, w=16)
    tfm = AffineWarp(max_rotate=0., max_zoom=1.5, max_warp=0., p_affine=1., pad_mode='zeros')
    y = tfm(x)
    prm = tfm.last_params
    s = prm['scale']
    assert (s >= 1).all() and (s <= 1.5).all() and s.max() - s.min() > 0.3
    m = prm['matrix']
    assert torch.allclose(m[:, 0, 0], 1 / s) and torch.allclose(m[:, 1, 1], 1 / s)
    assert ((m[:, :2, 2].abs() + 1 / s[:, None]) <= 1 + 1e-6).all()    # the zoomed window lies inside [-1, 1]
    ref = F.grid_sample(x, F.affine_grid(m[:, :2], x.shape, align_corners=False), padding_mode='zeros',
                        align_corners=False)
    assert torch.allclose(y, ref, atol=1e-5)
    assert torch.equal(AffineWarp(max_rotate=0., max_zoom=1., max_warp=0., p_affine=1.)(x), x)


def test_symmetric_warp_moves_the_corners_as_fastai_v1():
    torch.manual_seed(0)
    x = float_batch(n=8, h=14, w=18)
    tfm = AffineWarp(max_rotate=0., max_zoom=1., max_warp=0.3, p_affine=1.)
    y = tfm(x)
    mags, mats = tfm.last_params['magnitude'].double().numpy(), tfm.last_params['matrix'].double().numpy()
    assert (np.abs(mags) <= 0.3).all() and mags.std() > 0.05
    for mag, m in zip(mags, mats):
        ref, targ, orig = symmetric_warp(mag)
        assert np.allclose(m, ref, atol=1e-4)
        for t, o in zip(targ, orig):
            q = m @ [t[0], t[1], 1]
            assert np.allclose(q[:2] / q[2], o, atol=1e-4)
    assert torch.allclose(y, warp_by_matrices(x, mats, 'reflection'), atol=1e-4)


@pytest.mark.parametrize('device', DEVICES)
def test_composed_grid_is_rotate_zoom_warp_in_fastai_order(device):
    torch.manual_seed(4)
    x = float_batch(n=16, h=12, w=16, device=device)
    tfm = AffineWarp(max_rotate=20., max_zoom=1.3, max_warp=0.2, p_affine=0.6, pad_mode='reflection')
    y = tfm(x)
    prm = {k: v.double().cpu().numpy() for k, v in tfm.last_params.items()}
    refs = []
    for i in range(len(x)):
        warp = symmetric_warp(prm['magnitude'][i])[0] if prm['warp'][i] else np.eye(3)
        refs.append(rotation(prm['degrees'][i], 12, 16) @ zoom(prm['scale'][i], prm['row_pct'][i],
                                                                 prm['col_pct'][i]) @ warp)
    assert np.allclose(prm['matrix'], np.stack(refs), atol=1e-4)
    assert torch.allclose(y.cpu(), warp_by_matrices(x.cpu(), refs, 'reflection'), atol=1e-4)


def test_samples_that_draw_no_transform_are_unchanged():
    torch.manual_seed(0)
    x = float_batch(n=64, h=16, w=16)
    tfm = AffineWarp(p_affine=0.3)
    y = tfm(x)
    prm = tfm.last_params
    none = ~(prm['rotate'] | prm['zoom'] | prm['warp'])
    assert 5 < none.sum() < 64
    assert torch.equal(y[none], x[none])        # exactly, not just to grid_sample's rounding (~1e-7)
    assert torch.equal(prm['matrix'][none], torch.eye(3).expand(int(none.sum()), 3, 3))
    assert ((y[~none] - x[~none]).flatten(1).abs().amax(1) > 1e-3).all()


# --- Lighting against the logit-space formula -----------------------------------------------------------------

def test_lighting_matches_the_logit_formula_on_constant_images():
    torch.manual_seed(0)
    n = 256
    v = torch.linspace(0, 1, n)                       # 0 and 1 exercise the clamp to (eps, 1 - eps)
    x = v.view(n, 1, 1, 1).expand(n, 3, 4, 5).contiguous()
    tfm = Lighting(max_lighting=0.3, p=0.6)
    y = tfm(x)
    prm = tfm.last_params
    b, s = prm['brightness'].tolist(), prm['contrast'].tolist()
    assert all(0.35 <= bi <= 0.65 for bi in b) and all(0.7 - 1e-6 <= si <= 1 / 0.7 + 1e-6 for si in s)
    assert torch.equal(prm['do_brightness'], prm['brightness'] != 0.5)
    assert torch.equal(prm['do_contrast'], prm['contrast'] != 1)
    eps = 1e-7
    for i in range(n):
        if not (prm['do_brightness'][i] or prm['do_contrast'][i]):
            assert torch.equal(y[i], x[i])
            continue
        vi = min(max(v[i].item(), eps), 1 - eps)
        ref = 1 / (1 + math.exp(-(math.log(vi / (1 - vi)) + math.log(b[i] / (1 - b[i]))) * s[i]))
        assert torch.allclose(y[i], torch.full_like(y[i], ref), atol=1e-6), (i, v[i].item(), b[i], s[i])


def test_lighting_draws_uniform_brightness_and_log_uniform_contrast():
    torch.manual_seed(0)
    tfm = Lighting(max_lighting=0.2, p=1.)
    tfm(torch.rand(20000, 1, 1, 1))
    b, s = tfm.last_params['brightness'], tfm.last_params['contrast']
    assert abs(b.min() - 0.4) < 1e-3 and abs(b.max() - 0.6) < 1e-3 and abs(b.mean() - 0.5) < 3e-3
    log_s = s.log()
    assert abs(s.min() - 0.8) < 1e-3 and abs(s.max() - 1.25) < 1e-3 and abs(log_s.mean()) < 3e-3
    assert abs((log_s < 0).float().mean() - 0.5) < 0.02          # as likely to lower the contrast as to raise it
    x = torch.rand(4, 3, 5, 5)
    assert torch.equal(Lighting(0.)(x), x)


# --- get_transforms, cifar_transforms, apply_tfms, split_index_only ------------------------------------------

def test_get_transforms_defaults_are_fastai_v1s():
    train, valid = get_transforms()
    assert valid == []
    assert [type(t) for t in train] == [FlipLR, AffineWarp, Lighting]
    flip, affine, light = train
    assert flip.p == 0.5
    assert (affine.max_rotate, affine.max_zoom, affine.max_warp, affine.p_affine, affine.pad_mode) == \
        (10., 1.1, 0.2, 0.75, 'reflection')
    assert (light.max_lighting, light.p) == (0.2, 0.75)
    assert repr(train) == ("[FlipLR(p=0.5), AffineWarp(max_rotate=10.0, max_zoom=1.1, max_warp=0.2, p_affine=0.75, "
                           "pad_mode='reflection'), Lighting(max_lighting=0.2, p=0.75)]")


def test_get_transforms_options():
    assert [type(t) for t in get_transforms(flip_vert=True)[0]] == [Dihedral, AffineWarp, Lighting]
    assert [type(t) for t in get_transforms(do_flip=False)[0]] == [AffineWarp, Lighting]
    assert [type(t) for t in get_transforms(max_lighting=0)[0]] == [FlipLR, AffineWarp]
    assert [type(t) for t in get_transforms(max_rotate=0, max_zoom=1., max_warp=0)[0]] == [FlipLR, Lighting]
    only_zoom = get_transforms(max_rotate=0, max_warp=0, p_affine=0.5, p_lighting=0.25)[0]
    assert (only_zoom[1].max_rotate, only_zoom[1].max_zoom, only_zoom[1].max_warp, only_zoom[1].p) == (0, 1.1, 0, .5)
    assert only_zoom[2].p == 0.25
    extra = RandomCropPad(2)
    assert get_transforms(xtra_tfms=extra)[0][-1] is extra
    assert get_transforms(xtra_tfms=[extra, FlipUD()])[0][-2] is extra


def test_cifar_transforms():
    train, valid = cifar_transforms()
    assert valid == []
    assert repr(train) == "[RandomCropPad(padding=4, pad_mode='zeros', p=1.0), FlipLR(p=0.5)]"
    assert train[0].padding == 4 and cifar_transforms(2)[0][0].padding == 2


def test_split_index_only_and_the_loader_pipeline():
    crop, flip, affine, light, flip_ud = RandomCropPad(), FlipLR(), AffineWarp(), Lighting(), FlipUD()
    assert split_index_only([crop, flip]) == ([crop, flip], [])
    assert split_index_only([flip, affine, light]) == ([flip], [affine, light])
    assert split_index_only([affine, flip_ud]) == ([], [affine, flip_ud])
    assert split_index_only([]) == ([], [])
    # uint8 -> leading index-only transforms -> float / 255 -> the rest, as the loader runs them.
    tfms = cifar_transforms()[0] + get_transforms(do_flip=False)[0]
    xu = uint8_batch(n=32)
    first, rest = split_index_only(tfms)
    torch.manual_seed(5)
    y = apply_tfms(rest, apply_tfms(first, xu).float() / 255)
    torch.manual_seed(5)
    ref = xu
    for t in tfms[:2]:
        ref = t(ref)
    ref = ref.float() / 255
    for t in tfms[2:]:
        ref = t(ref)
    assert torch.equal(y, ref) and y.dtype == torch.float32 and 0 <= y.min() and y.max() <= 1


def test_dihedral_gives_each_of_the_8_symmetries():
    torch.manual_seed(0)
    img = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4).expand(1, 3, 4, 4)
    refs = []
    for t in (img, img.transpose(2, 3)):
        refs += [t, t.flip(3), t.flip(2), t.flip(2).flip(3)]
    assert len({r.numpy().tobytes() for r in refs}) == 8  # all distinct on this image
    out = Dihedral()(img.expand(200, 3, 4, 4).contiguous())
    seen = set()
    for o in out:
        match = [i for i, r in enumerate(refs) if torch.equal(o, r[0])]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(range(8))
    assert torch.equal(Dihedral(p=0)(img), img)


@pytest.mark.parametrize('h, w', [(5, 5), (4, 6)])
def test_dihedral_applies_the_symmetry_its_last_params_name(h, w):
    torch.manual_seed(0)
    x = uint8_batch(64, h, w)
    t = Dihedral(p=0.8)
    out, k = t(x), t.last_params['k']

    def ref(img, k):  # one sample at a time, from the documented bits
        img = img.transpose(1, 2) if k & 4 else img
        img = img.flip(2) if k & 1 else img
        return img.flip(1) if k & 2 else img
    assert torch.equal(out, torch.stack([ref(x[i], int(k[i])) for i in range(64)]))
    assert set(k.tolist()) == (set(range(8)) if h == w else set(range(4)))
