"""Checkpoints and exact resume: a run killed (SIGKILL, in a subprocess) or interrupted mid-epoch and resumed ends
bit-identical to an uninterrupted run; atomic writes; keep_last; every=; monitor; mismatch and finished errors;
edge cases (a checkpoint in a cancelled or stopped epoch, Ctrl-C while validating, relative folders, resumable())."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

import minifast
from minifast import Callback, CancelTrainException, DataBunch, Learner, accuracy
from minifast.callbacks.tracking import Checkpoint
from minifast.determinism import set_seed
from minifast.resume import list_checkpoints
from minifast.schedules import TrainingPhase
from conftest import make_data, make_mlp
from helpers import lock_holder
from resume_run import RUN, Interrupt, assert_identical, make_learner, outcome, run


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The uninterrupted run (with the same Checkpoint callback: writing consumes no randomness)."""
    return outcome(run(tmp_path_factory.mktemp('ref')))


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, reference):
    kill_child(tmp_path, 'step', 9)
    files = [f.name for f in list_checkpoints(tmp_path / 'checkpoints')]
    assert files == ['ckpt_00000_epoch0_step4.pth', 'ckpt_00001_epoch1_step8.pth']  # step 8: epoch 1, batch 2
    # killed while writing (issue 16): resumed from step 8, killed half-way through torch.save of step 12's file; the
    # next child, resumed from step 8 again, killed when step 16's temp file is complete, before os.replace
    kill_child(tmp_path, 'write', 1, 0.5)
    kill_child(tmp_path, 'replace', 2)
    finish_and_compare(tmp_path, reference)


@pytest.mark.parametrize('crash_at', [0, 3, 5, 6, 11, 16])
def test_crash_anywhere_then_resume_is_bit_identical(tmp_path, reference, crash_at):
    with pytest.raises(Exception, match='simulated crash'):
        run(tmp_path, extra=[Interrupt(crash_at)])
    if crash_at < 4:  # no checkpoint yet: resume starts over (with a warning) and still matches
        with pytest.warns(UserWarning, match='no checkpoint'):
            resumed = run(tmp_path, resume='checkpoints')
    else:
        resumed = run(tmp_path, resume='checkpoints')
    assert_identical(reference, outcome(resumed))


@pytest.mark.parametrize('method', ['fit_sgdr', 'fit'])
def test_resume_other_fit_methods_and_every_epoch(tmp_path, method):
    ref = outcome(run(tmp_path / 'ref', method=method, every='epoch'))
    with pytest.raises(RuntimeError):
        run(tmp_path / 'b', method=method, every='epoch', extra=[Interrupt(8)])
    assert [f.name.split('_', 2)[2] for f in list_checkpoints(tmp_path / 'b' / 'checkpoints')] == ['epoch0_step6.pth']
    assert_identical(ref, outcome(run(tmp_path / 'b', method=method, every='epoch', resume=True)))


def test_resume_twice_and_csv_log_and_snapshots_survive(tmp_path):
    def go(path, *crash, **kw):
        return run(path, extra=[minifast.CSVLogger(), minifast.WeightSnapshots(every_epoch=True), *crash], **kw)
    ref = go(tmp_path / 'ref')
    with pytest.raises(RuntimeError):
        go(tmp_path / 'b', Interrupt(7))
    with pytest.raises(RuntimeError):  # crashes again after the resume, in the next epoch
        go(tmp_path / 'b', Interrupt(14), resume=True)
    b = go(tmp_path / 'b', resume=True)
    assert_identical(outcome(ref), outcome(b))
    ref_csv = [row[:-1] for row in (tmp_path / 'ref' / 'history.csv').read_text().splitlines()]
    b_csv = [row[:-1] for row in (tmp_path / 'b' / 'history.csv').read_text().splitlines()]
    cut = lambda rows: [r.rsplit(',', 1)[0] for r in rows]  # noqa: E731  (the time column differs)
    assert cut(ref_csv) == cut(b_csv) and len(b_csv) == 4
    assert ref.snapshots.keys() == b.snapshots.keys() == {0, 1, 2}
    assert_identical(ref.snapshots, b.snapshots)


def test_resume_finished_run_raises(tmp_path):
    run(tmp_path)
    with pytest.raises(ValueError, match=r'already finished \(3 epochs, 18 steps\)'):
        run(tmp_path, resume='checkpoints')


def test_resume_with_a_different_schedule_raises_and_changes_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        run(tmp_path, extra=[Interrupt(9)])
    learn = make_learner(tmp_path)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match='3-epoch fit but this call trains 4 epochs'):
        learn.fit_one_cycle(4, 1e-2, callbacks=[Checkpoint(every=4)], resume='checkpoints')
    with pytest.raises(ValueError, match='schedule differs'):
        learn.fit_one_cycle(3, 2e-2, callbacks=[Checkpoint(every=4)], resume='checkpoints')
    learn.data.train_dl.batch_size = 32
    with pytest.raises(ValueError, match='6 steps per epoch but the training DataLoader now has 3'):
        learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4)], resume='checkpoints')
    assert_identical(before, learn.model.state_dict())


def test_resume_errors_name_the_thing(tmp_path):
    learn = make_learner(tmp_path)
    with pytest.raises(FileNotFoundError, match='nothere.pth'):
        learn.fit(1, resume=tmp_path / 'nothere.pth')
    with pytest.raises(ValueError, match='needs a Checkpoint callback'):
        learn.fit(1, resume=True)
    plain = tmp_path / 'plain.pth'
    torch.save(learn.model.state_dict(), plain)
    with pytest.raises(ValueError, match='weights only'):
        learn.fit(1, resume=plain)
    saved = learn.save('after')
    with pytest.raises(ValueError, match='already finished'):
        learn.fit(1, resume=saved)
    for bad in (dict(every='sometimes'), dict(every=0), dict(keep_last=0), dict(name='')):
        with pytest.raises(ValueError, match='Checkpoint'):
            Checkpoint(**bad)
    with pytest.raises(minifast.CallbackException, match=r"Checkpoint.before_fit .* monitor 'acc' is not recorded; "
                                                         r"the names are 'train_loss', 'valid_loss', 'accuracy'"):
        learn.fit(1, callbacks=[Checkpoint(monitor='acc')])


def test_keep_last_and_numbering(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(3, 1e-3, callbacks=[Checkpoint(every=2, keep_last=3)])
    names = [f.name for f in list_checkpoints(tmp_path / 'checkpoints')]
    assert names == ['ckpt_00006_epoch2_step14.pth', 'ckpt_00007_epoch2_step16.pth', 'ckpt_00008_epoch2_step18.pth']
    assert not list((tmp_path / 'checkpoints').glob('*.tmp'))
    learn.fit(1, 1e-3, callbacks=[Checkpoint(every='epoch', keep_last=None)])  # numbering continues in the folder
    assert list_checkpoints(tmp_path / 'checkpoints')[-1].name == 'ckpt_00009_epoch0_step6.pth'


def test_improvement_mode_keeps_the_best_and_monitors_metrics(tmp_path):
    learn = make_learner(tmp_path)
    ck = Checkpoint(every='improvement', monitor='accuracy', keep_last=1)
    learn.fit(4, 1e-2, callbacks=[ck])
    accs = [m[0] for m in learn.recorder.metrics]
    assert ck.mode == 'max' and ck.best == max(accs)
    best_epoch = accs.index(max(accs))
    kept = [f.name for f in list_checkpoints(tmp_path / 'checkpoints')]
    assert any(f'epoch{best_epoch}_' in n for n in kept) and ck.best_file.name in kept
    state = torch.load(ck.best_file, weights_only=True)
    assert state['callbacks']['Checkpoint']['best'] == max(accs)
    assert Checkpoint(monitor='valid_loss').mode == 'min' and Checkpoint(monitor='error_rate').mode == 'min'


def test_failed_write_keeps_previous_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch):
    learn = make_learner(tmp_path)
    learn.fit(1, 1e-3, callbacks=[Checkpoint(every='epoch', keep_last=None)])
    (good,) = list_checkpoints(tmp_path / 'checkpoints')
    good_bytes = good.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.write(b'garbage')
        raise OSError('disk full (simulated)')
    monkeypatch.setattr(torch, 'save', failing_save)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(minifast.CallbackException, match='Checkpoint.after_batch raised OSError: disk full') as err:
        learn.fit(1, 1e-3, callbacks=[Checkpoint(every=2, keep_last=1)])
    assert isinstance(err.value.__cause__, OSError)
    monkeypatch.setattr(torch, 'save', real_save)
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == [good.name]  # no tmp, nothing pruned
    assert good.read_bytes() == good_bytes
    assert not any(torch.equal(before[k], v) for k, v in learn.model.state_dict().items() if 'weight' in k)
    with pytest.raises(OSError):  # learn.save fails the same way: the old file stays
        monkeypatch.setattr(torch, 'save', failing_save)
        learn.save(good)
    assert good.read_bytes() == good_bytes


def test_save_writes_full_state_and_load_reads_weights(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(1, 1e-3)
    f = learn.save('stage1')
    st = torch.load(f, weights_only=True)
    assert st['format'] == 'minifast-checkpoint' and st['position']['where'] == 'end'
    assert st['callbacks']['Recorder']['_raw'] == learn.recorder.raw_losses
    assert set(st['rng']) == {'torch', 'cuda', 'numpy', 'random'}
    other = make_learner(tmp_path)
    other.load('stage1')
    assert_identical(learn.model.state_dict(), other.model.state_dict())
    assert_identical(learn.opt.state_dict()['state'], other.opt.state_dict()['state'])
    legacy = tmp_path / 'legacy.pth'  # the earlier {'model', 'opt'} layout still loads
    torch.save({'model': learn.model.state_dict(), 'opt': learn.opt.state_dict()}, legacy)
    make_learner(tmp_path).load(legacy)


def test_checkpoint_in_callback_fns(tmp_path):
    learn = make_learner(tmp_path)
    learn = Learner(learn.data, learn.model, path=tmp_path, silent=True,
                    callback_fns=[partial(Checkpoint, every='epoch', path='ck')])
    learn.fit(2, 1e-3)
    assert [f.name for f in list_checkpoints(tmp_path / 'ck')] == ['ckpt_00000_epoch0_step6.pth',
                                                                    'ckpt_00001_epoch1_step12.pth']


def test_ctrl_c_is_deferred_to_the_batch_boundary_and_checkpointed(tmp_path, reference):
    class CtrlC(Callback):
        def after_backward(self, learn):  # mid-batch: between backward and the optimizer step
            if learn.train_iter == 10:
                os.kill(os.getpid(), signal.SIGINT)
    learn = make_learner(tmp_path)
    set_seed(1)
    with pytest.raises(KeyboardInterrupt):
        learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4), CtrlC()])
    assert learn.interrupted and learn.train_iter == 11  # the batch completed: step 10 was applied and recorded
    assert len(learn.recorder.raw_losses) == 11
    assert all(p.grad is None or not p.grad.any() for p in learn.model.parameters())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert list_checkpoints(tmp_path / 'checkpoints')[-1].name.endswith('epoch1_step11.pth')
    assert_identical(reference, outcome(run(tmp_path, resume='checkpoints')))


def test_learner_fits_again_after_an_interrupt(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(1, 1e-3)

    class Stop(Callback):
        def after_backward(self, learn):
            raise KeyboardInterrupt  # an immediate interrupt (second Ctrl-C): gradients are left behind
    with pytest.raises(KeyboardInterrupt):
        learn.fit(1, 1e-3, callbacks=[Stop()])
    assert learn.interrupted and any(p.grad is not None and p.grad.any() for p in learn.model.parameters())
    assert learn.callbacks == []
    w = learn.model[0].weight.clone()

    class Probe(Callback):
        def before_batch(self, learn):
            if learn.training and learn.train_iter == 0:
                self.clean = all(p.grad is None or not p.grad.any() for p in learn.model.parameters())
    probe = Probe()
    learn.fit(1, 1e-3, callbacks=[probe])
    assert probe.clean  # the stale gradients were cleared at fit start, so they do not leak into the first step
    assert not learn.interrupted and not torch.equal(w, learn.model[0].weight)


class NoisyItems(torch.utils.data.Dataset):
    """Per-item augmentation drawn from the (worker's) global torch RNG."""
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(self.x.shape[1]), self.y[i]


def _worker_learner(path, persistent=False):
    from torch.utils.data import DataLoader
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = x[:, :3].argmax(1)
    dl = DataLoader(NoisyItems(x, y), batch_size=16, shuffle=True, num_workers=2, persistent_workers=persistent,
                    multiprocessing_context='fork')
    set_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    return Learner(DataBunch(dl, None), model, path=path, silent=True)


@pytest.mark.skipif(sys.platform != 'linux', reason='fork start method')
def test_resume_with_worker_processes_and_item_augmentation_is_identical(tmp_path):
    def go(path, *extra, resume=None):
        learn = _worker_learner(path)
        set_seed(1)
        learn.fit_one_cycle(2, 1e-2, callbacks=[Checkpoint(every=4, monitor='train_loss'), *extra], resume=resume)
        return learn
    ref = go(tmp_path / 'ref')
    with pytest.raises(RuntimeError):
        go(tmp_path / 'b', Interrupt(9))
    b = go(tmp_path / 'b', resume=True)
    assert ref.recorder.raw_losses == b.recorder.raw_losses
    assert_identical(ref.model.state_dict(), b.model.state_dict())


@pytest.mark.skipif(sys.platform != 'linux', reason='fork start method')
def test_resume_with_persistent_workers_warns(tmp_path):
    learn = _worker_learner(tmp_path, persistent=True)
    with pytest.raises(RuntimeError):
        learn.fit(1, 1e-3, callbacks=[Checkpoint(every=2, monitor='train_loss'), Interrupt(3)])
    first = learn
    learn = _worker_learner(tmp_path, persistent=True)
    with pytest.warns(UserWarning, match='persistent_workers=True'):
        learn.fit(1, 1e-3, callbacks=[Checkpoint(every=2, monitor='train_loss')], resume='checkpoints')
    for lr in (first, learn):  # stop the persistent workers now: left alive they slow the tests that follow
        it = lr.data.train_dl._iterator
        if it is not None:
            it._shutdown_workers()
        lr.data.train_dl._iterator = None


def test_snapshots_written_to_files_are_not_copied_into_checkpoints(tmp_path):
    def go(*crash, resume=None):
        return run(tmp_path / 'b', extra=[minifast.WeightSnapshots(every_epoch=True, path=tmp_path / 'b' / 'snaps'),
                                          *crash], resume=resume)
    ref = run(tmp_path / 'ref', extra=[minifast.WeightSnapshots(every_epoch=True)])
    with pytest.raises(RuntimeError):
        go(Interrupt(14))
    last = list_checkpoints(tmp_path / 'b' / 'checkpoints')[-1]
    st = torch.load(last, weights_only=True)['callbacks']['WeightSnapshots']
    assert st['snapshots'] == {} and sorted(st['files']) == [0]  # step 12 ends epoch 1's training only
    b = go(resume=True)
    assert_identical(ref.snapshots, b.snapshots)


def test_resume_a_plain_fit_with_another_lr_raises(tmp_path):
    with pytest.raises(RuntimeError):
        run(tmp_path, method='fit', extra=[Interrupt(9)])
    learn = make_learner(tmp_path)
    with pytest.raises(ValueError, match=r"written by a fit with \{'lr': \[0.01\], 'wd': 0.01\}, this call has "
                                         r"\{'lr': \[0.001\], 'wd': 0.01\}"):
        learn.fit(3, 1e-3, callbacks=[Checkpoint(every=4)], resume='checkpoints')


# ---- edge cases found in review (each failed before its fix) ---------------------------------------------------------
class CrashInValidation(Callback):
    """A crash (or kill) while the final epoch validates, after its training batches are done."""
    def __init__(self, epoch):
        self.epoch = epoch

    def after_validate(self, learn):
        if learn.epoch == self.epoch:
            raise RuntimeError('simulated crash during validation')


def _phases_run(path, extra=(), resume=None):
    learn = make_learner(path)  # 6 steps per epoch
    set_seed(1)
    phases = [TrainingPhase(length=8, lr=(1e-3, 1e-2)), TrainingPhase(length=7, lr=(1e-2, 1e-4))]  # 15 steps
    learn.fit_phases(phases, callbacks=[Checkpoint(every=5), *extra], resume=resume)
    return learn


def test_fit_phases_resume_after_a_checkpoint_at_the_stop_step_trains_no_extra_step(tmp_path):
    """fit_phases ends mid-epoch (CancelTrainException at step 15). The every=5 checkpoint written in that same
    after_batch must record the epoch's training as over, so a crash during that epoch's validation resumes into
    the validation, not into a 16th step."""
    ref = outcome(_phases_run(tmp_path / 'ref'))
    with pytest.raises(Exception):
        _phases_run(tmp_path / 'run', extra=[CrashInValidation(2)])
    resumed = _phases_run(tmp_path / 'run', resume='checkpoints')
    assert len(resumed.recorder.raw_losses) == len(ref['losses']) == 15
    assert_identical(ref, outcome(resumed))


class StopTrainAt(Callback):
    """A user callback that ends an epoch's training early (e.g. a time or loss budget per epoch)."""
    def __init__(self, at):
        self.at = at

    def after_batch(self, learn):
        if learn.training and learn.train_iter + 1 == self.at:
            raise CancelTrainException()


def test_checkpoint_in_the_batch_that_cancels_training_resumes_into_validation(tmp_path):
    """The same with a user callback: the batch checkpoint written in the after_batch that cancels the epoch's
    training records the cancellation, so the resumed run does not train the rest of that epoch."""
    def go(path, extra=(), resume=None):
        learn = make_learner(path)
        set_seed(1)
        learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4), StopTrainAt(4), *extra], resume=resume)
        return learn
    ref = outcome(go(tmp_path / 'ref'))
    with pytest.raises(Exception):
        go(tmp_path / 'run', extra=[CrashInValidation(0)])
    assert_identical(ref, outcome(go(tmp_path / 'run', resume='checkpoints')))


def test_prune_spares_another_checkpoint_whose_name_shares_the_prefix(tmp_path):
    """Two Checkpoint callbacks in one folder: name='ckpt' (every epoch) and name='ckpt_best' (improvement); each
    prunes only its own files."""
    learn = make_learner(tmp_path)
    set_seed(1)
    best = Checkpoint(every='improvement', keep_last=3, name='ckpt_best')
    learn.fit(4, 1e-2, callbacks=[Checkpoint(every='epoch', keep_last=1, name='ckpt'), best])
    names = [p.name for p in list_checkpoints(tmp_path / 'checkpoints')]
    assert best.best_file is not None
    assert best.best_file.exists(), (best.best_file.name, names)  # 'the best file is never pruned'
    assert len([n for n in names if n.startswith('ckpt_best_')]) >= min(3, best.files.__len__()), names


def test_relative_resume_folder_is_resolved_against_learn_path(tmp_path, monkeypatch):
    """Checkpoint(path='checkpoints') writes under learn.path, and resume='checkpoints' finds it there even when
    the current directory has a folder of that name."""
    run_dir, cwd = tmp_path / 'run', tmp_path / 'cwd'
    (cwd / 'checkpoints').mkdir(parents=True)  # e.g. the project's own folder of that name
    monkeypatch.chdir(cwd)
    learn = make_learner(run_dir)
    set_seed(1)
    with pytest.raises(Exception):
        learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4), Interrupt(9)])
    assert list_checkpoints(run_dir / 'checkpoints')
    learn = make_learner(run_dir)
    set_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # 'no checkpoint in checkpoints; training from the beginning'
        learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4)], resume='checkpoints')


class PoisonInput(Callback):
    """Feeds one batch holding an inf (a corrupt sample) at training step `at`."""
    order = -20

    def __init__(self, at):
        self.at = at

    def before_batch(self, learn):
        if learn.training and learn.train_iter == self.at:
            x = learn.xb[0].clone()
            x[0, 0] = float('inf')
            learn.xb = (x,)


class Keep(Callback):
    """Copies the parameters after every optimizer step."""
    def before_fit(self, learn):
        self.params = {}

    def after_step(self, learn):
        self.params[learn.train_iter] = [p.detach().clone() for p in learn.model.parameters()]


def test_divergence_on_cpu_with_batchnorm_keeps_the_last_finite_weights_and_statistics(tmp_path):
    """One inf input at step 9 (epoch 1, batch 3): the forward writes NaN into BatchNorm's running stats before the
    loss can be checked; the guard puts the statistics back and keeps the parameters after step 8 (the last finite
    ones), rather than rolling back to the copy from the end of epoch 0."""
    learn = make_learner(tmp_path)
    keep = Keep()
    set_seed(1)
    with pytest.raises(minifast.DivergenceError) as e:
        learn.fit(3, 1e-2, callbacks=[PoisonInput(9), keep])
    assert 'epoch 1' in str(e.value) and 'the last finite ones' in str(e.value)
    assert all(torch.isfinite(b).all() for b in learn.model.buffers())
    last_finite = keep.params[8]
    for p, q in zip(learn.model.parameters(), last_finite):
        assert torch.equal(p, q), str(e.value)


_SCORES = {}


def score(pred, target):
    """A metric whose value per epoch the test fixes (to control which epochs 'improve')."""
    return torch.tensor(_SCORES['by_epoch'][_SCORES['epoch']])


class SetEpoch(Callback):
    def before_validate(self, learn):
        _SCORES['epoch'] = learn.epoch


class CrashAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def before_epoch(self, learn):
        if learn.epoch == self.epoch:
            raise RuntimeError('simulated crash')


def test_improvement_mode_keeps_the_real_best_file_across_a_resume(tmp_path):
    """In 'improvement' mode each checkpoint records itself as the best file, so a run resumed from the epoch-2
    checkpoint (the best) keeps that file through later prunes."""
    _SCORES['by_epoch'] = [3., 2., 1., 5.]  # epochs 0, 1, 2 improve (min); epoch 3 does not

    def go(extra=(), resume=None):
        learn = make_learner(tmp_path)
        learn.metrics = [score]
        ck = Checkpoint(every='improvement', monitor='score', mode='min', keep_last=1)
        set_seed(1)
        learn.fit(4, 1e-2, callbacks=[SetEpoch(), ck, *extra], resume=resume)
        return ck
    with pytest.raises(Exception):
        go(extra=[CrashAt(3)])
    ck = go(resume='checkpoints')
    assert ck.best == 1.
    names = [p.name for p in list_checkpoints(tmp_path / 'checkpoints')]
    assert any('_epoch2_' in n for n in names), names  # the best epoch's file is still there
    assert ck.best_file is not None and '_epoch2_' in ck.best_file.name, (ck.best_file, names)


def test_ctrl_c_during_validation_saves_the_end_of_the_epochs_training(tmp_path):
    """README: Ctrl-C during fit 'takes effect at the end of the current batch ... and a Checkpoint callback saves
    that boundary'. A Ctrl-C while validating saves the end of that epoch's training, and resuming from it ends
    bit-identical to an uninterrupted run."""
    import signal

    class CtrlCInValidation(Callback):
        def after_batch(self, learn):
            if not learn.training and learn.epoch == 1:
                os.kill(os.getpid(), signal.SIGINT)
    learn = make_learner(tmp_path)
    set_seed(1)
    with pytest.raises(KeyboardInterrupt):
        learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every='epoch'), CtrlCInValidation()])
    assert learn.interrupted
    names = [p.name for p in list_checkpoints(tmp_path / 'checkpoints')]
    assert any('_epoch1_' in n for n in names), names
    ref = make_learner(tmp_path / 'ref')
    set_seed(1)
    ref.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every='epoch')])
    learn = make_learner(tmp_path)
    set_seed(1)
    learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every='epoch')], resume='checkpoints')
    assert_identical(outcome(ref), outcome(learn))


def test_resume_from_learn_save_after_an_interrupted_fit_says_it_is_not_resumable(tmp_path):
    """A learn.save made after an interrupted fit holds no resumable point; resuming from it says so (not that
    the run 'already finished')."""
    learn = make_learner(tmp_path)
    set_seed(1)
    with pytest.raises(Exception):
        learn.fit_one_cycle(3, 1e-2, callbacks=[Interrupt(9)])
    f = learn.save('after_crash')
    learn = make_learner(tmp_path)
    with pytest.raises(ValueError) as e:
        learn.fit_one_cycle(3, 1e-2, resume=f)
    assert 'already finished' not in str(e.value) and 'not at a point a fit can resume from' in str(e.value)


# ---- resumable() as the smith notebook's final cell uses it ----------------------------------------------------------
def test_the_notebooks_final_cell_pattern_runs_twice_and_resumes_after_a_crash(tmp_path, monkeypatch):
    """notebooks/smith_cifar100.ipynb's final cell: `fit_one_cycle(..., resume=CKPT if resumable(CKPT) else None)`
    with a Checkpoint in CKPT. Executed again after a finished run it trains afresh; after a crash it resumes."""
    from functools import partial

    from minifast import Callback, Checkpoint, resumable
    monkeypatch.chdir(tmp_path)
    data = make_data()

    class Crash(Callback):
        order = 100  # after Checkpoint has written epoch 0

        def after_epoch(self, learn):
            raise RuntimeError('crash')

    def cell(n_epochs, *extra):
        final = Learner(data, make_mlp(), metrics=[accuracy], silent=True,
                        callback_fns=[partial(Checkpoint, path='ck', every='epoch')])
        final.fit_one_cycle(n_epochs, max_lr=1e-2, callbacks=list(extra), resume='ck' if resumable('ck') else None)
        return final
    assert not resumable('ck')
    cell(1)
    assert not resumable('ck')  # finished: the next execution trains afresh instead of raising
    cell(2)
    with pytest.raises(RuntimeError):
        cell(3, Crash())
    assert resumable('ck')
    resumed = cell(3)
    assert len(resumed.recorder.train_losses) == 3 and not resumable('ck')


# ---- the optimizer and the precision are part of what a resume must repeat (issue 16) ------------------------------
def _interrupted(path, setup=None):
    """The RUN's fit_one_cycle (AdamW unless `setup` changes the learner) stopped after step 9; returns the newest
    checkpoint file (epoch 1, batch 2)."""
    learn = make_learner(path)
    if setup is not None:
        setup(learn)
    set_seed(1)
    with pytest.raises(RuntimeError, match='simulated crash'):
        learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4), Interrupt(9)])
    return list_checkpoints(path / 'checkpoints')[-1]


def _sgd_learner(path):
    learn = make_learner(path)
    learn.opt_func = minifast.optim.SGD
    return learn


def _state(learn):
    return {'model': {k: v.clone() for k, v in learn.model.state_dict().items()},
            'opt': None if learn.opt is None else learn.opt.state_dict()}


def test_resume_with_another_optimizer_is_refused_before_anything_changes(tmp_path):
    file = _interrupted(tmp_path)
    learn = _sgd_learner(tmp_path)
    set_seed(2)
    learn.fit(1, 1e-2)  # an optimizer with moments, which the refused resume must leave as they are
    before = _state(learn)
    with pytest.raises(ValueError, match=re.escape(f'resume: {file} (epoch 1 of 3, batch 2 (8 steps)) does not '
                                                   'continue this fit: it was written by a fit with AdamW(betas=(0.9, '
                                                   '0.99), eps=1e-08') + r'.*\) and this learner has '
                                     + re.escape('SGD(momentum=0.9, dampening=0, nesterov=False')):
        learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4)], resume='checkpoints')
    assert_identical(before, _state(learn))
    assert type(learn.opt) is torch.optim.SGD and 'betas' not in learn.opt.param_groups[0]
    set_seed(3)
    learn.fit(1, 1e-2)  # usable afterwards: the same as a learner that never saw the checkpoint
    fresh = _sgd_learner(tmp_path / 'fresh')
    set_seed(2)
    fresh.fit(1, 1e-2)
    set_seed(3)
    fresh.fit(1, 1e-2)
    assert_identical(_state(fresh), _state(learn))


def test_resume_with_other_optimizer_settings_is_refused(tmp_path):
    _interrupted(tmp_path)
    for opt_func, why in ((partial(torch.optim.AdamW, betas=(0.9, 0.999)),
                           'AdamW(betas=(0.9, 0.99)) and this learner has AdamW(betas=(0.9, 0.999))'),
                          (partial(minifast.optim.AdamW, eps=1e-5),
                           'AdamW(eps=1e-08) and this learner has AdamW(eps=1e-05)'),
                          (partial(torch.optim.Adam, betas=(0.9, 0.99)), r'AdamW\(.*\) and this learner has Adam\(')):
        learn = make_learner(tmp_path)
        learn.opt_func = opt_func
        with pytest.raises(ValueError, match=why if '\\' in why else re.escape(why)):
            learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4)], resume='checkpoints')


def test_resume_with_another_precision_is_refused(tmp_path):
    (tmp_path / 'a').mkdir()
    _interrupted(tmp_path / 'a', lambda learn: learn.to_fp16())
    learn = make_learner(tmp_path / 'a')
    before = _state(learn)
    with pytest.raises(ValueError, match=re.escape('it was written in fp16 and this learner trains in fp32 '
                                                   '(learn.to_fp16() resumes it)')):
        learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4)], resume='checkpoints')
    assert_identical(before['model'], _state(learn)['model'])
    _interrupted(tmp_path / 'b')
    for kind in ('fp16', 'bf16'):
        learn = getattr(make_learner(tmp_path / 'b'), f'to_{kind}')()
        with pytest.raises(ValueError, match=re.escape(f'it was written in fp32 and this learner trains in {kind} '
                                                       '(learn.to_fp32() resumes it)')):
            learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4)], resume='checkpoints')
    learn = make_learner(tmp_path / 'a').to_fp16()  # the same precision resumes
    learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4)], resume='checkpoints')
    assert learn.train_iter == 18


def test_a_finished_run_with_another_optimizer_is_told_what_differs_not_that_it_finished(tmp_path):
    run(tmp_path)
    learn = _sgd_learner(tmp_path)
    with pytest.raises(ValueError, match=r'\(finished: 3 epochs, 18 steps\) does not continue this fit: it was '
                                         r'written by a fit with AdamW') as e:
        learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4)], resume='checkpoints')
    assert 'already finished' not in str(e.value)


def _as_old_format(folder):
    """Rewrite every checkpoint in `folder` as a minifast from before the optimizer and precision were in the
    signature wrote it."""
    for f in list_checkpoints(folder):
        st = torch.load(f, weights_only=True)
        assert {'optimizer', 'precision'} <= st['signature'].keys()
        del st['signature']['optimizer'], st['signature']['precision']
        torch.save(st, f)


def test_a_checkpoint_without_optimizer_and_precision_in_its_signature_still_resumes(tmp_path, reference):
    with pytest.raises(RuntimeError):
        run(tmp_path, extra=[Interrupt(9)])
    _as_old_format(tmp_path / 'checkpoints')
    assert_identical(reference, outcome(run(tmp_path, resume='checkpoints')))


def test_an_old_checkpoint_of_another_optimizer_is_refused_and_the_learner_put_back(tmp_path):
    file = _interrupted(tmp_path)
    _as_old_format(tmp_path / 'checkpoints')
    learn = _sgd_learner(tmp_path)
    set_seed(2)
    learn.fit(1, 1e-2)
    before = _state(learn)
    with pytest.raises(ValueError, match=re.escape(f"resume: {file}: its optimizer state is not one of this "
                                                   "learner's SGD (it lacks the settings ['dampening', 'momentum'")):
        learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4)], resume='checkpoints')
    assert_identical(before, _state(learn))
    learn.fit(1, 1e-2)  # before the fix: KeyError: 'momentum' in every later fit


# ---- issue 16: corrupt checkpoints, stale temp files, SIGKILL during writes ------------------------------------------
def _flip_tensor_byte(file):
    """Flip one byte in the data of the last tensor `file` stores (torch.load alone would return a changed value)."""
    import zipfile
    with zipfile.ZipFile(file) as z:
        info = max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.header_offset)
    raw = bytearray(file.read_bytes())
    start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], 'little') \
        + int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], 'little')
    raw[start + info.compress_size // 2] ^= 0x40
    file.write_bytes(raw)


def test_resume_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path, reference):
    with pytest.raises(Exception, match='simulated crash'):
        run(tmp_path, extra=[Interrupt(11)])
    older, newest = list_checkpoints(tmp_path / 'checkpoints')
    _flip_tensor_byte(newest)
    with pytest.warns(UserWarning, match=rf'skipped corrupt checkpoint.*{newest.name} is corrupt: checksum .*'
                                         rf'Resuming from the newest intact one, {older.name}'):
        resumed = run(tmp_path, resume='checkpoints')
    assert_identical(reference, outcome(resumed))  # from step 4 instead of 8: the same run all the same


def test_resume_with_every_checkpoint_corrupt_raises_naming_them(tmp_path):
    from minifast import CorruptCheckpointError
    with pytest.raises(Exception, match='simulated crash'):
        run(tmp_path, extra=[Interrupt(11)])
    files = list_checkpoints(tmp_path / 'checkpoints')
    for f in files:
        _flip_tensor_byte(f)
    with pytest.raises(CorruptCheckpointError, match=rf'no checkpoint in .*checkpoints is intact.*{files[1].name} is '
                                                     rf'corrupt.*{files[0].name} is corrupt'):
        run(tmp_path, resume='checkpoints')
    with pytest.raises(CorruptCheckpointError, match=files[1].name):  # a file named: no fallback
        run(tmp_path, resume=files[1])


def test_resume_removes_temp_files_of_killed_writers(tmp_path):
    from minifast.resume import find_checkpoint
    p = subprocess.Popen([sys.executable, '-c', 'pass'])
    p.wait()
    folder = tmp_path / 'checkpoints'
    folder.mkdir()
    stale, live = folder / f'.ckpt_00003_epoch1_step12.pth.p{p.pid}.abcdefgh.tmp', \
        folder / f'.ckpt_00004_epoch1_step12.pth.p{os.getpid()}.abcdefgh.tmp'
    stale.write_bytes(b'partial')
    live.write_bytes(b'partial')
    assert find_checkpoint(folder) is None
    assert not stale.exists() and live.exists()


# The child of the crash test: the run of resume_run.RUN, resumed from its folder, SIGKILLed at a chosen moment:
# 'step' after training step N; 'write' in the Nth file write, after a fraction of torch.save's bytes went out;
# 'replace' after the Nth write's temp file is complete, before os.replace; 'replaced' just after os.replace.
KILLED_CHILD = RUN + textwrap.dedent('''
    import io, sys
    folder, mode, nth, frac = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    real_save, real_replace, writes = torch.save, os.replace, [0]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def save(obj, f, *a, **k):
        writes[0] += 1
        if mode == 'write' and writes[0] == nth:
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            f.write(buf.getvalue()[:int(len(buf.getvalue()) * frac)])
            f.flush()
            die()
        return real_save(obj, f, *a, **k)

    def replace(src, dst):
        if mode == 'replace' and writes[0] == nth:
            die()
        real_replace(src, dst)
        if mode == 'replaced' and writes[0] == nth:
            die()

    torch.save, os.replace = save, replace
    run(folder, kill_at=nth if mode == 'step' else None, resume='checkpoints')
    ''')


def kill_child(tmp_path, mode, nth, frac=0.0):
    """Run KILLED_CHILD in `tmp_path` (resuming from its checkpoints); False when it ended before the moment came.
    A child killed while writing leaves its temp file (removed by the next save or resume)."""
    script = tmp_path / 'child.py'
    script.write_text(KILLED_CHILD)
    env = {**os.environ, 'PYTHONPATH': str(Path(minifast.__file__).parents[1])}
    p = subprocess.run([sys.executable, str(script), str(tmp_path), mode, str(nth), str(frac)], env=env,
                       capture_output=True, text=True, timeout=300)
    if p.returncode == 0:
        return False
    assert p.returncode == -signal.SIGKILL, p.stderr
    folder = tmp_path / 'checkpoints'
    temps = [f.name for f in folder.glob('.*.tmp')] if folder.exists() else []
    assert len(temps) == (mode in ('write', 'replace')), (mode, nth, temps)
    return True


def finish_and_compare(tmp_path, reference):
    """Resume the killed run to its end here (or, when its end state was written, read it): the result must be the
    uninterrupted run's, bit for bit, and no temp file is left."""
    from minifast import resumable
    from minifast.checkpoint import load_state
    folder = tmp_path / 'checkpoints'
    if list_checkpoints(folder) and not resumable(folder):  # finished: killed after its end state was written
        state = load_state(list_checkpoints(folder)[-1])
        assert_identical(reference['model'], state['model'], 'model')
        assert_identical(reference['opt'], state['opt'], 'opt')
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', 'resume: no checkpoint')
            assert_identical(reference, outcome(run(tmp_path, resume='checkpoints')))
    assert list(folder.glob('.*.tmp')) == []


@pytest.mark.slow
@pytest.mark.parametrize('seed', range(3))
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, reference, seed):
    import random
    rng = random.Random(seed)
    for _ in range(5):  # writes come at steps 4, 8, 12, 16 and the end: the 1st and 2nd of a resumed run exist
        kill = rng.choice([('write', rng.randint(1, 2), rng.random()), ('replace', rng.randint(1, 2), 0),
                           ('replaced', rng.randint(1, 2), 0), ('step', rng.randint(0, 17), 0)])
        if not kill_child(tmp_path, *kill):
            break
    finish_and_compare(tmp_path, reference)


def test_resumable_skips_a_corrupt_newest_checkpoint_as_resume_does(tmp_path):
    from minifast import resumable
    with pytest.raises(Exception, match='simulated crash'):
        run(tmp_path, extra=[Interrupt(11)])
    older, newest = list_checkpoints(tmp_path / 'checkpoints')
    _flip_tensor_byte(newest)
    with pytest.warns(UserWarning, match=rf'{newest.name} is corrupt.*newest intact one, {older.name}'):
        assert resumable(tmp_path / 'checkpoints')  # the notebook's `resume=X if resumable(X)` keeps working


def test_resume_from_a_folder_another_process_writes_is_refused_for_that_first(tmp_path):
    """The other run's newest file says 'finished'; the lock error comes first, before that file is judged."""
    from minifast.lock import FolderLockedError
    learn = make_learner(tmp_path)
    learn.fit(2, 1e-2, callbacks=[Checkpoint(path=tmp_path / 'checkpoints')])  # a finished run
    holder = lock_holder(tmp_path / 'checkpoints')  # a process holding the folder
    try:
        with pytest.raises(FolderLockedError, match=rf'fit\(resume=...\): the folder .*checkpoints is in use by '
                                                    rf'another process \(PID {holder.pid}\)'):
            make_learner(tmp_path).fit(2, 1e-2, resume=tmp_path / 'checkpoints')
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(ValueError, match='already finished'):  # the holder gone, the file is judged
        make_learner(tmp_path).fit(2, 1e-2, resume=tmp_path / 'checkpoints')
