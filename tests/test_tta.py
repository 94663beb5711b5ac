"""Test-time augmentation: plain predictions kept exactly at beta=1, each view equal to the transforms applied by hand,
flips only where training flipped, the global RNG and the model left alone."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minifast import AffineWarp, DatasetType, Dihedral, FlipLR, Learner, Lighting, RandomCropPad, ZoomCrop
from minifast.data.augment import tta_kept
from minifast.tta import tta_views
from conftest import make_data, make_mlp
from test_interpret import image_data, image_learner


class Recording(nn.Module):
    """A tiny classifier that keeps a copy of every batch it is given."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 20 * 20, 4)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.lin(x.flatten(1))


def test_zoom_crop_equals_resize_and_slice_at_each_corner():
    x = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    big = F.interpolate(x, size=(27, 27), mode='bilinear', align_corners=False)  # 20 * 1.35 = 27
    for r in (0, 1):
        for c in (0, 1):
            out = ZoomCrop(1.35, row_pct=r, col_pct=c)(x)
            torch.testing.assert_close(out, big[..., 7 * r:7 * r + 20, 7 * c:7 * c + 20], atol=1e-5, rtol=0)
    big = F.interpolate(x, size=(30, 30), mode='bilinear', align_corners=False)  # 20 * 1.5 = 30
    torch.testing.assert_close(ZoomCrop(1.5)(x), big[..., 5:25, 5:25], atol=1e-5, rtol=0)  # the centre
    torch.testing.assert_close(ZoomCrop(1.5, 0.2, 0.8)(x), big[..., 2:22, 8:28], atol=1e-5, rtol=0)
    assert ZoomCrop(1.)(x) is x
    with pytest.raises(ValueError, match='row_pct must be in'):
        ZoomCrop(1.35, row_pct=2)


def test_views_are_the_corner_zooms_flipped_then_normalised_as_by_hand():
    data = image_data(tfms=[FlipLR()])
    model = Recording()
    learn = Learner(data, model, silent=True)
    views = list(learn.tta_only(scale=1.35))
    assert len(views) == 8 and all(v.shape == (22, 4) for v in views)
    x = data.valid_ds.x.float() / 255
    mean, std = (s[None, :, None, None] for s in data.stats)
    big = F.interpolate(x, size=(27, 27), mode='bilinear', align_corners=False)
    batches = [torch.cat(model.seen[i * 5:(i + 1) * 5]) for i in range(8)]  # val_bs 5: 5 batches a view
    for i in range(8):
        r, c = i & 1, (i & 2) > 0  # fastai v1's order: row, col, then the flipped four
        ref = big.flip(3) if i & 4 else big
        ref = (ref[..., 7 * r:7 * r + 20, 7 * c:7 * c + 20] - mean) / std
        torch.testing.assert_close(batches[i], ref, atol=1e-4, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(views[i], model.lin(ref.flatten(1)).softmax(-1), atol=1e-5, rtol=0)


def test_beta_1_is_exactly_the_plain_predictions_and_beta_none_gives_both():
    learn = image_learner(tfms=[FlipLR(), Lighting()])
    preds, y = learn.get_preds()
    p1, y1 = learn.TTA(beta=1)
    assert torch.equal(p1, preds) and torch.equal(y1, y)
    p, a, y2 = learn.TTA(beta=None)
    assert torch.equal(p, preds) and torch.equal(y2, y)
    assert not torch.allclose(a, preds)  # the views differ from the plain image
    final, y3 = learn.TTA()  # beta 0.4: the views are drawn again, the same since the RNG is kept
    torch.testing.assert_close(final, 0.4 * preds + 0.6 * a)
    torch.testing.assert_close(learn.TTA(beta=0)[0], a)


def test_tta_mean_is_the_mean_of_tta_only_and_with_loss_is_the_final_nll():
    learn = image_learner(tfms=[FlipLR()])
    views = torch.stack(list(learn.tta_only()))
    assert len(views) == 8
    p, a, y = learn.TTA(beta=None)
    torch.testing.assert_close(a, views.mean(0))
    final, y, loss = learn.TTA(with_loss=True)
    torch.testing.assert_close(loss, -final[torch.arange(len(y)), y].log())


def test_scale_1_corner_views_equal_the_plain_predictions():
    learn = image_learner(tfms=[RandomCropPad(2)])  # no flip in training: 4 views; no random transform kept
    views = list(learn.tta_only(scale=1.))
    assert len(views) == 4
    plain = learn.get_preds()[0]
    assert all(torch.equal(v, plain) for v in views)  # the view pipeline is the validation pipeline exactly


def test_flip_views_follow_training_flips_unless_told():
    assert len(tta_views([])) == 4 and len(tta_views([FlipLR()])) == 8 and len(tta_views([Dihedral()])) == 8
    assert len(tta_views([FlipLR(p=0.)])) == 4
    assert len(tta_views([], flip=True)) == 8 and len(tta_views([FlipLR()], flip=False)) == 4
    v = tta_views([FlipLR()])
    assert [isinstance(t[0], FlipLR) for t in v] == [False] * 4 + [True] * 4
    assert [(t[-1].row_pct, t[-1].col_pct) for t in v[:4]] == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_kept_training_transforms_drop_flips_crops_and_zoom():
    warp = AffineWarp(max_rotate=15, max_zoom=1.3, max_warp=0.1)
    light = Lighting(0.3)
    kept = tta_kept([FlipLR(), RandomCropPad(4), Dihedral(), warp, light, AffineWarp(0, 1.2, 0)])
    assert len(kept) == 2 and kept[1] is light
    assert isinstance(kept[0], AffineWarp) and kept[0].max_zoom == 1 and kept[0].max_rotate == 15
    assert warp.max_zoom == 1.3  # the training transform itself is unchanged
    v = tta_views([FlipLR(), warp, light])
    assert all(isinstance(t[-2], AffineWarp) and t[-1] is light for t in v)


def test_random_views_leave_the_global_rng_and_the_model_as_they_were():
    learn = image_learner(tfms=[FlipLR(), Lighting(0.5, p=1.)])
    learn.model.train()
    state = torch.get_rng_state()
    a = learn.TTA(beta=0)[0]
    assert torch.equal(torch.get_rng_state(), state) and learn.model.training
    assert torch.equal(learn.TTA(beta=0)[0], a)  # hence repeatable


def test_non_image_data_and_the_training_loader_are_refused():
    learn = Learner(make_data(), make_mlp(), silent=True)
    with pytest.raises(TypeError, match='TTA needs image data'):
        learn.TTA()
    with pytest.raises(TypeError, match='TTA needs image data'):
        list(learn.tta_only())
    learn = image_learner()
    with pytest.raises(ValueError, match='DatasetType.Fix'):
        learn.TTA(ds_type=DatasetType.Train)
    with pytest.raises(ValueError, match='beta must be in'):
        learn.TTA(beta=1.5)
    p, y = learn.TTA(ds_type=DatasetType.Fix)
    assert len(p) == 24 and torch.equal(y, learn.data.train_ds.y)


def test_the_unflipped_views_are_the_same_with_or_without_the_flipped_ones():
    learn = image_learner(tfms=[Lighting(0.5, p=1.)])  # random views: the same draws either way
    eight = torch.stack(list(learn.tta_only(flip=True)))
    torch.testing.assert_close(learn.TTA(beta=None, flip=False)[1], eight[:4].mean(0), atol=0, rtol=0)
    torch.testing.assert_close(learn.TTA(beta=None, flip=True)[1], eight.mean(0), atol=0, rtol=0)


@pytest.mark.slow  # trains on digits (seconds); the tests above are its fast variants
def test_digits_benchmark_quick_run(capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / 'benchmarks' / 'tta.py'
    spec = importlib.util.spec_from_file_location('bench_tta', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        rows = mod.main(['--quick', '--threads', str(threads)])
    finally:
        torch.set_num_threads(threads)
    assert len(rows) == 1 and set(rows[0]) == {'plain', 's1.35 4 noflip b.4', 's1.35 4 noflip b0',
                                                's1.35 8 flip b.4', 's1.35 8 flip b0'}
    assert all(0 <= v <= 1 for v in rows[0].values())
    assert 'RESULT tta_digits' in capsys.readouterr().out
