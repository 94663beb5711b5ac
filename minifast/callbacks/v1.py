"""Runs fastai v1 callbacks (on_train_begin(**kwargs) ... on_train_end) unchanged on minifast's events."""
from ..checks import metric_name
from ..core import V1_EVENTS, CancelBatchException, CancelTrainException, CancelValidateException

__all__ = ['V1_EVENTS', 'v1_hooks', 'v1_stop_epoch_hook']
_TRAIN_ONLY = {'on_backward_begin', 'on_backward_end', 'on_step_end'}
_SKIPS = {'skip_step', 'skip_zero', 'skip_bwd'}


def _state(learn):
    """The names fastai v1 passes to callbacks, read from the learner."""
    xb = learn.xb
    return dict(epoch=learn.epoch, iteration=learn.train_iter, num_batch=learn.iter, n_epochs=learn.n_epoch,
                last_input=xb[0] if isinstance(xb, tuple) and len(xb) == 1 else xb, last_target=learn.yb,
                last_output=learn.pred, last_loss=learn.loss, smooth_loss=learn.recorder.smooth_loss,
                last_metrics=learn.last_metrics or None, train=learn.training, metrics=learn.metrics,
                pbar=getattr(learn.progress, 'mbar', None), exception=learn.exception, stop_training=False,
                stop_epoch=False, skip_step=False, skip_zero=False, skip_bwd=False, skip_validate=False)


def _apply(learn, name, ret):
    """Write what a v1 hook returned back into the learner (fastai v1's state-dict update)."""
    if ret is None:
        return
    if not isinstance(ret, dict):
        raise TypeError(f'{name} returned {type(ret).__name__}; a fastai v1 hook returns None or a dict of state names')
    skip = False
    for k, v in ret.items():
        if k == 'last_input':
            learn.xb = tuple(v) if isinstance(v, (tuple, list)) else (v,)
        elif k == 'last_target':
            learn.yb = v
        elif k == 'last_output':
            learn.pred = v
        elif k == 'last_loss':
            learn.loss = v
        elif k == 'last_metrics':
            learn.last_metrics = list(v) if v is not None else []
        elif k == 'stop_training':
            learn.state.stop_training = learn.state.stop_training or bool(v)
        elif k == 'stop_epoch':
            learn.state.stop_epoch = learn.state.stop_epoch or bool(v)
        elif k == 'skip_validate':  # v1 keeps it for the rest of the fit (its LRFinder sets it in on_train_begin)
            learn.state.skip_validate = learn.state.skip_validate or bool(v)
        elif k in _SKIPS:
            skip = skip or bool(v)
        elif k not in ('epoch', 'iteration', 'num_batch', 'n_epochs', 'smooth_loss', 'train', 'metrics', 'pbar',
                       'exception'):
            raise KeyError(f"{name} returned {k!r}, which is not a fastai v1 state name")
    if skip:  # skip_bwd/skip_step/skip_zero: the rest of this batch's update is skipped
        raise CancelBatchException()


def _make(fn, v1name, name):
    train_only = v1name in _TRAIN_ONLY
    first = v1name == 'on_train_begin'

    def hook(learn):
        if train_only and not learn.training:
            return
        state = _state(learn)
        if first:  # v1 passed the metrics' names to on_train_begin only (its Recorder takes them by name)
            state['metrics_names'] = [metric_name(m) for m in learn.metrics]  # before the Recorder's before_fit
        _apply(learn, name, fn(**state))
    return hook


def v1_hooks(cb):
    """(event, name, hook) for each fastai v1 method `cb` defines."""
    out = []
    for v1name, event in V1_EVENTS.items():
        fn = getattr(cb, v1name, None)
        if fn is not None and callable(fn):
            out.append((event, f'{type(cb).__name__}.{v1name}', _make(fn, v1name, f'{type(cb).__name__}.{v1name}')))
    return out


def v1_stop_epoch_hook(learn):
    """Runs last in after_batch: a v1 `stop_epoch` ends the current training or validation pass."""
    if learn.state.stop_epoch:
        learn.state.stop_epoch = False
        raise CancelTrainException() if learn.training else CancelValidateException()
