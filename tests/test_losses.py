"""LabelSmoothingCrossEntropy against torch and fastai v1's formula; the mixed loss against hand computations."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minifast import Learner, LabelSmoothingCrossEntropy
from minifast.inference import item_losses
from minifast.losses import mixed_loss, per_item_loss
from conftest import make_data, make_mlp


def _v1_formula(out, targ, eps, reduction):
    """fastai v1's LabelSmoothingCrossEntropy, written out: eps/C * sum(-log p) + (1 - eps) * NLL."""
    logp = F.log_softmax(out, dim=1)
    smooth, nll = -logp.sum(dim=1), F.nll_loss(logp, targ, reduction='none')
    loss = smooth * eps / out.shape[1] + (1 - eps) * nll
    return {'mean': loss.mean(), 'sum': loss.sum(), 'none': loss}[reduction]


@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
@pytest.mark.parametrize('shape', [(16, 5), (4, 5, 3, 2)])
def test_label_smoothing_equals_torchs_and_fastai_v1s(reduction, shape):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(*shape, generator=g) * 3
    targ = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    for eps in (0.1, 0.3):
        got = LabelSmoothingCrossEntropy(eps, reduction=reduction)(out, targ)
        torch.testing.assert_close(got, F.cross_entropy(out, targ, label_smoothing=eps, reduction=reduction),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(got, _v1_formula(out, targ, eps, reduction), rtol=0, atol=1e-5)
        assert not torch.allclose(got, F.cross_entropy(out, targ, reduction=reduction))


def test_label_smoothing_defaults_and_errors():
    lf = LabelSmoothingCrossEntropy()
    assert lf.eps == 0.1 and lf.reduction == 'mean' and 'eps=0.1' in repr(lf)
    with pytest.raises(ValueError, match=r'eps must be a number in \[0, 1\], got 1.5'):
        LabelSmoothingCrossEntropy(1.5)
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        LabelSmoothingCrossEntropy(reduction='avg')


def test_label_smoothing_in_a_learner_gives_per_item_losses_and_probabilities():
    data = make_data()
    learn = Learner(data, make_mlp(), loss_func=LabelSmoothingCrossEntropy(0.2), silent=True)
    learn.fit(1, 1e-2)
    preds, targs, losses = learn.get_preds(with_loss=True)
    torch.testing.assert_close(preds.sum(1), torch.ones(len(preds)))  # a softmax, as for cross-entropy
    with torch.no_grad():
        out = learn.model(data.valid_dl.dataset.tensors[0])
    torch.testing.assert_close(losses, F.cross_entropy(out, targs, label_smoothing=0.2, reduction='none'),
                               rtol=0, atol=1e-6)
    assert learn.loss_func.reduction == 'mean'
    torch.testing.assert_close(item_losses(learn.loss_func, out, targs), losses, rtol=0, atol=1e-6)


def test_mixed_loss_per_item_and_per_batch_by_hand():
    g = torch.Generator().manual_seed(0)
    pred, y1, y2 = torch.randn(8, 4, generator=g), torch.randint(0, 4, (8,), generator=g), \
        torch.randint(0, 4, (8,), generator=g)
    lam = torch.rand(8, generator=g)
    ce = lambda t: F.cross_entropy(pred, t, reduction='none')  # noqa: E731
    torch.testing.assert_close(mixed_loss(F.cross_entropy, pred, y1, y2, lam), (lam * ce(y1) + (1 - lam) * ce(y2))
                               .mean(), rtol=0, atol=1e-6)
    summed = nn.CrossEntropyLoss(reduction='sum')
    torch.testing.assert_close(mixed_loss(summed, pred, y1, y2, lam), (lam * ce(y1) + (1 - lam) * ce(y2)).sum(),
                               rtol=0, atol=1e-5)
    assert summed.reduction == 'sum'  # its per-item copy changed only the copy
    b = torch.tensor(0.7)
    torch.testing.assert_close(mixed_loss(F.mse_loss, pred, pred * 0, pred * 2, b),
                               0.7 * (pred ** 2).mean() + 0.3 * (pred ** 2).mean(), rtol=0, atol=1e-6)


def test_per_item_loss_refuses_a_loss_without_reduction_and_a_wrong_shape():
    def g(p, t):
        return p.sum()

    def f(p, t, reduction='mean'):
        return p.sum()
    with pytest.raises(TypeError, match=r"CutMix: .* the loss function g takes no reduction="):
        per_item_loss(g, 'CutMix')
    with pytest.raises(ValueError, match=r"f returned shape \(\) with reduction='none'; one loss per item \(8\)"):
        per_item_loss(f)(torch.zeros(8, 2), torch.zeros(8))
