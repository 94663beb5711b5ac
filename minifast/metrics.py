"""Metrics: functions (pred, target) -> 0-d tensor, averaged over a dataset weighted by batch size, on device
(`batch_sums`, `batch_means`): the one reduction of validate, distributed validation and the landscape analyses;
and torchmetrics.Metric objects, which keep their own state (`Evaluation`)."""
import torch

from .checks import is_torchmetric, metric_name

__all__ = ['accuracy', 'top_k_accuracy', 'error_rate', 'batch_sums', 'batch_means', 'metric_error', 'Evaluation']


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


def _no():
    return False


class Evaluation:
    """The metrics of one validation pass. Functions of (pred, target) give a value per batch, averaged over the
    items (`batch_means`, reduced across ranks); torchmetrics.Metric objects are moved to `device` and reset here,
    updated with each batch's raw outputs and targets (on the device, nothing read back), and computed once in
    `values`: torchmetrics gathers their states across the ranks itself (never averaged again here)."""

    def __init__(self, metrics, device):
        self.metrics = list(metrics)
        self.fns = [m for m in self.metrics if not is_torchmetric(m)]
        self.stateful = [m for m in self.metrics if is_torchmetric(m)]
        for m in self.stateful:
            m.to(device)  # a no-op once there: the states follow the module
            m.reset()  # a fresh state per validation (also drops a cached compute())

    def __call__(self, pred, yb):
        """This batch's values of the function metrics; the torchmetrics objects take the batch."""
        vals = [m(pred, yb) for m in self.fns]
        for m in self.stateful:
            m.update(pred, yb)
        return vals

    def values(self, rows, device, reduce=None):
        """[loss, *metric values] (Python floats, in the order of the metrics): `rows` (batch size, [loss, *function
        metric values]) per batch, averaged by `batch_means` (with `reduce` across ranks); each torchmetrics object
        computed once (synchronised across ranks by torchmetrics when `reduce` is given, else never: a single
        process must not wait for ranks that do not validate). One host read for each."""
        means = batch_means(rows, 1 + len(self.fns), device, reduce)
        if not self.stateful:
            return means
        got = torch.stack([self._compute(m, reduce is not None).reshape(()).float().to(device)
                           for m in self.stateful]).tolist()
        fns, tms = iter(means[1:]), iter(got)
        return [means[0], *(next(tms) if is_torchmetric(m) else next(fns) for m in self.metrics)]

    @staticmethod
    def _compute(m, synced):
        if not synced and not m.update_called:  # no batch: nan, as for the function metrics (and no warning)
            return torch.tensor(float('nan'))
        old = m.distributed_available_fn
        if not synced:  # torch.distributed may be initialised while one process validates (distributed.local)
            m.distributed_available_fn = _no
        try:
            v = m.compute()
        finally:
            m.distributed_available_fn = old
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            what = (f'a tensor of shape {tuple(v.shape)}' if isinstance(v, torch.Tensor)
                    else f'a {type(v).__name__}')
            raise ValueError(f'metric {metric_name(m)}: compute() returned {what}, and a metric column holds one '
                             f'number: use a reducing setting (e.g. average="macro" or "micro" instead of '
                             f'average=None for per-class values), or one metric object per value')
        return v
