"""The callback system: the event names, `Callback`, the cancel exceptions and the hook table that dispatches events.

Imports nothing from minifast: callbacks import this module, never the learner.
"""
import difflib
import warnings

__all__ = ['EVENTS', 'V1_EVENTS', 'Callback', 'CancelException', 'CancelBatchException', 'CancelTrainException',
           'CancelValidateException', 'CancelEpochException', 'CancelFitException', 'CallbackException',
           'DivergenceError', 'Hooks', 'check_hooks', 'callback_order', 'as_list']

EVENTS = ('before_fit', 'before_epoch', 'before_train', 'before_batch', 'after_pred', 'after_loss',
          'after_backward', 'after_step', 'after_batch', 'after_train', 'before_validate', 'after_validate',
          'after_epoch', 'after_fit')

# fastai v1's hook names and the events they run on (minifast.callbacks.v1 adapts their calling convention)
V1_EVENTS = {'on_train_begin': 'before_fit', 'on_epoch_begin': 'before_epoch', 'on_batch_begin': 'before_batch',
             'on_loss_begin': 'after_pred', 'on_backward_begin': 'after_loss', 'on_backward_end': 'after_backward',
             'on_step_end': 'after_step', 'on_batch_end': 'after_batch', 'on_epoch_end': 'after_epoch',
             'on_train_end': 'after_fit'}

_HOOK_PREFIXES = ('before_', 'after_', 'on_')
# Events that close a level: a cancel raised by one hook still lets the later hooks of that event run, so the
# Recorder, progress bar and loggers see every batch/epoch that happened; the cancel is raised after them.
_CLOSING = frozenset({'after_batch', 'after_train', 'after_validate', 'after_epoch', 'after_fit'})


class CancelException(Exception):
    """Base of the cancels: raised in a hook, each ends one level of the loop early (cleanup still runs)."""


class CancelBatchException(CancelException):
    """Raised in a batch hook: skip the rest of this batch (backward/step/zero_grad not yet done); after_batch runs."""


class CancelTrainException(CancelException):
    """Stop this epoch's training phase; after_train, validation and after_epoch still run."""


class CancelValidateException(CancelException):
    """Stop the current validation pass; after_validate runs, with metrics over the batches seen so far."""


class CancelEpochException(CancelException):
    """Skip the rest of this epoch (validation included); after_epoch runs and the next epoch starts."""


class CancelFitException(CancelException):
    """Stop fit; after_fit runs and fit returns normally."""


class CallbackException(RuntimeError):
    """An error raised inside a callback hook; the message names the callback and the event."""


class DivergenceError(RuntimeError):
    """Training stopped on a non-finite loss (or weights); `epoch`, `batch` and `step` say where."""

    def __init__(self, msg, epoch=None, batch=None, step=None):
        super().__init__(msg)
        self.epoch, self.batch, self.step = epoch, batch, step


class Callback:
    """Base class of callbacks: define methods named after `EVENTS`, each taking the learner, e.g. after_batch(learn).

    fastai v1 hooks (on_train_begin(**kwargs) ... on_train_end) are accepted too. `order` sorts callbacks (lower
    runs first); a method whose name starts with before_/after_/on_ but is no known event is an error.
    """
    order = 0

    def __init__(self, learn=None):
        if learn is not None:
            self.learn = learn


def callback_order(cb):
    """The sort key of a callback: its `order` (fastai v1's `_order` when it has none)."""
    o = getattr(cb, 'order', 0)
    return o if o else getattr(cb, '_order', 0)


def as_list(x):
    """None -> [], a list or tuple -> a list of its items, anything else -> [x]."""
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def check_hooks(cb):
    """Raise unless `cb` is a callback instance whose before_*/after_*/on_* methods are all known events."""
    if isinstance(cb, type):  # its hooks would be called unbound, and fail only when their event first comes
        n = cb.__name__
        raise TypeError(f'callbacks= got the class {n}; pass an instance ({n}(learn) or {n}()), or '
                        f'callback_fns=[{n}]')
    known = set(EVENTS) | set(V1_EVENTS)
    if not isinstance(cb, Callback) and not any(callable(getattr(cb, e, None)) for e in known):
        raise TypeError(f'{cb!r:.60} ({type(cb).__name__}) is not a callback: a callback subclasses minifast.Callback '
                        f'(or is a fastai v1 callback with on_* methods)')
    for name in dir(type(cb)):
        if name.startswith(_HOOK_PREFIXES) and name not in known and callable(getattr(type(cb), name)):
            near = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ''
            raise ValueError(f"{type(cb).__name__}.{name} looks like a callback hook but '{name}' is not an event "
                             f"(see minifast.EVENTS){hint}")


class Hooks:
    """The hook table of one fit (or validate): for every event, the (name, function) pairs of the callbacks that
    handle it, resolved once, in `order`. Calling it with the learner and an event runs that event's hooks.

    `adapt(cb)` may give more (event, name, function) triples for a callback (fastai v1's on_* methods); `adapted`
    then says whether any callback had some. An error in a hook becomes a CallbackException naming the callback and
    the event; a cancel raised in a closing event (after_batch/train/validate/epoch/fit) lets that event's later
    hooks run first, and is `pending_cancel` while they do.
    """

    def __init__(self, cbs, adapt=None):
        # one instance given twice (in learn.callbacks and in fit's callbacks=) must not see every event twice
        self.cbs = sorted({id(cb): cb for cb in cbs}.values(), key=callback_order)
        self.table, self.adapted = {e: [] for e in EVENTS}, False
        self.pending_cancel = self.failed = None
        for cb in self.cbs:
            check_hooks(cb)
            for e in EVENTS:
                fn = getattr(cb, e, None)
                if fn is not None:
                    self.table[e].append((f'{type(cb).__name__}.{e}', fn))
            for e, name, fn in (adapt(cb) if adapt is not None else ()):
                self.table[e].append((name, fn))
                self.adapted = True

    def __call__(self, learn, event):
        cancel = None
        try:
            for name, fn in self.table[event]:
                try:
                    fn(learn)
                except (CancelException, CallbackException) as e:
                    if event not in _CLOSING or isinstance(e, CallbackException):
                        raise
                    cancel = cancel or e
                    self.pending_cancel = cancel  # later hooks of this event can see that it will end a level
                except DivergenceError:
                    raise
                except Exception as e:
                    raise CallbackException(f'{name} raised {type(e).__name__}: {e}') from e
        except BaseException:  # (no cost on the way through: the loop stays as lean as without it)
            self.failed = (event, name, fn)  # the later hooks of a closing event can still be run (`close`)
            raise
        if cancel is not None:
            self.pending_cancel = None
            raise cancel

    def close(self, learn, event, error, after_failed=False):
        """Run `event`'s hooks while `error` escapes: every hook runs, and their own errors only warn. With
        `after_failed`, only the hooks after the one that failed in this event."""
        hooks = self.table[event]
        if after_failed and self.failed is not None and self.failed[0] == event:
            hooks = hooks[hooks.index(self.failed[1:]) + 1:]
        for name, fn in hooks:
            try:
                fn(learn)
            except Exception as e:  # the escaping exception matters more
                warnings.warn(f'{name} raised {type(e).__name__}: {e} while handling {error!r}')
