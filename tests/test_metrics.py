"""Metrics against hand-computed values."""
import pytest
import torch

from minifast import accuracy, error_rate, top_k_accuracy
from minifast.metrics import batch_means, batch_sums


def test_metrics_against_hand_computed_values():
    out = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5], [0.5, 0.2, 0.3]])
    y = torch.tensor([1, 2, 2, 1])
    assert accuracy(out, y).item() == pytest.approx(0.5)
    assert error_rate(out, y).item() == pytest.approx(0.5)
    assert top_k_accuracy(out, y, k=2).item() == pytest.approx(0.75)  # rows 0, 1, 2 have the target in their top 2
    big = torch.randn(200, 20)
    yb = torch.randint(0, 20, (200,))
    ranks = (big > big.gather(1, yb[:, None])).sum(1)  # how many classes score above the target
    assert top_k_accuracy(big, yb).item() == pytest.approx((ranks < 5).float().mean().item())


def test_batch_sums_is_what_batch_means_divides():
    rows = [(12, (torch.tensor(1e4), 0.25)), (12, (torch.tensor(3.), torch.tensor(0.5))), (5, (7e-3, 1))]
    t = batch_sums(rows, 2, 'cpu')
    assert t.dtype == torch.float32 and t.shape == (3,) and float(t[2]) == 29.
    assert (t[:2] / t[2]).tolist() == batch_means(rows, 2, 'cpu')
    sized = batch_sums([(0, r[1]) for r in rows], 2, 'cpu', sizes=torch.tensor([12., 12., 5.]))
    assert torch.equal(sized, t)  # given sizes are used, not the rows' own
    assert torch.equal(batch_sums([], 2, 'cpu', torch.float64), torch.zeros(3, dtype=torch.float64))
