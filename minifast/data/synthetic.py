"""Generated datasets for demos, tests and benchmarks (no download)."""
import torch

__all__ = ['synthetic_classification']


def synthetic_classification(n_train=2048, n_valid=512, n_features=32, n_classes=10, noise=0.5, seed=0):
    """A learnable classification problem: labels from a fixed random linear teacher plus noise.

    Returns (x_train, y_train, x_valid, y_valid) as float32 / int64 tensors.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_features, n_classes, generator=g)
    x = torch.randn(n_train + n_valid, n_features, generator=g)
    y = (x @ w + noise * torch.randn(n_train + n_valid, n_classes, generator=g)).argmax(1)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]
