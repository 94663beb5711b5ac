"""Metrics: functions (pred, target) -> 0-d tensor, averaged over a dataset weighted by batch size, on device."""

__all__ = ['accuracy', 'top_k_accuracy', 'error_rate']


def accuracy(input, targs):
    """Fraction of rows whose arg-max equals the target."""
    return (input.argmax(dim=-1) == targs).float().mean()


def top_k_accuracy(input, targs, k=5):
    """Fraction of rows whose target is among the k highest scores (k=5)."""
    k = min(k, input.shape[-1])
    return (input.topk(k, dim=-1).indices == targs.unsqueeze(-1)).any(dim=-1).float().mean()


def error_rate(input, targs):
    """1 - accuracy."""
    return 1 - accuracy(input, targs)
