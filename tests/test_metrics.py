"""Metrics against hand-computed values."""
import pytest
import torch

from minifast import accuracy, error_rate, top_k_accuracy


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
