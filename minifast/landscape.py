"""Loss along the line between two weight snapshots (Smith's interpolation plots), barriers, 2-D loss surfaces,
weight averaging (SWA-style), BN recompute."""
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch
from torch import nn

from .accel import autocast
from .callbacks.recorder import new_figure
from .checkpoint import load_state
from .checks import check_metrics, is_torchmetric, metric_name
from .metrics import batch_sums
from .optim import NO_WD_TYPES
from .state import preserved

__all__ = ['interpolate_losses', 'InterpolationResult', 'Barrier', 'barrier', 'plot_interpolation',
           'recompute_bn', 'loss_surface', 'SurfaceResult', 'plot_surface', 'filter_normalized_direction',
           'average_weights', 'evaluate_weights']

BN_MODES = ('recompute', 'interpolate', 'keep')
RESTORED = ('weights', 'buffers', 'modes', 'momenta', 'rng')  # what an analysis puts back (state.Snapshot's parts)


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

    Train-mode passes advance the global RNG (dropout, a shuffling loader); the analysis functions restore it,
    a direct call that completes does not. A call that fails or is interrupted (KeyboardInterrupt) changes
    nothing: every buffer of the model (half-estimated statistics included) and the RNG state are put back.
    """
    bns = _bn_layers(model)
    if not bns:
        return model
    # momenta and modes always come back; the buffers and the RNG only when the passes did not complete
    with preserved(model, ('buffers', 'momenta', 'modes', 'rng')) as snap:
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
        snap.discard(('buffers', 'rng'))  # done: the new statistics stay, and the RNG as the passes left it
    return model


@dataclass
class Barrier:
    """Barrier on the segment alpha in [0, 1]. `height`: max loss there minus the mean of the two endpoint losses
    (the issue's definition). `excess`: the largest rise above the straight line between the endpoint losses; it is
    0 on a monotone or convex path, so `same_basin` is decided by it, not by `height` (which is at least half the
    endpoint gap even with no bump at all)."""
    height: float
    same_basin: bool
    loss_w1: float      # alpha = 1
    loss_w2: float      # alpha = 0
    max_loss: float
    alpha_at_max: float
    excess: float = 0.


def barrier(result, dl='valid', rtol=1e-2, atol=0.):
    """Barrier between the two endpoints of `result` on dataset `dl`; `same_basin` when the excess over the straight
    line between the endpoint losses is <= atol + rtol * |mean endpoint loss|. A non-finite loss on the segment
    counts as an infinite barrier."""
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
        return Barrier(math.inf, False, ends[1.], ends[0.], float(seg_loss[bad]), float(seg_a[bad]), math.inf)
    i = int(np.argmax(seg_loss))
    height = float(seg_loss[i]) - mean_end
    excess = float(np.max(seg_loss - (seg_a * ends[1.] + (1 - seg_a) * ends[0.])))
    same = bool(np.isfinite(mean_end) and excess <= atol + rtol * abs(mean_end))
    return Barrier(height, same, ends[1.], ends[0.], float(seg_loss[i]), float(seg_a[i]), max(excess, 0.))


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

    def summary(self, rtol=1e-2, atol=0.):
        """Text for a notebook: per dataset, the lowest loss and its alpha, and the barrier between w1 and w2."""
        lines = [repr(self)]
        for dl in self.dls:
            loss = self.loss(dl)
            fin = np.isfinite(loss)
            if not fin.any():
                lines.append(f'{dl}: no finite loss')
                continue
            i = int(np.flatnonzero(fin)[np.argmin(loss[fin])])
            line = f'{dl}: min loss {loss[i]:.4g} at alpha={self.alphas[i]:.3g}'
            try:
                b = self.barrier(dl, rtol, atol)
            except ValueError:
                lines.append(line + '; barrier: alpha=0 and 1 not evaluated')
                continue
            where = f'max loss {b.max_loss:.4g} at alpha={b.alpha_at_max:.3g}, w1 {b.loss_w1:.4g}, w2 {b.loss_w2:.4g}'
            lines.append(f'{line}; barrier height {b.height:.4g} ({where}): '
                         f'{"same basin" if b.same_basin else "different basins"}')
        return '\n'.join(lines)

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
    for e in (0., 1.):
        ax.axvline(e, color='0.6', ls=':', lw=1)
    # the endpoints' names as ticks of a top axis: a title set later is placed above them, not over them
    top = ax.secondary_xaxis('top')
    top.set_xticks([0., 1.], ['w2', 'w1'])
    if log:
        ax.set_yscale('log')
    ax.set_xlabel('alpha (weights = alpha * w1 + (1 - alpha) * w2)')
    ax.set_ylabel('Loss')
    ax.legend()
    return fig


def _endpoint(w, t):
    """`w` on t's device and dtype, as a tensor that does not share storage with t: an endpoint given as the live
    model (or its state_dict()) would otherwise be overwritten by the first mix."""
    v = w.to(t.device, t.dtype)
    return v.clone() if v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() else v


def _resolve_weights(learn, w, name, fn='interpolate_losses'):
    if isinstance(w, Integral) and not isinstance(w, bool):  # numpy integers too (an array of epochs)
        snaps = getattr(learn, 'snapshots', None)
        if snaps is None or w not in snaps:
            have = sorted(snaps) if snaps else []
            hint = '' if learn is not None else '; epoch numbers need learn= (they index learn.snapshots)'
            raise KeyError(f'{fn}: {name}={w} names no snapshot (learn.snapshots has epochs {have}){hint}')
        return snaps[w]
    if isinstance(w, nn.Module):
        return w.state_dict()
    if isinstance(w, (str, os.PathLike)):  # a WeightSnapshots file; read weights-only, as load_state always does
        return load_state(w)
    if not isinstance(w, Mapping):  # else a str or list is taken for its keys and the error lists characters
        raise TypeError(f'{fn}: {name} must be a state dict, a file, an epoch of learn.snapshots or a model, '
                        f'got {type(w).__name__}')
    return w


def _loaders(learn, dls, fn='interpolate_losses'):
    items = dls.items() if isinstance(dls, dict) else [(d, None) for d in ([dls] if isinstance(dls, str) else dls)]
    out = {}
    for name, dl in items:
        if dl is None:
            if name not in ('train', 'valid'):
                raise ValueError(f"{fn}: dls names 'train' or 'valid' (or give {{name: loader}}), "
                                 f"got {name!r}")
            dl = getattr(learn.data, f'{name}_dl')
            if dl is None:
                raise ValueError(f'{fn}: this learner has no {name} set (data.{name}_dl is None)')
        out[name] = dl
    return out


def interpolate_losses(learn, w1, w2, alphas=None, dls=('valid', 'train'), bn='recompute', n_batches=None,
                       metrics=None, include_endpoints=True):
    """Loss and metrics of the weights alpha * w1 + (1 - alpha) * w2 for each alpha, on each dataset.

    Args:
        learn: the Learner whose model, loss_func, metrics, device and data are used.
        w1, w2: state dicts (e.g. `learn.snapshots[5]`), epochs of `learn.snapshots`, files (WeightSnapshots'
            snapshot_5.pth, read with `load_state`), or models.
        alphas: default np.linspace(-0.5, 1.5, 100); alpha=1 gives w1 and alpha=0 gives w2 exactly.
        dls: dataset names ('valid', 'train') or {name: loader}.
        bn: BatchNorm running statistics at each alpha. 'recompute' (default, correct: interpolated weights with
            stale statistics give wrong losses) resets them and re-estimates them by train-mode forward passes over
            the training batches used, with cumulative averaging (as swa_utils.update_bn); 'interpolate' mixes the
            endpoints' statistics like the weights; 'keep' uses w1's.
        n_batches: evaluate (and recompute BN on) only the first n_batches batches of each loader. The batches
            used are drawn once and kept on the learner's device for the whole sweep (so every alpha sees the
            same ones): with n_batches=None that is the whole dataset, fine for CIFAR, too much for large images —
            give n_batches there.
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
    fn = 'interpolate_losses'
    if bn not in BN_MODES:
        raise ValueError(f"interpolate_losses: bn must be one of {', '.join(map(repr, BN_MODES))}, got {bn!r}")
    alphas = _alphas(alphas, include_endpoints)
    metrics = _batch_metrics(learn, metrics, fn)
    w1, w2 = _resolve_weights(learn, w1, 'w1'), _resolve_weights(learn, w2, 'w2')
    model = learn.model
    state = _model_tensors(model)
    for name, w in (('w1', w1), ('w2', w2)):
        _check_matches(state, w, name, model, fn)
    _warn_if_same(state, w1, w2)
    fixed, set_alpha = _lerp_points(model, state, w1, w2, alphas, bn)
    values = _analyse(learn, _loaders(learn, dls), len(alphas), set_alpha, metrics, fixed, bn == 'recompute',
                      n_batches, fn)
    return InterpolationResult(alphas, ['loss', *map(metric_name, metrics)], values, bn, n_batches)


def _alphas(alphas, include_endpoints):
    """The alphas to evaluate (see `interpolate_losses`), checked: finite, and at least one."""
    alphas = np.linspace(-0.5, 1.5, 100) if alphas is None else np.asarray(alphas, dtype=np.float64).reshape(-1)
    if not np.isfinite(alphas).all():
        raise ValueError(f'interpolate_losses: alphas must be finite numbers, got {alphas[~np.isfinite(alphas)]} '
                         f'among them')
    if include_endpoints:
        alphas = np.union1d(alphas, [0., 1.])
    if not len(alphas):
        raise ValueError('interpolate_losses: no alphas to evaluate')
    return alphas


def _warn_if_same(state, w1, w2):
    if all(torch.equal(w1[k], w2[k].to(w1[k].device)) for k in state):
        # e.g. snapshots kept as `v.cpu()` of the live state dict (seed 004's GetWeights) alias the model on a CPU
        # run: every alpha then gives the same loss, which looks like a result
        warnings.warn('interpolate_losses: w1 and w2 are the same weights, so every alpha gives the same loss; '
                      'keep copies for snapshots (WeightSnapshots, or v.detach().clone() of each state-dict value), '
                      'not references to the live model')


def _lerp_points(model, state, w1, w2, alphas, bn):
    """(fixed, set_alpha): the (model tensor, value) pairs to set once, and `set_alpha(i)`, which writes the
    weights alphas[i] * w1 + (1 - alphas[i]) * w2 into the model's own tensors."""
    bn_stats = _bn_stat_keys(model, state)  # by key: the detached aliases in `state` are new tensor objects
    mix, fixed = [], []  # (model tensor, w2, w1) pairs to lerp; (model tensor, value) to set once
    for k, t in _untied(state).items():
        if not t.is_floating_point():
            fixed.append((t, w1[k]))
        elif k in bn_stats and bn != 'interpolate':
            fixed.append((t, w1[k]))  # 'keep' uses them as they are; 'recompute' overwrites them per alpha
        else:
            mix.append((t, _endpoint(w2[k], t), _endpoint(w1[k], t)))
    targets, starts, ends = [m[0] for m in mix], [m[1] for m in mix], [m[2] for m in mix]
    use_foreach = len({(t.device, t.dtype) for t in targets}) <= 1

    def set_alpha(i):
        a = float(alphas[i])
        if use_foreach and targets:
            torch._foreach_copy_(targets, starts)
            torch._foreach_lerp_(targets, ends, a)  # lerp is exact at a=0 (w2) and a=1 (w1)
        else:
            for t, s, e in zip(targets, starts, ends):
                torch.lerp(s, e, a, out=t)
    return fixed, set_alpha


def _model_tensors(model):
    """{key: tensor} aliasing the model's own parameters and buffers (writing into them changes the model)."""
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}


def _untied(state):
    """`state` with each model tensor once: a Parameter shared by two modules (tied weights) is listed under both
    keys, and mixing it in place once per key would move it twice."""
    seen, out = set(), {}
    for k, t in state.items():
        ident = (t.data_ptr(), t.shape, t.dtype)
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[k] = t
    return out


def _check_matches(state, w, name, model, fn):
    missing, extra = [k for k in state if k not in w], [k for k in w if k not in state]
    bad = [f'{k}: {tuple(w[k].shape)} vs model {tuple(v.shape)}' for k, v in state.items()
           if k in w and tuple(w[k].shape) != tuple(v.shape)]
    if missing or extra or bad:
        raise ValueError(f'{fn}: {name} does not match the model ({type(model).__name__}): '
                         f'missing {missing[:5]}, unexpected {extra[:5]}, shapes {bad[:5]}')


def _batch_metrics(learn, metrics, who):
    """The metrics a sweep can compute: functions of (pred, target), averaged per batch as validate averages them.
    torchmetrics objects accumulate state over a whole pass, which a sweep over many weights in one pass of the data
    does not give them: given, they are refused; taken from learn.metrics, they are left out."""
    if metrics is None:
        return [m for m in learn.metrics if not is_torchmetric(m)]
    metrics = check_metrics(metrics)
    stateful = [metric_name(m) for m in metrics if is_torchmetric(m)]
    if stateful:
        raise TypeError(f'{who}: torchmetrics metrics ({", ".join(stateful)}) keep one state per validation pass, '
                        f'and a sweep evaluates many weights per pass; give metric functions (accuracy, ...)')
    return metrics


def _analyse(learn, loaders, n_points, set_point, metrics, fixed, recompute, n_batches, fn):
    """Draw the batches of `loaders` and `_sweep` the points (BatchNorm statistics re-estimated at each when
    `recompute`), then put back the model's weights, buffers, BatchNorm momenta and every module's train/eval mode
    and the global RNG state (`RESTORED`, with `state.preserved`), also on an exception or KeyboardInterrupt (a
    Ctrl-C during the restore itself is held back until it is done)."""
    model = learn.model
    bns = _bn_layers(model) if recompute else []
    with preserved(learn, RESTORED):
        batches, bn_batches = _draw_batches(learn, loaders, n_batches, bool(bns), fn)
        return _sweep(learn, model, n_points, set_point, batches, metrics, fixed, bns, bn_batches)


def _draw_batches(learn, loaders, n_batches, need_bn, fn):
    """({name: batches on learn.device}, training batches for a BN recompute or None), each loader drawn once."""
    dev, cl = learn.device, getattr(learn, 'channels_last', False)
    batches = {k: _device_batches(dl, dev, n_batches, cl) for k, dl in loaders.items()}
    bn_batches = None
    if need_bn:
        if 'train' not in batches and learn.data.train_dl is None:
            raise ValueError(f'{fn}: recomputing BatchNorm statistics needs training batches; this learner has no '
                             f'training set (data.train_dl is None)')
        bn_batches = batches.get('train') or _device_batches(learn.data.train_dl, dev, n_batches, cl)
        if not bn_batches:
            raise ValueError(f'{fn}: the train loader yielded no batches to recompute BatchNorm statistics')
    for k, b in batches.items():
        if not b:
            raise ValueError(f'{fn}: the {k} loader yielded no batches')
    return batches, bn_batches


def _sweep(learn, model, n_points, set_point, batches, metrics, fixed, bns, bn_batches):
    """Loss and metrics per point and dataset: `set_point(i)` writes point i's weights into the model (under
    no_grad), then BatchNorm statistics are re-estimated on `bn_batches` when `bns` is not empty. Each dataset is
    reduced as validate reduces it (`metrics.batch_sums`, divided on the device); the device is read once, at the
    end."""
    dev, n_cols = learn.device, 1 + len(metrics)
    acc = torch.zeros(n_points, len(batches), n_cols, device=dev, dtype=torch.float32)  # read once at the end
    # the batch sizes, on the device once for the whole sweep
    sizes = {k: torch.tensor([y.shape[0] for _, y in b], dtype=torch.float32, device=dev) for k, b in batches.items()}
    with torch.no_grad():
        for t, v in fixed:
            t.copy_(v)
    for bn in bns:
        bn.momentum = None
    for i in range(n_points):
        with torch.no_grad():
            set_point(i)
            if bns:
                for m in bns:
                    m.reset_running_stats()
                model.train()
                for xb, _ in bn_batches:
                    _forward(learn, model, xb)
        model.eval()
        with torch.inference_mode():
            for j, (k, b) in enumerate(batches.items()):
                t = batch_sums(_batch_values(learn, model, b, metrics), n_cols, dev, sizes=sizes[k])
                acc[i, j] = t[:n_cols] / t[n_cols]
    out = acc.cpu().numpy().astype(np.float64)  # the one host sync of the sweep
    return {k: out[:, j] for j, k in enumerate(batches)}


def _batch_values(learn, model, batches, metrics):
    """[(batch size, (loss, *metrics))] of the model in its current mode on each batch, as validate collects
    them."""
    rows = []
    for xb, yb in batches:
        pred = _forward(learn, model, xb)
        with autocast(learn):
            loss = learn.loss_func(pred, yb)
        rows.append((yb.shape[0], (loss, *[m(pred, yb) for m in metrics])))
    return rows


def _forward(learn, model, xb):
    with autocast(learn):  # the learner's bf16/fp16 autocast: evaluated as learn.validate does
        return model(*xb)


# ---- 2-D loss surfaces ---------------------------------------------------------------------------------------
def _filter_direction(model, weights, gen):
    direction = {}
    norm = {f'{name}.{p}' for name, m in model.named_modules() if isinstance(m, NO_WD_TYPES)
            for p, _ in m.named_parameters(recurse=False)}
    params = {k for k, _ in model.named_parameters()}
    for k, w in weights.items():
        if not w.is_floating_point():
            continue
        if k not in params or k in norm or w.ndim < 2:
            direction[k] = torch.zeros_like(w)  # biases, BatchNorm parameters and statistics: not moved
            continue
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        wf = w.detach().to('cpu', torch.float64)
        w_norm = wf.flatten(1).norm(dim=1).view(-1, *[1] * (w.ndim - 1))
        d_norm = d.flatten(1).norm(dim=1).view(-1, *[1] * (w.ndim - 1))
        direction[k] = (d * (w_norm / d_norm.clamp_min(1e-300))).to(w.device, w.dtype)
    return direction


def filter_normalized_direction(model, weights=None, seed=0):
    """A random direction {key: tensor} filter-normalised as in Li et al. 2018 ("Visualizing the loss landscape").

    Every weight with two or more dimensions outside normalisation layers (Linear, Conv, Embedding, attention
    projections...) gets a Gaussian direction whose every output filter (row along dim 0) is rescaled to the norm of
    that filter of `weights` (default: the model's own); biases, norm-layer parameters and buffers get zero.
    Drawn from a torch.Generator seeded with `seed`: the global RNG is not touched.
    """
    weights = model.state_dict() if weights is None else weights
    return _filter_direction(model, weights, torch.Generator().manual_seed(seed))


class SurfaceResult:
    """Loss and metrics on a grid from `loss_surface`: `values[dl][i, j]` holds (loss, *metrics) at the weights
    for coordinates (xs[i], ys[j]); `points` names the marked snapshots by their coordinates."""

    def __init__(self, xs, ys, columns, values, points, mode, bn, n_batches):
        self.xs, self.ys, self.columns, self.values = xs, ys, columns, values
        self.points, self.mode, self.bn, self.n_batches = points, mode, bn, n_batches

    @property
    def dls(self):
        """Names of the evaluated datasets."""
        return list(self.values)

    def _dl(self, dl):
        dl = self.dls[0] if dl is None else dl
        if dl not in self.values:
            raise KeyError(f'no dataset {dl!r} in this result (it has {", ".join(map(repr, self.values))})')
        return self.values[dl]

    def loss(self, dl=None):
        """(len(xs), len(ys)) array of losses on dataset `dl` (default: the first evaluated)."""
        return self._dl(dl)[..., 0]

    def metric(self, name, dl=None):
        """(len(xs), len(ys)) array of metric `name` on dataset `dl`."""
        if name not in self.columns:
            raise KeyError(f'no column {name!r} (columns: {", ".join(self.columns)})')
        return self._dl(dl)[..., self.columns.index(name)]

    def loss_at(self, x, y, dl=None):
        """Loss at the grid point with coordinates exactly (x, y), e.g. a snapshot's (1, 0)."""
        i, j = np.flatnonzero(self.xs == x), np.flatnonzero(self.ys == y)
        if not len(i) or not len(j):
            raise KeyError(f'({x:g}, {y:g}) is not a grid point (x in {self.xs.min():g}..{self.xs.max():g}, '
                           f'y in {self.ys.min():g}..{self.ys.max():g}, {len(self.xs)}x{len(self.ys)})')
        return float(self.loss(dl)[i[0], j[0]])

    def summary(self, dl=None):
        """Text for a notebook: the loss at each marked point, the lowest loss and where, non-finite points."""
        loss, lines = self.loss(dl), [repr(self)]
        lines += [f'{name} at ({x:g}, {y:g}): loss {self.loss_at(x, y, dl):.4g}'
                  for name, (x, y) in self.points.items()]
        fin = np.isfinite(loss)
        if fin.any():
            i, j = np.unravel_index(np.where(fin, loss, np.inf).argmin(), loss.shape)
            lines.append(f'min loss {loss[i, j]:.4g} at ({self.xs[i]:.3g}, {self.ys[j]:.3g})')
        if not fin.all():
            lines.append(f'{int((~fin).sum())} of {loss.size} grid points have a non-finite loss')
        return '\n'.join(lines)

    def plot(self, ax=None, levels=30, log=False, dl=None):
        """See `plot_surface`."""
        return plot_surface(self, ax, levels, log, dl)

    def __repr__(self):
        return (f'SurfaceResult({len(self.xs)}x{len(self.ys)} grid, x in [{self.xs.min():g}, {self.xs.max():g}], '
                f'y in [{self.ys.min():g}, {self.ys.max():g}], {self.mode}, datasets {self.dls}, bn={self.bn!r})')


def _axis(span, steps, must, name):
    lo, hi = span
    a = np.linspace(float(lo), float(hi), int(steps))
    a = np.union1d(a, must)  # the snapshots' own coordinates are evaluated exactly
    if not len(a):
        raise ValueError(f'loss_surface: no {name} coordinates (span={span}, steps={steps})')
    return a


def loss_surface(learn, center, directions=None, dir1=None, dir2=None, span=(-1, 1), steps=21, dl='valid',
                 bn='recompute', n_batches=None, seed=0, metrics=None):
    """Loss on a 2-D grid of weights in a plane: through three snapshots, or around one along two directions.

    Args:
        learn: the Learner whose model, loss_func, metrics, device and data are used.
        center: w0, a state dict, an epoch of `learn.snapshots`, a file, or a model; the point (0, 0).
        directions: with dir1/dir2 not given: None or 'filter' (default) draws two filter-normalised random
            directions (Li et al. 2018, see `filter_normalized_direction`; biases and BatchNorm get zero), or a
            pair (d1, d2) of direction state dicts; the weights at (x, y) are center + x * d1 + y * d2.
        dir1, dir2: the plane through three snapshots w0=center, w1=dir1, w2=dir2 (state dicts, epochs or
            models): the weights at (x, y) are (1 - x - y) * w0 + x * w1 + y * w2, so w1 sits at (1, 0) and w2 at
            (0, 1) exactly (the directions are w1 - w0 and w2 - w0; the axes are not orthogonalised).
        span: (lo, hi) of both coordinates, or ((xlo, xhi), (ylo, yhi)).
        steps: grid points per axis, or (x steps, y steps); the snapshots' coordinates (0 and, through three
            snapshots, 1) are added to each axis.
        dl: 'valid', 'train', a DataLoader, or {name: loader} for several datasets.
        bn: BatchNorm running statistics at each point: 'recompute' (default, correct away from the snapshots)
            re-estimates them on the training batches as `interpolate_losses` does; 'interpolate' mixes the
            snapshots' statistics like the weights (exact at the snapshots: (0, 0) reproduces center's loss, (1, 0)
            and (0, 1) w1's and w2's); 'keep' uses center's (exact at (0, 0)). Random directions leave the
            statistics alone, so there 'interpolate' equals 'keep'.
        n_batches: evaluate (and recompute BN on) only the first n_batches batches of each loader. The batches
            used are drawn once and kept on the learner's device for the whole sweep (so every alpha sees the
            same ones): with n_batches=None that is the whole dataset, fine for CIFAR, too much for large images —
            give n_batches there.
        seed: seed of the random directions (a private generator; the global RNG is left as it was).
        metrics: default learn.metrics.

    Weights are written in place into the model's tensors at each grid point (no copy of the model); integer
    buffers take center's values. The evaluation, BN recompute and restore are `interpolate_losses`'s: the model's
    weights, buffers, BN momenta, module modes and the RNG state are restored afterwards, also on an exception.
    Non-finite losses are recorded as NaN/inf. Returns a SurfaceResult (`.loss()`, `.summary()`, `.plot()`).
    """
    fn = 'loss_surface'
    if bn not in BN_MODES:
        raise ValueError(f"{fn}: bn must be one of {', '.join(map(repr, BN_MODES))}, got {bn!r}")
    model = learn.model
    state = _model_tensors(model)
    w0 = _resolve_weights(learn, center, 'center', fn)
    _check_matches(state, w0, 'center', model, fn)
    mode, points, must, others = _surface_plane(learn, model, w0, directions, dir1, dir2, seed, fn)
    plane = mode == 'plane through three snapshots'
    _check_directions(model, state, others, plane, fn)
    (xlo, xhi), (ylo, yhi) = span if np.ndim(span[0]) else (span, span)
    nx, ny = (steps, steps) if np.ndim(steps) == 0 else steps
    xs, ys = _axis((xlo, xhi), nx, must, 'x'), _axis((ylo, yhi), ny, must, 'y')
    metrics = _batch_metrics(learn, metrics, fn)
    fixed, set_point = _plane_points(model, state, w0, others, bn, plane, xs, ys)
    loaders = _loaders(learn, dl if isinstance(dl, (str, dict, list, tuple)) else {'dl': dl}, fn)
    values = _analyse(learn, loaders, len(xs) * len(ys), set_point, metrics, fixed, bn == 'recompute', n_batches,
                      fn)
    values = {k: v.reshape(len(xs), len(ys), -1) for k, v in values.items()}
    return SurfaceResult(xs, ys, ['loss', *map(metric_name, metrics)], values, points, mode, bn, n_batches)


def _surface_plane(learn, model, w0, directions, dir1, dir2, seed, fn):
    """(mode, {name: marked point}, the coordinates each axis must hold, (d1, d2)) of `loss_surface`'s plane:
    through the snapshots w0, dir1 and dir2, or around w0 along `directions`."""
    if dir1 is not None or dir2 is not None:
        if dir1 is None or dir2 is None or directions is not None:
            raise ValueError(f'{fn}: a plane through three snapshots needs both dir1 and dir2 and no directions= '
                             f'(got dir1 {"set" if dir1 is not None else "None"}, dir2 '
                             f'{"set" if dir2 is not None else "None"}, directions={directions!r:.40})')
        w1, w2 = _resolve_weights(learn, dir1, 'dir1', fn), _resolve_weights(learn, dir2, 'dir2', fn)
        return 'plane through three snapshots', {'w0': (0., 0.), 'w1': (1., 0.), 'w2': (0., 1.)}, [0., 1.], (w1, w2)
    if directions is None or (isinstance(directions, str) and directions == 'filter'):
        gen = torch.Generator().manual_seed(seed)
        others = (_filter_direction(model, w0, gen), _filter_direction(model, w0, gen))
        return 'filter-normalised random directions', {'center': (0., 0.)}, [0.], others
    if isinstance(directions, (tuple, list)) and len(directions) == 2:
        return 'given directions', {'center': (0., 0.)}, [0.], tuple(directions)
    raise ValueError(f"{fn}: directions must be None, 'filter' or a pair of direction state dicts, "
                     f"got {directions!r:.60}")


def _check_directions(model, state, others, plane, fn):
    """The plane's two other snapshots match the model; two directions need only its floating-point entries."""
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    for name, w in zip(('dir1', 'dir2'), others):
        if plane:
            _check_matches(state, w, name, model, fn)
        else:  # a direction needs only the floating-point entries
            _check_matches(floats, {k: v for k, v in w.items() if k in floats or k not in state}, name, model, fn)


def _plane_points(model, state, w0, others, bn, plane, xs, ys):
    """(fixed, set_point): the (model tensor, value) pairs to set once, and `set_point(i)`, which writes the weights
    at grid point i (x = xs[i // len(ys)], y = ys[i % len(ys)]) into the model's own tensors."""
    bn_stats = _bn_stat_keys(model, state)
    mix, fixed = [], []
    for k, t in _untied(state).items():
        if not t.is_floating_point() or (k in bn_stats and bn != 'interpolate'):
            fixed.append((t, w0[k]))  # 'recompute' overwrites the statistics per point
        else:
            mix.append((t, *(_endpoint(w[k], t) for w in (w0, *others))))
    targets, bases, d1s, d2s = ([m[i] for m in mix] for i in range(4))
    use_foreach = len({(t.device, t.dtype) for t in targets}) <= 1

    def set_point(i):
        x, y = float(xs[i // len(ys)]), float(ys[i % len(ys)])
        c0 = 1. - x - y if plane else 1.  # barycentric through three points: exact at each of them
        if use_foreach and targets:
            torch._foreach_copy_(targets, bases)
            if c0 != 1.:
                torch._foreach_mul_(targets, c0)
            torch._foreach_add_(targets, d1s, alpha=x)
            torch._foreach_add_(targets, d2s, alpha=y)
        else:
            for t, b, d1, d2 in zip(targets, bases, d1s, d2s):
                t.copy_(b).mul_(c0).add_(d1, alpha=x).add_(d2, alpha=y)
    return fixed, set_point


def plot_surface(result, ax=None, levels=30, log=False, dl=None):
    """Contour plot of `result`'s loss over the plane (dataset `dl`, default the first), the snapshots marked and
    non-finite grid points crossed; `levels` is a count or a sequence, `log` spaces a count of levels
    geometrically. Returns the Figure."""
    fig, (ax,) = new_figure(ax)
    z = result.loss(dl).T  # contour wants rows along y
    fin = np.isfinite(z)
    zm = np.ma.masked_invalid(z)
    if fin.any() and np.ndim(levels) == 0 and zm.min() < zm.max():
        lo, hi = float(zm.min()), float(zm.max())
        if log:
            if lo <= 0:
                raise ValueError(f'plot_surface: log levels need positive losses (min loss {lo:g})')
            levels = np.geomspace(lo, hi, int(levels))
        else:
            levels = np.linspace(lo, hi, int(levels))
    if fin.any():
        cs = ax.contour(result.xs, result.ys, zm, levels=levels, cmap='viridis')
        fig.colorbar(cs, ax=ax, label=f'{dl or result.dls[0]} loss')
    if not fin.all():
        yi, xi = np.nonzero(~fin)
        ax.plot(result.xs[xi], result.ys[yi], 'x', color='0.5', markersize=4, label='non-finite loss')
    for name, (x, y) in result.points.items():
        ax.plot([x], [y], 'o', color='r', markersize=6)
        ax.annotate(name, (x, y), textcoords='offset points', xytext=(4, 4))
    ax.set_xlabel('x (dir1)')
    ax.set_ylabel('y (dir2)')
    ax.set_title(result.mode)
    return fig


# ---- weight averaging -----------------------------------------------------------------------------------------
def _bn_stat_keys(model, keys):
    if model is None:
        return {k for k in keys if k.rsplit('.', 1)[-1] in ('running_mean', 'running_var')}
    bns = set(_bn_layers(model))
    return {f'{n}.{s}' if n else s for n, m in model.named_modules() if m in bns
            for s in ('running_mean', 'running_var')}


def average_weights(snapshots, learn=None, bn='recompute', n_batches=None):
    """SWA-style average of several state dicts; returns a new state dict on the CPU (the model is left alone).

    `snapshots`: a sequence of state dicts, epochs of `learn.snapshots` or models, or a dict {epoch: state dict}
    (e.g. `learn.snapshots`, averaged in epoch order). Floating-point tensors are averaged (a running mean in
    float64, cast back: identical snapshots average to themselves exactly); integer buffers
    (num_batches_tracked) are the last snapshot's. `bn`: 'recompute' (default, needs `learn`) re-estimates the
    BatchNorm running statistics of the averaged weights by train-mode passes over the first `n_batches` training
    batches (`recompute_bn`; the model is restored afterwards); 'interpolate' averages the statistics like the
    weights; 'keep' takes the last snapshot's.

    To evaluate it: `evaluate_weights(learn, sd)` (restores the model), or `learn.model.load_state_dict(sd)` then
    `learn.validate()`.
    """
    fn = 'average_weights'
    if bn not in BN_MODES:
        raise ValueError(f"{fn}: bn must be one of {', '.join(map(repr, BN_MODES))}, got {bn!r}")
    if isinstance(snapshots, dict) and snapshots and all(isinstance(k, int) for k in snapshots):
        snapshots = [snapshots[k] for k in sorted(snapshots)]
    sds = [_resolve_weights(learn, w, f'snapshots[{i}]', fn) for i, w in enumerate(snapshots)]
    if not sds:
        raise ValueError(f'{fn}: no snapshots to average')
    ref = sds[-1]
    for i, sd in enumerate(sds):
        if learn is not None:
            _check_matches(_model_tensors(learn.model), sd, f'snapshots[{i}]', learn.model, fn)
        else:
            _check_matches(ref, sd, f'snapshots[{i}]', nn.Module(), fn + ' (against the last snapshot)')
    model = None if learn is None else learn.model
    stats = _bn_stat_keys(model, ref)
    if bn == 'recompute' and learn is None and stats:
        warnings.warn(f'{fn}: bn="recompute" needs a learner to run training batches; without one the BatchNorm '
                      f'statistics are averaged (pass learn= to recompute them)', stacklevel=2)
    avg = {}
    for k, last in ref.items():
        if not last.is_floating_point() or (bn == 'keep' and k in stats):
            avg[k] = last.detach().to('cpu', copy=True)
            continue
        acc = sds[0][k].detach().to('cpu', torch.float64, copy=True)
        for n, sd in enumerate(sds[1:], 2):
            acc += (sd[k].detach().to('cpu', torch.float64) - acc) / n
        avg[k] = acc.to(last.dtype)
    if bn == 'recompute' and learn is not None and _bn_layers(model):
        state = _model_tensors(model)
        with preserved(learn, RESTORED):
            with torch.no_grad():
                for k, t in state.items():
                    t.copy_(avg[k])
            _, bn_batches = _draw_batches(learn, {}, n_batches, True, fn)
            recompute_bn(model, bn_batches)
            for k in stats:
                avg[k] = state[k].to('cpu', copy=True)
    return avg


def evaluate_weights(learn, weights, dl='valid', bn='keep', n_batches=None, metrics=None):
    """{'loss': ..., '<metric>': ...} of `weights` (a state dict, epoch or model) on `dl` ('valid', 'train' or a
    loader), evaluated as `interpolate_losses` does; bn='recompute' re-estimates the BatchNorm statistics first.
    The model, its modes and the RNG state are restored afterwards."""
    fn = 'evaluate_weights'
    if bn not in ('keep', 'recompute'):
        raise ValueError(f"{fn}: bn must be 'keep' or 'recompute', got {bn!r}")
    w = _resolve_weights(learn, weights, 'weights', fn)
    model = learn.model
    state = _model_tensors(model)
    _check_matches(state, w, 'weights', model, fn)
    metrics = _batch_metrics(learn, metrics, fn)
    fixed = [(t, w[k]) for k, t in state.items()]
    name = dl if isinstance(dl, str) else 'dl'
    loaders = _loaders(learn, dl if isinstance(dl, str) else {'dl': dl}, fn)
    values = _analyse(learn, loaders, 1, lambda i: None, metrics, fixed, bn == 'recompute', n_batches, fn)
    return dict(zip(['loss', *map(metric_name, metrics)], map(float, values[name][0])))
