"""Edge cases of checkpoints, resume, divergence and interrupts found in review (each failed before its fix)."""
import os
import warnings

import pytest
import torch

import minifast
from minifast import Callback, CancelTrainException
from minifast.callbacks.tracking import Checkpoint
from minifast.determinism import set_seed
from minifast.resume import list_checkpoints
from minifast.schedules import TrainingPhase

from resume_run import Interrupt, assert_identical, make_learner, outcome


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


def test_lr_find_records_no_non_finite_loss_with_the_gpu_default_guard(tmp_path):
    """README: 'lr_find stops at the first non-finite loss (also with stop_div=False)', also with the guard as it is
    on a GPU (check_every=32, simulated here on CPU), and records no non-finite loss."""
    from minifast.callbacks.tracking import DivergenceGuard
    learn = make_learner(tmp_path)
    learn.guard = DivergenceGuard(check_every=32)
    res = learn.lr_find(start_lr=1e-2, end_lr=1e12, num_it=100, stop_div=False)
    raw = learn.recorder.raw_losses
    assert res.diverged
    assert all(v == v and abs(v) != float('inf') for v in raw), [v for v in raw if not (v == v)][:3]


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
