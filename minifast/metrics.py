"""Metrics: functions (pred, target) -> 0-d tensor, averaged over a dataset weighted by batch size, on device
(`batch_sums`, `batch_means`): the one reduction of validate, distributed validation and the landscape analyses."""
import torch

from .checks import metric_name

__all__ = ['accuracy', 'top_k_accuracy', 'error_rate', 'batch_sums', 'batch_means', 'metric_error']


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


def batch_sums(rows, n_cols, device, dtype=torch.float32, sizes=None):
    """The sums over a dataset of per-batch values weighted by batch size, and the item count: one tensor of n_cols
    + 1 values of `dtype` on `device` ([sum of batch size * column value for each column, item count]), not read
    back. `rows` holds (batch size, [value per column]) per batch (0-d tensors or numbers; n_cols columns, e.g. the
    loss and each metric). `sizes`: the batch sizes as a tensor of `dtype` on `device` (default: made from the
    rows, a copy to the device, which on CUDA waits for it; a caller evaluating the same batches again and again
    makes it once). Zeros when there are no rows."""
    if not rows:
        return torch.zeros(n_cols + 1, dtype=dtype, device=device)
    bs = torch.tensor([r[0] for r in rows], dtype=dtype, device=device) if sizes is None else sizes
    as_t = lambda x: torch.as_tensor(x, device=device).to(dtype).reshape(())  # noqa: E731
    cols = torch.stack([torch.stack([as_t(v) for v in r[1]]) for r in rows])  # (batches, n_cols)
    return torch.cat(((cols * bs[:, None]).sum(0), bs.sum().reshape(1)))


def batch_means(rows, n_cols, device, reduce=None):
    """The means over a dataset of per-batch values weighted by batch size: `rows` holds (batch size, [value per
    column]) per batch (0-d tensors or numbers; n_cols columns, e.g. the loss and each metric). `reduce(t, 'sum')`
    adds the sums and the item count (`batch_sums`) across processes (distributed evaluation, in float64: a rank
    with no batches adds zeros). nan where no item was seen. One host read."""
    dtype = torch.float32 if reduce is None else torch.float64
    t = batch_sums(rows, n_cols, device, dtype)
    if reduce is not None:
        reduce(t, 'sum')
    if reduce is None and rows:  # divided on the device: the same float32 arithmetic the loop always did
        return (t[:n_cols] / t[n_cols]).tolist()
    vals = t.tolist()
    return [v / vals[n_cols] if vals[n_cols] else float('nan') for v in vals[:n_cols]]


def metric_error(metrics, pred, yb, batch, e):
    """The error of a metric that raised `e` on validation batch `batch`, naming it (found by calling each again)."""
    for m in metrics:
        try:
            m(pred, yb)
        except Exception:
            break
    return RuntimeError(f'metric {metric_name(m)} raised {type(e).__name__} on validation batch {batch} '
                        f'(predictions of shape {tuple(getattr(pred, "shape", ()))}, targets of shape '
                        f'{tuple(getattr(yb, "shape", ()))}): {e}')
