"""Events and callback dispatch: event order, cancel levels, callback ordering and registration (callbacks= and
callback_fns= checked before training), error wrapping, after_fit cleanup."""
import warnings
from functools import partial

import pytest
import torch

from minifast import (EVENTS, CallbackException, Callback, CancelBatchException, CancelEpochException,
                      CancelFitException, CancelTrainException, CancelValidateException, Learner, Recorder, ShowGraph)
from minifast.callbacks.tracking import Checkpoint
from minifast.core import CancelException, Hooks
from conftest import make_data, make_mlp
from helpers import make_learner


TRAIN_BATCH = ['before_batch', 'after_pred', 'after_loss', 'after_backward', 'after_step', 'after_batch']
VALID_BATCH = ['before_batch', 'after_pred', 'after_loss', 'after_batch']


class Log(Callback):
    """Records (event, training, iter) for every event."""

    def __init__(self, raise_at=None, exc=None):
        self.log, self.raise_at, self.exc = [], raise_at, exc

    def _hook(self, event, learn):
        self.log.append((event, learn.training, learn.iter, learn.epoch))
        if self.raise_at is not None and self.raise_at(event, learn):
            raise self.exc()


for _e in EVENTS:
    setattr(Log, _e, (lambda e: lambda self, learn: self._hook(e, learn))(_e))


def events(log):
    return [e[0] for e in log.log]


def epoch_events(n_train=3, n_valid=2, cancel_train_after=None):
    train = TRAIN_BATCH * n_train
    return ['before_epoch', 'before_train', *train, 'after_train', 'before_validate',
            *VALID_BATCH * n_valid, 'after_validate', 'after_epoch']


def fit(cb, epochs=2, **kw):
    learn = Learner(make_data(), make_mlp(), silent=True, **kw)
    learn.fit(epochs, 1e-2, callbacks=cb)
    return learn


def test_event_order_full_fit():
    log = Log()
    fit(log)
    assert events(log) == ['before_fit', *epoch_events(), *epoch_events(), 'after_fit']
    batch_flags = [(t, i) for e, t, i, _ in log.log if e == 'before_batch']
    assert batch_flags == [(True, 0), (True, 1), (True, 2), (False, 0), (False, 1)] * 2
    assert [ep for e, *_, ep in log.log if e == 'after_epoch'] == [0, 1]


def test_events_tuple_is_the_documented_list():
    assert EVENTS == ('before_fit', 'before_epoch', 'before_train', 'before_batch', 'after_pred', 'after_loss',
                      'after_backward', 'after_step', 'after_batch', 'after_train', 'before_validate',
                      'after_validate', 'after_epoch', 'after_fit')


def test_cancel_batch_skips_backward_and_step():
    log = Log(raise_at=lambda e, l: e == 'after_loss' and l.training and l.iter == 1, exc=CancelBatchException)
    learn = fit(log, epochs=1)
    ev = events(log)
    train = ev[ev.index('before_train') + 1:ev.index('after_train')]
    assert train == TRAIN_BATCH + ['before_batch', 'after_pred', 'after_loss', 'after_batch'] + TRAIN_BATCH
    assert len(learn.recorder.lrs) == 2  # two optimizer steps, not three


def test_cancel_batch_before_batch_leaves_weights_untouched():
    learn = Learner(make_data(), make_mlp(), silent=True)
    w0 = [p.detach().clone() for p in learn.model.parameters()]
    log = Log(raise_at=lambda e, l: e == 'before_batch' and l.training, exc=CancelBatchException)
    learn.fit(1, 1e-2, callbacks=log)
    assert all(torch.equal(a, b) for a, b in zip(w0, learn.model.parameters()))
    assert events(log).count('after_batch') == 5 and 'after_pred' in events(log)  # validation still ran


def test_cancel_train_runs_validation_and_next_epoch():
    log = Log(raise_at=lambda e, l: e == 'after_batch' and l.training and l.iter == 1 and l.epoch == 0,
              exc=CancelTrainException)
    fit(log)
    first = ['before_epoch', 'before_train', *TRAIN_BATCH * 2, 'after_train', 'before_validate',
             *VALID_BATCH * 2, 'after_validate', 'after_epoch']
    assert events(log) == ['before_fit', *first, *epoch_events(), 'after_fit']


def test_cancel_validate_keeps_epoch_going():
    learn = Learner(make_data(), make_mlp(), silent=True)
    log = Log(raise_at=lambda e, l: e == 'before_batch' and not l.training, exc=CancelValidateException)
    learn.fit(1, 1e-2, callbacks=log)
    ev = events(log)
    # a validate-level cancel ends the pass at once (no after_batch), then closes it with after_validate
    assert ev[ev.index('before_validate'):] == ['before_validate', 'before_batch', 'after_validate',
                                                'after_epoch', 'after_fit']
    assert all(v != v for v in learn.last_metrics)  # no batch seen: NaN, not a made-up number


def test_cancel_epoch_skips_validation():
    log = Log(raise_at=lambda e, l: e == 'after_train' and l.epoch == 0, exc=CancelEpochException)
    fit(log)
    ev = events(log)
    first = ['before_epoch', 'before_train', *TRAIN_BATCH * 3, 'after_train', 'after_epoch']
    assert ev == ['before_fit', *first, *epoch_events(), 'after_fit']


def test_cancel_fit_stops_and_runs_after_fit():
    log = Log(raise_at=lambda e, l: e == 'after_epoch' and l.epoch == 0, exc=CancelFitException)
    learn = fit(log, epochs=5)
    assert events(log) == ['before_fit', *epoch_events(), 'after_fit']
    assert learn.exception is None and len(learn.recorder.train_losses) == 1


def test_cancel_in_a_closing_event_lets_later_callbacks_see_it():
    class StopEarly(Callback):
        order = -10  # runs before the Recorder

        def after_batch(self, learn):
            if learn.training and learn.iter == 0:
                raise CancelTrainException()

    learn = Learner(make_data(), make_mlp(), silent=True)
    learn.fit(2, callbacks=StopEarly())
    assert learn.recorder.nb_batches == [1, 1] and len(learn.recorder.val_losses) == 2


def test_error_in_callback_names_callback_and_event():
    class Boom(Callback):
        def after_loss(self, learn):
            raise ZeroDivisionError('oops')

    learn = Learner(make_data(), make_mlp(), silent=True)
    with pytest.raises(CallbackException, match=r'Boom\.after_loss raised ZeroDivisionError: oops') as ei:
        learn.fit(1, callbacks=Boom())
    assert isinstance(ei.value.__cause__, ZeroDivisionError)
    assert learn.exception is ei.value


def test_after_fit_runs_when_an_error_escapes_and_its_own_errors_only_warn():
    seen = []

    class Fail(Callback):
        def after_batch(self, learn):
            raise KeyError('k')

    class Cleanup(Callback):
        def after_fit(self, learn):
            seen.append(learn.exception)
            raise RuntimeError('cleanup broke')

    learn = Learner(make_data(), make_mlp(), silent=True, callbacks=[Cleanup()])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with pytest.raises(CallbackException, match='Fail.after_batch'):
            learn.fit(1, callbacks=[Fail()])
    assert isinstance(seen[0], CallbackException)
    assert any('Cleanup.after_fit raised RuntimeError: cleanup broke' in str(x.message) for x in w)


@pytest.mark.parametrize('name,suggest', [('after_bacth', 'after_batch'), ('before_fitt', 'before_fit'),
                                          ('on_epoch_ends', 'on_epoch_end')])
def test_misspelled_hook_is_an_error_when_added(name, suggest):
    Bad = type('Bad', (Callback,), {name: lambda self, learn: None})
    msg = rf"Bad\.{name} looks like a callback hook.*did you mean '{suggest}'"
    with pytest.raises(ValueError, match=msg):
        Learner(make_data(), make_mlp(), callbacks=[Bad()])
    learn = Learner(make_data(), make_mlp(), silent=True)
    with pytest.raises(ValueError, match=msg):
        learn.add_cb(Bad())
    with pytest.raises(ValueError, match=msg):
        learn.fit(1, callbacks=Bad())
    learn.callbacks.append(Bad())  # appended behind the learner's back: caught when fit starts
    with pytest.raises(ValueError, match=msg):
        learn.fit(1)


def test_order_sorts_callbacks():
    calls = []

    def make(name, order):
        return type(name, (Callback,), {'order': order,
                                        'before_fit': lambda self, learn: calls.append(type(self).__name__)})()

    learn = Learner(make_data(), make_mlp(), silent=True, callbacks=[make('C', 10), make('A', -5)])
    learn.fit(1, callbacks=[make('B', 0)])
    assert calls == ['A', 'B', 'C']
    assert learn.recorder.order < learn.progress.order


def test_per_call_callbacks_apply_to_that_call_only():
    log = Log()
    learn = Learner(make_data(), make_mlp(), silent=True)
    learn.fit(1, callbacks=[log])
    n = len(log.log)
    assert log not in learn.callbacks
    learn.fit(1)
    assert len(log.log) == n
    boom = Log(raise_at=lambda e, l: e == 'after_batch', exc=ValueError)
    with pytest.raises(CallbackException):
        learn.fit(1, callbacks=boom)
    assert boom not in learn.callbacks
    learn.fit(1)  # still works, without the failed call's callback
    assert events(boom).count('after_batch') == 1


def test_callback_fns_get_the_learner():
    class Needs(Callback):
        def __init__(self, learn, tag='x'):
            super().__init__(learn)
            self.tag = tag

    learn = Learner(make_data(), make_mlp(), callback_fns=[Needs, partial(Needs, tag='y')])
    assert [(type(c).__name__, c.tag, c.learn is learn) for c in learn.callbacks] == [('Needs', 'x', True),
                                                                                      ('Needs', 'y', True)]
    single = Learner(make_data(), make_mlp(), callback_fns=Needs)
    assert isinstance(single.callbacks[0], Needs)


def test_add_cb_rejects_a_class():
    learn = Learner(make_data(), make_mlp())
    with pytest.raises(TypeError, match='pass an instance'):
        learn.add_cb(Log)


def test_keyboard_interrupt_is_not_wrapped_and_keeps_learner_usable():
    learn = Learner(make_data(), make_mlp(), silent=True)
    stop = Log(raise_at=lambda e, l: e == 'after_batch' and l.iter == 1, exc=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, callbacks=stop)
    assert isinstance(learn.exception, KeyboardInterrupt)
    learn.fit(1)
    assert learn.exception is None and len(learn.recorder.train_losses) == 1


def test_validate_called_from_a_callback_leaves_the_fit_intact():
    class Probe(Callback):
        def __init__(self):
            self.results, self.modes = [], []

        def after_batch(self, learn):
            if learn.training and learn.iter == 1:
                self.results.append(learn.validate(learn.data.train_dl))
                self.modes.append((learn.training, learn.model.training, learn.iter))

        def after_epoch(self, learn):
            self.results.append(learn.validate())

    log, probe = Log(), Probe()
    learn = Learner(make_data(), make_mlp(), silent=True)
    learn.fit(2, 1e-2, callbacks=[log, probe])
    assert events(log) == ['before_fit', *epoch_events(), *epoch_events(), 'after_fit']  # the fit's own events
    assert probe.modes == [(True, True, 1)] * 2  # still training, model back in train mode, same batch
    assert learn.recorder.nb_batches == [3, 3]
    assert [r[0] for r in probe.results[1::2]] == learn.recorder.val_losses  # after_epoch sees the epoch's numbers


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize('cbs', [ShowGraph, [ShowGraph], [Recorder, ShowGraph]])
def test_callback_class_in_callbacks_is_an_error_before_training(cbs):
    # callbacks= takes instances; a class (as callback_fns= takes) used to train a whole epoch and then fail with
    # "type.after_epoch raised TypeError: ... missing 1 required positional argument"
    learn = Learner(make_data(), make_mlp(), silent=True)
    w0 = _weights(learn.model)
    with pytest.raises(TypeError, match=r"callbacks=.*the class \w+; pass an instance.*or callback_fns=\[\w+\]"):
        learn.fit(1, 1e-2, callbacks=cbs)
    assert all(torch.equal(a, b) for a, b in zip(w0, learn.model.parameters()))
    assert learn.opt is None  # nothing was set up either
    with pytest.raises(TypeError, match=r"callbacks= got the class (Recorder|ShowGraph)"):
        learn.fit_one_cycle(1, 1e-2, callbacks=cbs)
    assert all(torch.equal(a, b) for a, b in zip(w0, learn.model.parameters()))


def test_callback_instance_in_callback_fns_is_an_error_naming_it():
    # callback_fns= takes classes or functions learn -> callback; an instance used to give
    # "TypeError: 'ShowGraph' object is not callable"
    with pytest.raises(TypeError, match=r"callback_fns=.*ShowGraph instance.*callbacks=\[\.\.\.\]"):
        Learner(make_data(), make_mlp(), silent=True, callback_fns=[ShowGraph()])


class _FailingAfterFit(Callback):
    def after_fit(self, learn):
        raise RuntimeError('summary failed')


def test_a_failing_after_fit_hook_still_lets_the_later_ones_close_bars_and_files(tmp_path, monkeypatch):
    from minifast.callbacks import progress
    from minifast.callbacks.logging import CSVLogger
    monkeypatch.setattr(progress, '_live', lambda: True)  # real console bars, as in a terminal
    learn = make_learner(tmp_path)
    learn.silent = False
    log = CSVLogger()
    with pytest.raises(RuntimeError, match=r'_FailingAfterFit\.after_fit raised RuntimeError: summary failed'):
        learn.fit(1, callbacks=[_FailingAfterFit(), log])  # order 0: it runs before the bar's and the log's after_fit
    assert learn.progress.mbar is None and learn.progress.pbar is None
    assert log.file is None
    assert isinstance(learn.exception, RuntimeError)  # learn.save then writes no 'finished' state
    learn.fit(1)
    assert learn.exception is None and learn.progress.mbar is None


def test_a_callback_both_registered_and_passed_to_fit_runs_once(tmp_path):
    from minifast.callbacks.control import ReduceLROnPlateau
    ckpt = Checkpoint(keep_last=None)
    plateau = ReduceLROnPlateau(patience=0, min_delta=10., factor=0.5, min_lr=0.)  # never improves after epoch 0
    learn = make_learner(tmp_path)
    learn.add_cb(ckpt)
    learn.add_cb(plateau)
    learn.fit(2, 1e-2, callbacks=[ckpt, plateau])
    assert len(ckpt.files) == 2 and len(list((tmp_path / 'checkpoints').iterdir())) == 2
    assert [e for e, _ in plateau.reductions] == [1] and learn.opt.param_groups[0]['lr'] == pytest.approx(5e-3)


def test_every_cancel_has_one_base_and_a_hook_table_reports_the_pending_cancel():
    from minifast import (CancelBatchException, CancelEpochException, CancelFitException, CancelTrainException,
                          CancelValidateException)
    for c in (CancelBatchException, CancelEpochException, CancelFitException, CancelTrainException,
              CancelValidateException):
        assert issubclass(c, CancelException)
    pending = []

    class A(Callback):
        order = 1

        def after_batch(self, learn):
            raise CancelBatchException()

    class B(Callback):
        order = 2

        def after_batch(self, learn):
            pending.append(hooks.pending_cancel)

    hooks = Hooks([B(), A()])
    assert [n for n, _ in hooks.table['after_batch']] == ['A.after_batch', 'B.after_batch']
    with pytest.raises(CancelBatchException):
        hooks(None, 'after_batch')
    assert isinstance(pending[0], CancelBatchException) and hooks.pending_cancel is None
