"""The Recorder: per-step and per-epoch history of a fit, and its plots."""
import textwrap
import time

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from ..checks import metric_name
from ..core import Callback
from ..distributed import all_reduce_
from ..optim import momentum_key
from .lr_finder import centred_smooth, curve_shape, ema_step, suggest_max_lr, suggestions

__all__ = ['Recorder', 'new_figure', 'ema_step']



def new_figure(ax=None, ncols=1, figsize=None):
    """(Figure, list of ncols axes): the given `ax` (one axes or a sequence of ncols) or a new figure.

    Under Jupyter's inline backend the new figure is released from pyplot so that returning it displays it once.
    """
    if ax is not None:
        axs = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
        if len(axs) != ncols:
            raise ValueError(f'this plot draws on {ncols} axes; ax= gave {len(axs)}')
        return axs[0].figure, axs
    fig, axs = plt.subplots(1, ncols, figsize=figsize or (6 * ncols, 4), squeeze=False)
    if 'inline' in matplotlib.get_backend():
        plt.close(fig)
    return fig, list(axs[0])


def _is_sweep(lrs):
    """Whether `lrs` are an LR range test's: at least 3, each higher than the one before."""
    return len(lrs) >= 3 and all(b > a for a, b in zip(lrs, lrs[1:]))


class Recorder(Callback):
    """History of the current fit: per step lr, momentum, raw and smoothed loss; per epoch losses, metrics, time.

    A step is an optimizer step: with GradientAccumulation its loss is the mean over its batches and `bs` counts the
    items of all of them.

    Per-step losses stay on the device until read (at epoch end, or when a property asks), so recording costs no
    host synchronisation. `smooth_loss` is the debiased exponential moving average (beta=0.98) of raw losses.

    In distributed training each rank records its own losses during an epoch (a progress bar shows rank 0's); at
    the end of the epoch's training they are averaged across ranks in one all_reduce, so the history (and `bs`, then
    the global batch size) is that of one process with the global batch.
    """
    order = 50

    def __init__(self, beta=0.98):
        self.beta = beta
        self.metrics_names = []
        self._reset()

    def _reset(self):
        self._pending, self._raw, self._smooth, self._mov = [], [], [], 0.
        self.bs, self.group_lrs, self.group_moms = [], [], []
        self.nb_batches, self.train_losses, self.val_losses, self.metrics, self.times = [], [], [], [], []

    # ---- recording -------------------------------------------------------------------------------------------
    def before_fit(self, learn):
        self._reset()
        self.metrics_names = [metric_name(m) for m in learn.metrics]
        self._pgs, self._mom_key = learn.opt.param_groups, momentum_key(learn.opt)
        self._world = learn.dist.world
        self._acc = learn.stepper.n_acc > 1  # gradient accumulation: a step's items are those of its batches

    def before_epoch(self, learn):
        self._t0, self._start = time.perf_counter(), len(self.bs)
        resumed = learn.resumed_epoch
        if resumed is not None:  # resuming mid-epoch: this epoch began before the checkpoint
            self._start, self._t0 = resumed['start'], self._t0 - resumed['elapsed']

    # ---- resume ----------------------------------------------------------------------------------------------
    _STATE = ('_raw', '_smooth', '_mov', 'bs', 'group_lrs', 'group_moms', 'nb_batches', 'train_losses', 'val_losses',
              'metrics', 'times', 'metrics_names')

    def state_dict(self):
        """The history as plain lists and floats (a checkpoint stores it); `epoch_start`/`epoch_elapsed` place a
        checkpoint written in the middle of an epoch."""
        self._flush()
        state = {k: list(v) if isinstance(v, list) else v for k, v in
                 ((k, getattr(self, k)) for k in self._STATE)}
        state['epoch_start'] = getattr(self, '_start', len(self.bs))
        state['epoch_elapsed'] = time.perf_counter() - self._t0 if hasattr(self, '_t0') else 0.
        return state

    def load_state_dict(self, state):
        """Restore a history from `state_dict()`."""
        missing = [k for k in self._STATE if k not in state]
        if missing:
            raise ValueError(f'Recorder.load_state_dict: the state lacks {missing}')
        self._pending = []
        for k in self._STATE:
            v = state[k]
            setattr(self, k, list(v) if isinstance(v, list) else v)

    def after_step(self, learn):  # runs every step: kept to a few appends
        self._pending.append(learn.loss.detach())
        self.bs.append(learn.stepper.step_bs if self._acc else len(learn.yb))
        pgs, key = self._pgs, self._mom_key
        self.group_lrs.append([g['lr'] for g in pgs])
        if key == 'betas':
            self.group_moms.append([g['betas'][0] for g in pgs])
        elif key is not None:
            self.group_moms.append([g[key] for g in pgs])

    def after_train(self, learn):
        if self._world > 1:  # every rank gets here after the same steps: a collective is safe here (not in _flush)
            self._reduce_epoch(learn)

    def _reduce_epoch(self, learn):
        """Replace this epoch's per-step losses by their average over the ranks (weighted by batch size) and the
        batch sizes by their sum, and recompute the smoothed losses from the epoch's start."""
        self._flush()
        s = self._start
        raw, bs = self._raw[s:], self.bs[s:]
        t = torch.tensor([[v * b for v, b in zip(raw, bs)], bs], dtype=torch.float64, device=learn.device)
        all_reduce_(t)
        total, bs = t.tolist()
        raw = [v / b for v, b in zip(total, bs)]
        self.bs[s:] = [int(b) for b in bs]
        # the average before the epoch, recovered from its debiased value
        mov = self._smooth[s - 1] * (1 - self.beta ** s) if s else 0.
        del self._raw[s:], self._smooth[s:]
        for n, v in enumerate(raw, s + 1):
            mov, smooth = ema_step(mov, v, self.beta, n)
            self._smooth.append(smooth)
        self._raw.extend(raw)
        self._mov = mov

    def after_epoch(self, learn):
        raw, bs = self.raw_losses[self._start:], self.bs[self._start:]
        self.nb_batches.append(len(raw))
        self.train_losses.append(float(np.average(raw, weights=bs)) if raw else float('nan'))
        m = learn.last_metrics
        self.val_losses.append(m[0] if m else None)
        self.metrics.append(list(m[1:]) if m else [])
        self.times.append(time.perf_counter() - self._t0)

    def _flush(self):
        if not self._pending:
            return
        vals = torch.stack([t.float() for t in self._pending]).tolist()  # the one host sync
        self._pending = []
        mov, n = self._mov, len(self._raw)
        for v in vals:
            n += 1
            mov, smooth = ema_step(mov, v, self.beta, n)
            self._smooth.append(smooth)
        self._mov = mov
        self._raw.extend(vals)

    # ---- reading ---------------------------------------------------------------------------------------------
    @property
    def raw_losses(self):
        """Training loss of every step, as floats."""
        self._flush()
        return self._raw

    @property
    def losses(self):
        """Smoothed training loss of every step (debiased EMA), as floats."""
        self._flush()
        return self._smooth

    @property
    def smooth_loss(self):
        """The latest smoothed loss, or None before the first step."""
        s = self.losses
        return s[-1] if s else None

    @property
    def lrs(self):
        """Learning rate of the last parameter group at every step."""
        return [g[-1] for g in self.group_lrs]

    @property
    def moms(self):
        """Momentum (beta1 for Adam-type optimizers) of the last parameter group at every step."""
        return [g[-1] for g in self.group_moms]

    @property
    def min_grad_lr(self):
        """fastai v1's: the lr where the smoothed loss of the recorded LR range test falls fastest (lr_find's 'steep'
        suggestion; None when the loss shows no clear descent). Read from the recorded sweep, so it is there after
        learn.lr_find() without plotting; an AttributeError when the history is not a sweep."""
        lrs = self.lrs
        if not _is_sweep(lrs):
            what = ('nothing is recorded' if not lrs else 'the recorded history is a fit, not an LR range test (its '
                    'lr does not rise at every step)')
            raise AttributeError(f'Recorder.min_grad_lr: {what}; run learn.lr_find() first')
        raw = self.raw_losses
        return suggestions(lrs, self.losses, raw_losses=raw, shape=curve_shape(lrs, raw))['steep']

    def _need(self, values, what):
        if not len(values):
            raise ValueError(f'Recorder.{what}: nothing recorded yet; run learn.fit(...) (or learn.lr_find()) first')

    # ---- plots -----------------------------------------------------------------------------------------------
    def plot(self, skip_start=10, skip_end=5, suggestion=False, ax=None):
        """Smoothed loss against learning rate (log scale): the LR range test plot; with `suggestion`, lr_find's
        suggestions are marked ('max_lr', the one for fit_one_cycle, as a vertical line over the lag-free smoothing
        it reads; 'steep', 'valley' and 'minimum' as points; computed as lr_find computes them, whatever part of the
        curve skip_start/skip_end leave on the plot), and lr_find's note, when the curve is not a clean descent, is
        written under it; for an LR range test it prints fastai v1's lines 'Min numerical gradient' (min_grad_lr)
        and 'Min loss divided by 10'. Returns the Figure."""
        lrs, losses = self.lrs, self.losses
        self._need(lrs, 'plot')
        if len(lrs) <= skip_start + skip_end:
            skip_start = skip_end = 0
        end = len(lrs) - skip_end
        own = ax is None
        fig, (ax,) = new_figure(ax, figsize=(6, 4.8) if suggestion else None)
        ax.plot(lrs[skip_start:end], losses[skip_start:end], label='smoothed loss (EMA 0.98)')
        if suggestion:
            # the values lr_find returned (and smith chose from): its own skips, not the plot's, or the marks would
            # differ from them on sweeps of other than 100 steps
            raw = self.raw_losses
            shape = curve_shape(lrs, raw)
            sug = suggestions(lrs, losses, raw_losses=raw, shape=shape)
            if shape is not None:  # what max_lr reads: the EMA above trails it by ~50 steps
                lo, hi = min(losses[skip_start:end]), max(losses[skip_start:end])
                sm = np.clip(centred_smooth(raw, shape.half)[skip_start:end], None, hi + (hi - lo) * 0.5)
                ax.scatter(lrs[skip_start:end], sm, s=5, color='0.55', label='loss, centred median (no lag)')
            if sug['max_lr'] is not None:
                ax.axvline(sug['max_lr'], color='C3', linestyle='--', label=f"max_lr: {sug['max_lr']:.2e}")
            for (name, lr), m in zip(((k, sug[k]) for k in ('steep', 'valley', 'minimum')), 'o^s'):
                if lr is not None:
                    y = float(np.interp(np.log10(lr), np.log10(lrs), losses))
                    ax.plot([lr], [y], m, markersize=8, label=f'{name}: {lr:.2e}')
            if _is_sweep(lrs):  # fastai v1's lines (min_grad_lr is the first)
                steep, low = sug['steep'], sug['minimum']
                print('Min numerical gradient: ' + ('none (the loss shows no clear descent)' if steep is None
                                                    else f'{steep:.2E}'))
                if low is not None:
                    print(f'Min loss divided by 10: {low:.2E}')
            note = suggest_max_lr(lrs, raw, shape)[1]
            if note:
                ax.annotate(textwrap.fill(f'Note: {note}', 90), xy=(0, -0.16), xycoords='axes fraction', va='top',
                            fontsize=8)
            ax.legend(fontsize=8)
        ax.set_xscale('log')
        ax.set_xlabel('Learning rate (log scale)')
        ax.set_ylabel('Training loss')
        ax.set_title('LR range test')
        if own:
            fig.tight_layout()
        return fig

    def plot_losses(self, skip_start=0, ax=None):
        """Smoothed training loss per step and validation loss per epoch. Returns the Figure."""
        losses = self.losses
        self._need(losses, 'plot_losses')
        fig, (ax,) = new_figure(ax)
        ax.plot(range(skip_start, len(losses)), losses[skip_start:], label='Train')
        ends = np.cumsum(self.nb_batches)
        val = [(x, v) for x, v in zip(ends, self.val_losses) if v is not None]
        if val:
            ax.plot(*zip(*val), marker='o', label='Validation')
        ax.set_xlabel('Batches processed')
        ax.set_ylabel('Loss')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a count: no tick at 2.5 batches
        ax.legend()
        return fig

    def plot_metrics(self, ax=None):
        """Each metric against epochs, one axes per metric. Returns the Figure."""
        self._need(self.nb_batches, 'plot_metrics')
        if not self.metrics_names:
            raise ValueError('Recorder.plot_metrics: no metrics were recorded; pass metrics=[...] to the Learner')
        self._need([m for m in self.metrics if m], 'plot_metrics')
        n = len(self.metrics_names)
        fig, axs = new_figure(ax, ncols=n, figsize=(5 * n, 4))
        epochs = [i for i, m in enumerate(self.metrics) if m]
        for i, (a, name) in enumerate(zip(axs, self.metrics_names)):
            a.plot(epochs, [self.metrics[e][i] for e in epochs], marker='o')
            a.set_xlabel('Epoch')
            a.set_ylabel(name)
            a.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no tick at epoch 0.5
        return fig

    def plot_lr(self, show_moms=False, ax=None):
        """Learning rate per step (and momentum beside it when show_moms). Returns the Figure."""
        lrs = self.lrs
        self._need(lrs, 'plot_lr')
        if show_moms and not self.group_moms:
            raise ValueError('Recorder.plot_lr(show_moms=True): the optimizer has no momentum/betas to show')
        fig, axs = new_figure(ax, ncols=2 if show_moms else 1)
        axs[0].plot(range(len(lrs)), lrs)
        axs[0].set_ylabel('Learning Rate')
        if show_moms:
            axs[1].plot(range(len(lrs)), self.moms)
            axs[1].set_ylabel('Momentum')
        for a in axs:
            a.set_xlabel('Iterations')
            a.xaxis.set_major_locator(MaxNLocator(integer=True))  # a count of steps
        return fig
