"""Edge cases of grid_search and minifast smith found in review (each failed before its fix)."""
import argparse
import json

import pytest
from torch import nn

from minifast import Learner, accuracy
from minifast.grid import diagnose, grid_search, read_log
from minifast import smith

from conftest import make_data, make_mlp


def _learner(data=None, **kw):
    return Learner(data if data is not None else make_data(), make_mlp(), metrics=[accuracy], **kw)


# ------------------------------------------------------------------------------------------------ smith: final fit
def test_smith_final_fit_with_new_flags_does_not_reuse_old_finished_checkpoint(tmp_path):
    """A finished final fit of 2 epochs leaves a finished checkpoint in checkpoints/. Re-running with --epochs 3
    (a different final key) must train the 3-epoch fit, not pass the old 2-epoch state off as it."""
    log = tmp_path / 'runs.jsonl'
    mk = lambda: _learner(silent=True)  # noqa: E731
    rec1, _, _ = smith.step_final(mk, tmp_path, 0, 2, 1e-2, (0.95, 0.85), 1e-4, log)
    assert len(rec1['epochs']) == 2
    rec2, _, what = smith.step_final(mk, tmp_path, 0, 3, 1e-2, (0.95, 0.85), 1e-4, log)
    assert rec2['config']['epochs'] == 3
    assert len(rec2['epochs']) == 3, f'record claims a 3-epoch fit but holds {len(rec2["epochs"])} epochs ({what})'


def test_smith_final_fit_with_new_wd_is_trained_with_that_wd(tmp_path):
    """Same as above with a changed weight decay (e.g. another wd chosen after --data/--seed changes)."""
    log = tmp_path / 'runs.jsonl'
    mk = lambda: _learner(silent=True)  # noqa: E731
    smith.step_final(mk, tmp_path / 'a', 0, 2, 1e-2, (0.95, 0.85), 1e-4, tmp_path / 'a.jsonl')
    ref, _, _ = smith.step_final(mk, tmp_path / 'b', 0, 2, 1e-2, (0.95, 0.85), 1e-1, tmp_path / 'b.jsonl')
    smith.step_final(mk, tmp_path / 'c', 0, 2, 1e-2, (0.95, 0.85), 1e-4, log)
    rec, _, what = smith.step_final(mk, tmp_path / 'c', 0, 2, 1e-2, (0.95, 0.85), 1e-1, log)
    assert rec['final']['train_loss'] == pytest.approx(ref['final']['train_loss']), what


# ------------------------------------------------------------------------------------------------ smith: caches
def _tiny_smith(monkeypatch):
    """smith.run with a tiny MLP task in place of images and ResNets (the steps and caches are the real ones)."""
    def fake_data(args, s):
        data = make_data(n_train=s['n_train'], n_valid=32, bs=16, n_out=6, seed=args.seed)
        data.device = 'cpu'  # images' DataBunch has it; the tensor one does not
        return data, f"tiny set ({s['n_train']} training rows)"
    monkeypatch.setattr(smith, 'make_data', fake_data)
    monkeypatch.setattr(smith, '_model_fn', lambda arch, c: (lambda: make_mlp(n_out=c)))
    monkeypatch.setattr(smith, 'step_data', lambda data, out: None)


def _args(out, **kw):
    a = dict(data=None, data_root='data', arch=None, epochs=3, grid_epochs=2, bs=None, n_train=64, n_valid=None,
             num_it=8, max_lr=1e-2, size=32, out=str(out), seed=0, quiet=True, quick=True)
    a.update(kw)
    return argparse.Namespace(**a)


def test_smith_reused_out_with_other_data_retrains(tmp_path, monkeypatch, capsys):
    """--out reused with other data (here --n-train; likewise --data, --arch, --bs, --size) and the same max_lr
    (given with --max-lr, or the same lr_find grid point): the grid runs and the final fit are trained again on the
    new data, not taken from the log of the old data."""
    _tiny_smith(monkeypatch)
    assert smith.run(_args(tmp_path, n_train=64)) == 0
    n1 = len(read_log(tmp_path / 'runs.jsonl'))
    capsys.readouterr()
    assert smith.run(_args(tmp_path, n_train=128)) == 0
    out = capsys.readouterr().out
    n2 = len(read_log(tmp_path / 'runs.jsonl'))
    assert n2 > n1, 'nothing was trained on the new data:\n' + out


# ------------------------------------------------------------------------------------------------ smith: divergence
def _diverging_learner():
    data = make_data()
    return Learner(data, make_mlp(), loss_func=lambda out, y: out.sum() * float('nan'), metrics=[accuracy],
                   silent=True)


def test_smith_momentum_step_survives_diverged_runs(tmp_path):
    """A max_lr that makes both momentum runs diverge (the grid records them as 'diverged' and goes on): the step
    keeps its default and says so, instead of crashing on `GridResult.best: no finished run`."""
    smith.step_momentum(_diverging_learner, tmp_path, 0, 1, 1e-2, tmp_path / 'runs.jsonl', True)


# ------------------------------------------------------------------------------------------------ grid_search
def test_grid_resumed_run_matches_uninterrupted_run(tmp_path):
    """Re-running a grid after an interruption gives the records an uninterrupted run gives, also with a
    make_learner kwarg that changes part of the model (such a config keeps its own weights, never a partial copy)."""
    data = make_data()

    def make_learner(hidden=16):
        model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 8), nn.ReLU(), nn.Linear(8, 3))
        return Learner(data, model, metrics=[accuracy], silent=True)

    grid = {'hidden': [16, 32]}
    full = grid_search(make_learner, grid, epochs=1, log=tmp_path / 'full.jsonl')
    part = tmp_path / 'part.jsonl'
    part.write_text(json.dumps(full.runs[0]) + '\n')  # killed while training the second config
    resumed = grid_search(make_learner, grid, epochs=1, log=part)
    assert resumed.runs[1]['steps']['loss'] == full.runs[1]['steps']['loss']


def test_diagnose_names_the_epoch_of_the_minimum():
    """The overfitting sentence names the epoch of the minimum, also when an earlier value is missing."""
    word, why = diagnose([None, 1.0, 0.5, 0.9])
    assert word == 'overfitting'
    assert '(epoch 2)' in why, why


# ------------------------------------------------------------------------------------------------ notebooks
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


def test_smith_with_a_relative_out_keeps_everything_in_that_folder(tmp_path, monkeypatch):
    """`minifast smith` (default --out runs/smith, relative): checkpoints and snapshots land in the run folder
    itself (learn.path is that folder, and Checkpoint resolves relative paths against it)."""
    _tiny_smith(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert smith.run(_args('runs/x')) == 0
    run = tmp_path / 'runs' / 'x'
    assert list(run.glob('checkpoints/*/ckpt_*.pth')) and list(run.glob('snapshots/*/snapshot_*.pth'))
    assert not (run / 'runs').exists()
