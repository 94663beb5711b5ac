"""Loss along the line between two weight snapshots (Smith's interpolation plots), barriers, BN recompute."""
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .callbacks.recorder import new_figure
from .checks import check_metrics, metric_name

__all__ = ['interpolate_losses', 'InterpolationResult', 'Barrier', 'barrier', 'plot_interpolation',
           'recompute_bn']

BN_MODES = ('recompute', 'interpolate', 'keep')


def _bn_layers(model):
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


def _device_batches(dl, device, n_batches, channels_last=False):
    """The first n_batches batches of `dl` (all when None) as ((x, ...), y) on `device`, drawn once."""
    out = []
    for i, b in enumerate(dl):
        if n_batches is not None and i >= n_batches:
            break
        xb = tuple(t.to(device, non_blocking=True) for t in b[:-1])
        if channels_last:
            xb = tuple(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x for x in xb)
        out.append((xb, b[-1].to(device, non_blocking=True)))
    return out


def recompute_bn(model, batches, device=None):
    """Reset every BatchNorm's running statistics and re-estimate them from train-mode forward passes over `batches`.

    Cumulative averaging (momentum=None): the running mean is the mean of the batch means, as
    torch.optim.swa_utils.update_bn computes it. `batches` yields (x, y) or ((x, ...), y) pairs (a DataLoader
    works); momenta and every module's train/eval mode are restored afterwards.
    """
    bns = _bn_layers(model)
    if not bns:
        return model
    momenta, modes = [bn.momentum for bn in bns], [(m, m.training) for m in model.modules()]
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        with torch.no_grad():
            for xb, _ in batches:
                xb = xb if isinstance(xb, (tuple, list)) else (xb,)
                if device is not None:
                    xb = tuple(t.to(device) for t in xb)
                model(*xb)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        for m, t in modes:
            m.training = t
    return model


@dataclass
class Barrier:
    """Barrier height on the segment alpha in [0, 1]: max loss there minus the mean of the two endpoint losses."""
    height: float
    same_basin: bool
    loss_w1: float      # alpha = 1
    loss_w2: float      # alpha = 0
    max_loss: float
    alpha_at_max: float


def barrier(result, dl='valid', rtol=1e-2, atol=0.):
    """Barrier between the two endpoints of `result` on dataset `dl`; `same_basin` when height <= atol + rtol *
    |mean endpoint loss|. A non-finite loss on the segment counts as an infinite barrier."""
    a, loss = result.alphas, result.loss(dl)
    ends = {}
    for e in (0., 1.):
        hit = np.flatnonzero(a == e)
        if not len(hit):
            raise ValueError(f'barrier: alpha={e:g} was not evaluated (alphas {a.min():g}..{a.max():g}); call '
                             f'interpolate_losses with include_endpoints=True')
        ends[e] = float(loss[hit[0]])
    seg = (a >= 0) & (a <= 1)
    seg_loss, seg_a = loss[seg], a[seg]
    mean_end = (ends[0.] + ends[1.]) / 2
    if not np.all(np.isfinite(seg_loss)):
        bad = int(np.flatnonzero(~np.isfinite(seg_loss))[0])
        return Barrier(math.inf, False, ends[1.], ends[0.], float(seg_loss[bad]), float(seg_a[bad]))
    i = int(np.argmax(seg_loss))
    height = float(seg_loss[i]) - mean_end
    same = bool(np.isfinite(mean_end) and height <= atol + rtol * abs(mean_end))
    return Barrier(height, same, ends[1.], ends[0.], float(seg_loss[i]), float(seg_a[i]))


class InterpolationResult:
    """Loss and metrics per alpha and dataset from `interpolate_losses`; alpha=1 is w1, alpha=0 is w2.

    `values[dl]` is an (alphas, 1 + metrics) array whose columns are `columns` ('loss' first); `table` gives flat
    columns ('alpha', 'valid_loss', 'valid_accuracy', ...), `to_rows()` one dict per alpha.
    """

    def __init__(self, alphas, columns, values, bn, n_batches):
        self.alphas, self.columns, self.values, self.bn, self.n_batches = alphas, columns, values, bn, n_batches

    @property
    def dls(self):
        """Names of the evaluated datasets."""
        return list(self.values)

    def _dl(self, dl):
        if dl not in self.values:
            raise KeyError(f'no dataset {dl!r} in this result (it has {", ".join(map(repr, self.values))})')
        return self.values[dl]

    def loss(self, dl='valid'):
        """Loss per alpha on dataset `dl`."""
        return self._dl(dl)[:, 0]

    def metric(self, name, dl='valid'):
        """Metric `name` per alpha on dataset `dl`."""
        if name not in self.columns:
            raise KeyError(f'no column {name!r} (columns: {", ".join(self.columns)})')
        return self._dl(dl)[:, self.columns.index(name)]

    @property
    def table(self):
        """{'alpha': array, '<dl>_<column>': array, ...}."""
        t = {'alpha': self.alphas}
        for dl, v in self.values.items():
            for j, c in enumerate(self.columns):
                t[f'{dl}_{c}'] = v[:, j]
        return t

    def to_rows(self):
        """One dict per alpha: {'alpha': a, 'valid_loss': ..., ...} with Python floats."""
        t = self.table
        return [{k: float(v[i]) for k, v in t.items()} for i in range(len(self.alphas))]

    def barrier(self, dl='valid', rtol=1e-2, atol=0.):
        """See `barrier`."""
        return barrier(self, dl, rtol, atol)

    def plot(self, ax=None, log=False):
        """See `plot_interpolation`."""
        return plot_interpolation(self, ax, log)

    def __repr__(self):
        return (f'InterpolationResult({len(self.alphas)} alphas in [{self.alphas.min():g}, {self.alphas.max():g}], '
                f'datasets {self.dls}, columns {self.columns}, bn={self.bn!r})')


_COLORS = {'train': 'b', 'valid': 'r'}


def plot_interpolation(result, ax=None, log=False):
    """Loss against alpha: train blue, valid red (others in further colours), endpoints alpha=0 (w2) and 1 (w1)
    marked; `log` puts the loss axis on a log scale. Returns the Figure."""
    fig, (ax,) = new_figure(ax)
    a = result.alphas
    for dl in ('train', 'valid', *[d for d in result.dls if d not in ('train', 'valid')]):
        if dl not in result.values:
            continue
        y = np.where(np.isfinite(result.loss(dl)), result.loss(dl), np.nan)  # gaps where the loss diverged
        line, = ax.plot(a, y, _COLORS.get(dl, None) or '-', label=f'{dl} loss')
        ends = np.isin(a, (0., 1.))
        ax.plot(a[ends], y[ends], 'o', color=line.get_color(), markersize=6)
    for e, name in ((0., 'w2'), (1., 'w1')):
        ax.axvline(e, color='0.6', ls=':', lw=1)
        ax.annotate(name, (e, 1), xycoords=('data', 'axes fraction'), ha='center', va='bottom')
    if log:
        ax.set_yscale('log')
    ax.set_xlabel('alpha (weights = alpha * w1 + (1 - alpha) * w2)')
    ax.set_ylabel('Loss')
    ax.legend()
    return fig


def _resolve_weights(learn, w, name):
    if isinstance(w, int) and not isinstance(w, bool):
        snaps = getattr(learn, 'snapshots', None)
        if snaps is None or w not in snaps:
            have = sorted(snaps) if snaps else []
            raise KeyError(f'interpolate_losses: {name}={w} names no snapshot (learn.snapshots has epochs {have})')
        return snaps[w]
    if isinstance(w, nn.Module):
        return w.state_dict()
    return w


def _loaders(learn, dls):
    items = dls.items() if isinstance(dls, dict) else [(d, None) for d in ([dls] if isinstance(dls, str) else dls)]
    out = {}
    for name, dl in items:
        if dl is None:
            if name not in ('train', 'valid'):
                raise ValueError(f"interpolate_losses: dls names 'train' or 'valid' (or give {{name: loader}}), "
                                 f"got {name!r}")
            dl = getattr(learn.data, f'{name}_dl')
            if dl is None:
                raise ValueError(f'interpolate_losses: this learner has no {name} set (data.{name}_dl is None)')
        out[name] = dl
    return out


def interpolate_losses(learn, w1, w2, alphas=None, dls=('valid', 'train'), bn='recompute', n_batches=None,
                       metrics=None, include_endpoints=True):
    """Loss and metrics of the weights alpha * w1 + (1 - alpha) * w2 for each alpha, on each dataset.

    Args:
        learn: the Learner whose model, loss_func, metrics, device and data are used.
        w1, w2: state dicts (e.g. `learn.snapshots[5]`), epochs of `learn.snapshots`, or models.
        alphas: default np.linspace(-0.5, 1.5, 100); alpha=1 gives w1 and alpha=0 gives w2 exactly.
        dls: dataset names ('valid', 'train') or {name: loader}.
        bn: BatchNorm running statistics at each alpha. 'recompute' (default, correct: interpolated weights with
            stale statistics give wrong losses) resets them and re-estimates them by train-mode forward passes over
            the training batches used, with cumulative averaging (as swa_utils.update_bn); 'interpolate' mixes the
            endpoints' statistics like the weights; 'keep' uses w1's.
        n_batches: evaluate (and recompute BN on) only the first n_batches batches of each loader.
        metrics: default learn.metrics.
        include_endpoints: add alpha=0 and alpha=1 to `alphas` (sorted in) so the endpoints and barrier are exact.

    Integer buffers (BatchNorm's num_batches_tracked) are not interpolated: w1's values are used ('recompute'
    counts them from zero while it re-estimates). The batches of each loader are drawn once, moved to learn.device
    and reused for every alpha, so every alpha sees the same (e.g. same augmented) batches; the global RNG is left
    as it was. Weights are mixed in place with torch.lerp into the model's own tensors and evaluated under
    torch.inference_mode with the loss averaged by batch size, as learn.validate does, but with no callbacks run.
    Non-finite losses are recorded as NaN/inf. The model's weights, buffers, BatchNorm momenta and every module's
    train/eval mode are restored afterwards, also on an exception or KeyboardInterrupt.
    Returns an InterpolationResult (`.table`, `.to_rows()`, `.barrier()`, `.plot()`).
    """
    if bn not in BN_MODES:
        raise ValueError(f"interpolate_losses: bn must be one of {', '.join(map(repr, BN_MODES))}, got {bn!r}")
    alphas = np.linspace(-0.5, 1.5, 100) if alphas is None else np.asarray(alphas, dtype=np.float64).reshape(-1)
    if include_endpoints:
        alphas = np.union1d(alphas, [0., 1.])
    if not len(alphas):
        raise ValueError('interpolate_losses: no alphas to evaluate')
    metrics = list(learn.metrics) if metrics is None else check_metrics(metrics)
    w1, w2 = _resolve_weights(learn, w1, 'w1'), _resolve_weights(learn, w2, 'w2')
    model, dev = learn.model, learn.device
    state = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}  # aliases of the model's tensors
    for name, w in (('w1', w1), ('w2', w2)):
        missing, extra = [k for k in state if k not in w], [k for k in w if k not in state]
        bad = [f'{k}: {tuple(w[k].shape)} vs model {tuple(v.shape)}' for k, v in state.items()
               if k in w and tuple(w[k].shape) != tuple(v.shape)]
        if missing or extra or bad:
            raise ValueError(f'interpolate_losses: {name} does not match the model ({type(model).__name__}): '
                             f'missing {missing[:5]}, unexpected {extra[:5]}, shapes {bad[:5]}')
    bns = _bn_layers(model)
    bn_stats = {id(t) for m in bns for t in (m.running_mean, m.running_var)}
    mix, fixed = [], []  # (model tensor, w2, w1) pairs to lerp; (model tensor, value) to set once
    for k, t in state.items():
        if not t.is_floating_point():
            fixed.append((t, w1[k]))
        elif id(t) in bn_stats and bn != 'interpolate':
            fixed.append((t, w1[k]))  # 'keep' uses them as they are; 'recompute' overwrites them per alpha
        else:
            mix.append((t, w2[k].to(t.device, t.dtype), w1[k].to(t.device, t.dtype)))
    targets, starts, ends = [m[0] for m in mix], [m[1] for m in mix], [m[2] for m in mix]

    loaders = _loaders(learn, dls)
    backup = {k: v.clone() for k, v in state.items()}
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == 'cuda' else []
    cl = getattr(learn, 'channels_last', False)
    try:
        with torch.random.fork_rng(devices=cuda):
            batches = {k: _device_batches(dl, dev, n_batches, cl) for k, dl in loaders.items()}
            if bn == 'recompute' and bns:
                bn_batches = batches.get('train') or _device_batches(learn.data.train_dl, dev, n_batches, cl)
            for k, b in batches.items():
                if not b:
                    raise ValueError(f'interpolate_losses: the {k} loader yielded no batches')
            values = _sweep(learn, model, alphas, batches, metrics, targets, starts, ends, fixed,
                            bns if bn == 'recompute' else [], bn_batches if bn == 'recompute' and bns else None)
    finally:
        with torch.no_grad():
            for k, t in state.items():
                t.copy_(backup[k])
        for m, mom in momenta:
            m.momentum = mom
        for m, t in modes:
            m.training = t
    return InterpolationResult(alphas, ['loss', *map(metric_name, metrics)], values, bn, n_batches)


def _sweep(learn, model, alphas, batches, metrics, targets, starts, ends, fixed, bns, bn_batches):
    dev, n_cols = learn.device, 1 + len(metrics)
    acc = torch.zeros(len(alphas), len(batches), n_cols, device=dev, dtype=torch.float32)  # read once at the end
    bs = {k: [float(len(y)) for _, y in b] for k, b in batches.items()}
    tot = {k: sum(v) for k, v in bs.items()}
    loss_func, bf16 = learn.loss_func, getattr(learn, 'bf16', False)
    use_foreach = len({(t.device, t.dtype) for t in targets}) <= 1
    with torch.no_grad():
        for t, v in fixed:
            t.copy_(v)
    for bn in bns:
        bn.momentum = None
    for i, a in enumerate(alphas):
        a = float(a)
        with torch.no_grad():
            if use_foreach and targets:
                torch._foreach_copy_(targets, starts)
                torch._foreach_lerp_(targets, ends, a)  # lerp is exact at a=0 (w2) and a=1 (w1)
            else:
                for t, s, e in zip(targets, starts, ends):
                    torch.lerp(s, e, a, out=t)
            if bns:
                for m in bns:
                    m.reset_running_stats()
                model.train()
                for xb, _ in bn_batches:
                    _forward(model, xb, bf16, dev)
        model.eval()
        with torch.inference_mode():
            for j, (k, b) in enumerate(batches.items()):
                row = acc[i, j]
                for (xb, yb), n in zip(b, bs[k]):
                    pred = _forward(model, xb, bf16, dev)
                    if bf16:
                        with torch.autocast(dev.type, dtype=torch.bfloat16):
                            loss = loss_func(pred, yb)
                    else:
                        loss = loss_func(pred, yb)
                    vals = [loss, *[m(pred, yb) for m in metrics]]
                    row += torch.stack([torch.as_tensor(v, device=dev).float().reshape(()) for v in vals]) * n
                row /= tot[k]
    out = acc.cpu().numpy().astype(np.float64)  # the one host sync of the sweep
    return {k: out[:, j] for j, k in enumerate(batches)}


def _forward(model, xb, bf16, dev):
    if bf16:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            return model(*xb)
    return model(*xb)
