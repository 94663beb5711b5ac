"""`minifast smith`: Smith's workflow end to end on tiny settings, its outputs, its run log, and re-running it; its
steps (final fit, momentum) and caches on a tiny MLP task."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import minifast
from minifast import Learner, accuracy, smith
from minifast.cli import main
from minifast.grid import read_log
from minifast.lock import LOCK_FILE, holds
from conftest import make_data, make_mlp
from helpers import lock_holder, patch_tiny_task


PNGS = ('batch.png', 'lr_find.png', 'superconvergence.png', 'momentum.png', 'wd.png', 'wd_fine.png',
        'final_losses.png', 'final_lr.png', 'final_metrics.png', 'interpolation.png')
# 1cycle vs constant, the second momentum pair (the first is step 3's 1cycle run), four wd values, two half-decade
# neighbours
N_GRID = 2 + 1 + 4 + 2


def _records(out):
    return [json.loads(line) for line in (out / 'runs.jsonl').read_text().splitlines() if line.strip()]


@pytest.fixture(scope='module')
def smith_run(tmp_path_factory):
    """Run `minifast smith --quick` twice in one folder; the outputs and timings of both."""
    out = tmp_path_factory.mktemp('smith')
    argv = ['smith', '--quick', '--quiet', '--out', str(out)]
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, '-m', 'minifast', *argv], capture_output=True, text=True,
                              env=_env())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs.append({'out': proc.stdout, 'seconds': time.perf_counter() - t0,
                     'log': (out / 'runs.jsonl').read_text()})
    return out, runs


def _env():
    """The subprocess imports this checkout's minifast, installed or not."""
    root = str(Path(minifast.__file__).parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')]))
    return {**os.environ, 'MPLBACKEND': 'Agg', 'PYTHONPATH': path}


def test_smith_writes_every_promised_file(smith_run):
    out, _ = smith_run
    for name in (*PNGS, 'runs.jsonl', 'report.md', 'lr_find.json', 'interpolation.json'):
        assert (out / name).stat().st_size > 0, name
    assert list((out / 'snapshots').glob('*/snapshot_*.pth')), 'no weight snapshots'
    assert list((out / 'checkpoints').glob('*/ckpt_*.pth')), 'no checkpoints'


def test_report_links_every_plot_and_states_the_choices(smith_run):
    out, _ = smith_run
    report = (out / 'report.md').read_text()
    linked = set(re.findall(r'!\[[^\]]*\]\(([^)]+)\)', report))
    assert set(PNGS) <= linked, set(PNGS) - linked
    for link in linked:
        assert (out / link).exists(), link  # relative links that resolve from the run folder
    for words in ('max_lr =', 'valley', '1cycle', 'Chosen moms', 'Chosen wd', 'half-decade', 'Barrier',
                  'Diagnosis', 'policy=one_cycle', 'runs.jsonl'):
        assert words in report, words


def test_run_log_has_one_record_per_grid_config_and_the_final_run(smith_run):
    out, _ = smith_run
    recs = _records(out)
    assert len(recs) == N_GRID + 1
    finals = [r for r in recs if r['name'] == 'final']
    assert len(finals) == 1 and finals[0]['config']['final'] is True
    names = [r['name'] for r in recs]
    assert len(set(names)) == len(names), names
    assert any(r['config'].get('policy') == 'constant' for r in recs)
    assert sum('moms' in r['config'] and 'wd' not in r['config'] for r in recs) == 2
    assert sum('wd' in r['config'] and not r['config'].get('final') for r in recs) == 6
    for r in recs:
        assert r['seed'] == 0 and r['status'] == 'done', r['name']
        n_ep = r['config']['epochs'] if r['config'].get('final') else 2
        assert [e['epoch'] for e in r['epochs']] == list(range(n_ep)), r['name']
        for e in r['epochs']:
            assert {'train_loss', 'valid_loss', 'accuracy', 'top_k_accuracy'} <= set(e), r['name']
        steps = r['steps']
        n = len(steps['lr'])
        assert n > 0 and n % n_ep == 0, r['name']
        assert len(steps['mom']) == n and len(steps['loss']) == n, r['name']


def test_second_invocation_trains_nothing_and_is_faster(smith_run):
    _, (first, second) = smith_run
    assert second['log'] == first['log'], 'the second run appended records'
    out = second['out']
    assert '0 run(s) trained' in out and 'trained 0' not in out
    assert 'LR range test skipped' in out and 'final fit skipped' in out and 'interpolation skipped' in out
    # every grid run of steps 3 to 5 is skipped: N_GRID records, one of them used by steps 3 and 4
    assert re.search(rf'0 grid run\(s\) trained, {N_GRID + 1} skipped', out), out
    assert second['seconds'] < 0.6 * first['seconds'], (first['seconds'], second['seconds'])


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(['smith', '--help'])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ('--data', '--arch', '--epochs', '--bs', '--out', '--seed', '--quiet', '--quick'):
        assert flag in text, flag


def test_python_m_minifast_smith_help():
    proc = subprocess.run([sys.executable, '-m', 'minifast', 'smith', '--help'], capture_output=True, text=True,
                          env=_env())
    assert proc.returncode == 0, proc.stderr
    assert '--quick' in proc.stdout and 'minifast smith' in proc.stdout


@pytest.mark.parametrize('flag, value, least', [('--epochs', '1', 2), ('--grid-epochs', '0', 1), ('--bs', '0', 1),
                                                ('--num-it', '1', 2), ('--n-train', '0', 1)])
def test_too_small_sizes_are_refused_before_any_step(tmp_path, flag, value, least):
    """`--epochs 1` used to run six steps and then fail at step 7 (one snapshot cannot be interpolated)."""
    with pytest.raises(SystemExit) as e:
        main(['smith', '--quick', '--quiet', '--out', str(tmp_path / 'run'), flag, value])
    assert f'{flag} {value}: it must be at least {least}' in str(e.value.code)
    assert not (tmp_path / 'run').exists()


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
    patch_tiny_task(monkeypatch, smith, 'smith')
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


def test_smith_with_a_relative_out_keeps_everything_in_that_folder(tmp_path, monkeypatch):
    """`minifast smith` (default --out runs/smith, relative): checkpoints and snapshots land in the run folder
    itself (learn.path is that folder, and Checkpoint resolves relative paths against it)."""
    _tiny_smith(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert smith.run(_args('runs/x')) == 0
    run = tmp_path / 'runs' / 'x'
    assert list(run.glob('checkpoints/*/ckpt_*.pth')) and list(run.glob('snapshots/*/snapshot_*.pth'))
    assert not (run / 'runs').exists()


# ------------------------------------------------------------------------------------------------ smith: one process
def test_smith_refuses_a_run_folder_another_process_holds_before_any_step(tmp_path, monkeypatch):
    """Two `minifast smith --out X` at once both trained everything (duplicated records, the final fit twice)."""
    out = tmp_path / 'run'
    made = []
    monkeypatch.setattr(smith, 'make_data', lambda *a: made.append(a))
    child = lock_holder(out)
    try:
        with pytest.raises(SystemExit) as e:
            main(['smith', '--quick', '--quiet', '--out', str(out)])
        msg = str(e.value.code)
        assert str(out) in msg and f'PID {child.pid}' in msg and 'another process' in msg
        assert not made and sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        child.kill()
        child.wait()


def test_smith_releases_its_run_folder_when_a_step_fails(tmp_path, monkeypatch):
    _tiny_smith(monkeypatch)
    seen = []

    def failing_lr_find(*a, **k):
        seen.append(holds(tmp_path))
        raise RuntimeError('boom')
    monkeypatch.setattr(smith, 'step_lr_find', failing_lr_find)
    with pytest.raises(RuntimeError, match='boom'):
        smith.run(_args(tmp_path))
    assert seen == [1] and holds(tmp_path) == 0 and not (tmp_path / LOCK_FILE).exists()


def test_smith_json_writes_use_a_temp_file_of_their_own_and_leave_none_on_failure(tmp_path, monkeypatch):
    """Writes used a fixed `<file>.tmp`, shared by two writers, and left it behind when the replace failed."""
    file = tmp_path / 'lr_find.json'
    used, real = [], os.replace
    monkeypatch.setattr(os, 'replace', lambda a, b: (used.append(Path(a)), real(a, b))[1])
    smith._write_json(file, {'a': 1})
    smith._write_json(file, {'a': 2})
    assert len(set(used)) == 2 and all(p.parent == tmp_path and p.name != 'lr_find.json.tmp' for p in used)

    def failing(a, b):
        raise OSError('replace failed (simulated)')
    monkeypatch.setattr(os, 'replace', failing)
    with pytest.raises(OSError, match='simulated'):
        smith._write_json(file, {'a': 3})
    assert json.loads(file.read_text()) == {'a': 2} and [p.name for p in tmp_path.iterdir()] == ['lr_find.json']


# ------------------------------------------------------------------------------------------------ smith: garbled caches
def _garble_json(file, fn):
    """Rewrite the JSON `file` as fn(its object) returns it (text: written as is)."""
    obj = fn(json.loads(file.read_text()))
    file.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _set(d, k, v):
    d[k] = v
    return d


def _drop(d, k):
    del d[k]
    return d


LR_GARBLED = {
    'a list, not an object': lambda info: [info],
    'valley a string': lambda info: _set(info, 'valley', '0.01'),
    'valley missing': lambda info: _drop(info, 'valley'),
    'steep a list': lambda info: _set(info, 'steep', [0.01]),
    'truncated': lambda info: json.dumps(info)[:40],
    'key a string': lambda info: _set(info, 'key', 'x'),
}


@pytest.mark.parametrize('how', list(LR_GARBLED))
def test_smith_garbled_lr_find_json_is_recomputed_with_a_warning(tmp_path, how):
    mk, key = (lambda: _learner(silent=True)), {'k': 1}
    info, skipped = smith.step_lr_find(mk, tmp_path, 0, 8, key)
    _garble_json(tmp_path / 'lr_find.json', LR_GARBLED[how])
    with pytest.warns(UserWarning, match=re.escape(str(tmp_path / 'lr_find.json'))):
        again, skipped = smith.step_lr_find(mk, tmp_path, 0, 8, key)
    assert not skipped and again['chosen'] == info['chosen'] and again['steep'] == info['steep']
    assert smith.step_lr_find(mk, tmp_path, 0, 8, key)[1], 'the recomputed cache was not written'


@pytest.fixture(scope='module')
def final_run(tmp_path_factory):
    """A finished tiny final fit (snapshots, checkpoints, runs.jsonl) and its interpolation.json."""
    out = tmp_path_factory.mktemp('final')
    mk = lambda: _learner(silent=True)  # noqa: E731
    rec, learn, _ = smith.step_final(mk, out, 0, 2, 1e-2, (0.95, 0.85), 1e-4, out / 'runs.jsonl')
    smith.step_interpolation(mk, learn, out, 2, 3, 1, rec['key'])
    return out, rec


INTERP_GARBLED = {
    'values a list': lambda c: _set(c, 'values', []),
    'an alpha a string': lambda c: _set(c, 'alphas', ['a', *c['alphas'][1:]]),
    'a row short': lambda c: _set(c, 'values', {k: v[:-1] for k, v in c['values'].items()}),
    'columns missing': lambda c: _drop(c, 'columns'),
    'a loss a string': lambda c: _set(c, 'values', {k: [['x', *r[1:]] for r in v] for k, v in c['values'].items()}),
    'truncated': lambda c: json.dumps(c)[:-3],
}


@pytest.mark.parametrize('how', list(INTERP_GARBLED))
def test_smith_garbled_interpolation_json_is_recomputed_with_a_warning(final_run, tmp_path, how):
    src, rec = final_run
    out = tmp_path / 'out'
    shutil.copytree(src, out)
    ref = json.loads((out / 'interpolation.json').read_text())
    _garble_json(out / 'interpolation.json', INTERP_GARBLED[how])
    mk = lambda: _learner(silent=True)  # noqa: E731
    with pytest.warns(UserWarning, match=re.escape(str(out / 'interpolation.json'))):
        res, _, cached = smith.step_interpolation(mk, None, out, 2, 3, 1, rec['key'])
    assert not cached and res.summary()
    new = json.loads((out / 'interpolation.json').read_text())  # rewritten whole, with the same shape
    assert new.keys() == ref.keys() and new['alphas'] == ref['alphas'] and new['columns'] == ref['columns']
    assert {k: len(v) for k, v in new['values'].items()} == {k: len(v) for k, v in ref['values'].items()}
    assert smith.step_interpolation(mk, None, out, 2, 3, 1, rec['key'])[2]


@pytest.fixture(scope='module')
def momentum_log(tmp_path_factory):
    """runs.jsonl of a tiny momentum step (two 1-epoch runs) and that step's chosen moms."""
    out = tmp_path_factory.mktemp('momentum')
    _, moms, trained, _ = smith.step_momentum(lambda: _learner(silent=True), out, 0, 1, 1e-2, out / 'runs.jsonl',
                                              True)
    assert trained == 2
    return out / 'runs.jsonl', moms


RECORD_GARBLED = {
    'a list, not an object': lambda r: [1, 2],
    'final a list': lambda r: _set(r, 'final', []),
    'a final loss a string': lambda r: _set(r, 'final', {**r['final'], 'valid_loss': '0.5'}),
    'status missing': lambda r: _drop(r, 'status'),
    'epochs a string': lambda r: _set(r, 'epochs', 'x'),
    'config not its key': lambda r: _set(r, 'config', {'moms': 'ab'}),
}


@pytest.mark.parametrize('how', list(RECORD_GARBLED))
def test_smith_garbled_run_record_is_ignored_with_a_warning_and_trained_again(momentum_log, tmp_path, how):
    src, moms = momentum_log
    log = tmp_path / 'runs.jsonl'
    lines = src.read_text().splitlines()
    lines[0] = json.dumps(RECORD_GARBLED[how](json.loads(lines[0])))
    log.write_text('\n'.join(lines) + '\n')
    with pytest.warns(UserWarning, match=re.escape(f'{log}: line 1 is not a run record')):
        res, again, trained, skipped = smith.step_momentum(lambda: _learner(silent=True), tmp_path, 0, 1, 1e-2, log,
                                                           True)
    assert (trained, skipped) == (1, 1) and again == moms and res.table()
    assert len(read_log(log)) == 3  # the bad line stays (nothing is deleted); the run's new record follows it


def test_smith_garbled_final_record_is_ignored_with_a_warning(final_run, tmp_path):
    src, rec = final_run
    out = tmp_path / 'out'
    shutil.copytree(src, out)
    log = out / 'runs.jsonl'
    log.write_text(json.dumps({**rec, 'final': 'x'}) + '\n')
    mk = lambda: _learner(silent=True)  # noqa: E731
    with pytest.warns(UserWarning, match=re.escape(f'{log}: line 1 is not a run record')):
        again, _, what = smith.step_final(mk, out, 0, 2, 1e-2, (0.95, 0.85), 1e-4, log)
    assert 'already finished' in what and again['final'] == rec['final']  # taken from its finished checkpoint


def test_smith_removes_json_temp_files_of_killed_writers_only(tmp_path, monkeypatch):
    _tiny_smith(monkeypatch)
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    stale = tmp_path / f'.lr_find.json.{int(dead.stdout)}.0123abcd.tmp'
    live = tmp_path / f'.interpolation.json.{os.getpid()}.0123abcd.tmp'  # a writer still running: kept
    other = tmp_path / f'.notes.txt.{int(dead.stdout)}.0123abcd.tmp'  # not one of smith's: kept
    for p in (stale, live, other):
        p.write_text('{"cut sho')
    monkeypatch.setattr(smith, 'make_data', lambda *a: (_ for _ in ()).throw(RuntimeError('stop after cleanup')))
    with pytest.raises(RuntimeError, match='stop after cleanup'):
        smith.run(_args(tmp_path))
    assert not stale.exists() and live.exists() and other.exists()


# ------------------------------------------------------------------------------------------------ smith: a clear run
def test_step_lines_say_what_took_how_long_and_what_was_reused(smith_run):
    """'final fit: trained 8 epochs' printed before training; seconds had 4 decimals; a re-run's reused steps
    looked like ones that ran."""
    _, (first, second) = smith_run
    lines = [ln for ln in first['out'].splitlines() if ln.startswith('smith:')]
    start = next(i for i, ln in enumerate(lines) if ln.startswith('smith: 6/7 final fit: training 3 epochs'))
    done = next(i for i, ln in enumerate(lines) if re.match(r'smith: 6/7 final fit trained 3 epochs in \d+\.\d s:', ln))
    assert start < done and not any('final fit: trained' in ln for ln in lines)
    for step in ('1/7 data', '2/7 LR range test', '7/7 interpolation'):
        assert re.search(rf'{step}.*took \d+\.\d s', first['out']), step
    assert not re.search(r'\d\.\d{3,} ?s\b', '\n'.join(lines))  # no 12.3456 s
    done = re.search(r'smith: done in (\d+\.\d) s \(this invocation: (setup \d+\.\d s, data \d+\.\d s, LR range '
                     r'test \d+\.\d s, grids \d+\.\d s, final fit \d+\.\d s, interpolation \d+\.\d s, report '
                     r'\d+\.\d s)\)', first['out'])
    assert done, first['out']
    parts = sum(float(x) for x in re.findall(r'(\d+\.\d) s', done[2]))  # the parts account for the whole time
    assert float(done[1]) - 0.5 <= parts <= float(done[1]) + 0.1 * 7, (done[0], parts)
    for words in ('2/7 LR range test skipped (reused from lr_find.json)',
                  '6/7 final fit skipped (reused from runs.jsonl',
                  '7/7 interpolation skipped (reused from interpolation.json)',
                  'LR range test reused, grids reused, final fit reused, interpolation reused',
                  f'0 grid run(s) trained, {N_GRID + 1} skipped (reused from'):
        assert words in second['out'], words


def test_smith_final_and_interpolation_plots_are_titled(tmp_path, monkeypatch):
    titles = {}
    real = smith.save_plot
    monkeypatch.setattr(smith, 'save_plot', lambda fig, file, title: (titles.update({file.name: title}),
                                                                      real(fig, file, title)))
    mk = lambda: _learner(silent=True)  # noqa: E731
    rec, learn, _ = smith.step_final(mk, tmp_path, 0, 3, 1e-2, (0.95, 0.85), 1e-4, tmp_path / 'runs.jsonl')
    smith.step_interpolation(mk, learn, tmp_path, 3, 5, 1, rec['key'])
    assert sorted(titles) == ['final_losses.png', 'final_lr.png', 'final_metrics.png', 'interpolation.png']
    assert all('fit_one_cycle(3, max_lr=0.01, moms=(0.95, 0.85), wd=0.0001)' in titles[f] for f in smith.FINAL_PNGS)
    assert 'w1 = after epoch 2, w2 = after epoch 0' not in titles['interpolation.png']  # w1 is the earlier one
    assert 'w1 = after epoch 0, w2 = after epoch 2' in titles['interpolation.png']


def test_smith_workflow_metrics_leave_out_top_k_with_few_classes(tmp_path):
    data = make_data(n_out=5)
    learn = smith.learner_factory(data, lambda: make_mlp(n_out=5), tmp_path, True)()
    assert learn.metrics == [accuracy]
    data = make_data(n_out=6)
    assert [m.__name__ for m in smith.learner_factory(data, lambda: make_mlp(n_out=6), tmp_path, True)().metrics] \
        == ['accuracy', 'top_k_accuracy']


def test_smith_compile_builds_compiled_learners_and_keeps_its_runs_apart(tmp_path):
    data = make_data()
    plain, fast = (smith.learner_factory(data, make_mlp, tmp_path, True, compile=c) for c in (False, True))
    assert plain().compile is False and plain().stepper.precision == 'fp32'
    assert fast().compile is True and fast().stepper.precision == 'fp32'  # on CPU: no CUDA graphs, no bf16
    assert smith._compiled(plain) == '' and smith._compiled(fast) == ', compiled'
    tags = []
    for compile in (False, True):
        smith._set_tag(_args(tmp_path, compile=compile), {'arch': 'resnet8', 'bs': 32}, 'data')
        tags.append(dict(smith.TAG))
    assert tags[0] == {'data': 'data', 'arch': 'resnet8', 'bs': 32, 'size': 32}  # the keys of runs made without it
    assert tags[1] == {**tags[0], 'compile': True}  # bf16 on a GPU trains other numbers: not reused across


def test_smith_compile_compiles_once_for_every_run(tmp_path, monkeypatch):
    """`smith --compile` makes a new model for every run (17 in --quick); dynamo compiles the first model's
    training and validation forwards and every later model of the architecture reuses them."""
    import torch
    from torch._dynamo.utils import counters
    made = []
    real = smith.Learner

    def counting(*a, **kw):
        made.append(kw.get('compile'))
        return real(*a, **kw)
    monkeypatch.setattr(smith, 'Learner', counting)
    torch._dynamo.reset()
    counters.clear()
    try:
        assert smith.run(_args(tmp_path, compile=True)) == 0
        graphs = counters['stats']['unique_graphs']
    finally:
        torch._dynamo.reset()
    assert len(made) >= 10 and set(made) == {True}
    assert 1 <= graphs <= 3, graphs  # training and validation graphs, not one per run
    assert 'device cpu, compiled;' in (tmp_path / 'report.md').read_text()


# ---- data errors: one line naming the problem, with a fix that exists on the command line ------------------------
def _smith_exit(tmp_path, *flags):
    with pytest.raises(SystemExit) as e:
        main(['smith', '--quick', '--quiet', '--out', str(tmp_path / 'run'), *flags])
    msg = str(e.value.code)
    assert '\n' not in msg, msg
    return msg


def _image_folder(root, train_classes=(0, 1, 2), valid_classes=(0, 1, 2), n=4):
    import torch
    g = torch.Generator().manual_seed(0)
    names = ['ant', 'bee', 'cat', 'dog']
    for split, cls in (('train', train_classes), ('valid', valid_classes)):
        y = torch.tensor([c for c in cls for _ in range(n)])
        minifast.write_image_folder(root, torch.randint(0, 256, (len(y), 3, 8, 8), generator=g, dtype=torch.uint8),
                                    y, names, split=split)
    return root


def test_smith_data_folder_missing_or_not_a_folder(tmp_path):
    msg = _smith_exit(tmp_path, '--data', str(tmp_path / 'nope'))
    assert msg == (f"smith: --data {tmp_path / 'nope'}: no such folder (give 'cifar10', 'cifar100' or a folder of "
                   f"class sub-folders)")
    (tmp_path / 'file.txt').write_text('x')
    assert 'not a folder' in _smith_exit(tmp_path, '--data', str(tmp_path / 'file.txt'))


def test_smith_corrupt_image_names_the_file_and_offers_ignore_errors(tmp_path, monkeypatch):
    monkeypatch.setenv('MINIFAST_CACHE', str(tmp_path / 'cache'))
    root = _image_folder(tmp_path / 'imgs')
    bad = root / 'train' / 'bee' / '05.png'
    bad.write_bytes(b'not a png')
    msg = _smith_exit(tmp_path, '--data', str(root))
    assert msg.startswith(f'smith: --data {root}: cannot read image {bad} (') and msg.endswith(
        'add --ignore-errors to skip such files')
    assert 'ignore_errors=True' not in msg
    args = argparse.Namespace(data=str(root), seed=0, size=8, ignore_errors=True, debug=False)
    with pytest.warns(UserWarning, match='skipped 1 unreadable'):
        data, what = smith.make_data(args, {'bs': 4})
    assert len(data.train_ds) == 11 and '11 training images' in what
    with pytest.raises(minifast.data.cache.ImageDecodeError):  # --debug: the library's own error and traceback
        smith.make_data(argparse.Namespace(data=str(root), seed=0, size=8, debug=True), {'bs': 4})


def test_smith_validation_classes_missing_from_training_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv('MINIFAST_CACHE', str(tmp_path / 'cache'))
    root = _image_folder(tmp_path / 'imgs', train_classes=(0, 1), valid_classes=(3,))
    msg = _smith_exit(tmp_path, '--data', str(root))
    assert msg.startswith(f'smith: --data {root}: every validation image') and "'dog' (4 images)" in msg
    assert 'label_from_folder' not in msg


def test_smith_bad_cifar_file_names_it(tmp_path):
    import torch
    g = torch.Generator().manual_seed(0)
    d = {k: torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8) for k, n in
         (('x_train', 10), ('x_valid', 5))}
    minifast.write_cifar(tmp_path / 'data', 'cifar10', d['x_train'], torch.arange(10) % 10, d['x_valid'],
                         torch.arange(5), [f'c{i}' for i in range(10)])
    bad = tmp_path / 'data' / 'cifar-10-batches-py' / 'data_batch_3'
    bad.write_bytes(bad.read_bytes()[:100])
    msg = _smith_exit(tmp_path, '--data', 'cifar10', '--data-root', str(tmp_path / 'data'))
    assert msg.startswith(f'smith: --data cifar10: {bad}: cannot read this CIFAR pickle')


def test_smith_cifar_download_failure_is_one_line_without_download_true(tmp_path, monkeypatch):
    import types
    tv = types.ModuleType('torchvision')

    def offline(root, train=True, download=False):
        raise OSError('<urlopen error [Errno -3] Temporary failure in name resolution>')
    tv.datasets = types.SimpleNamespace(CIFAR10=offline)
    monkeypatch.setitem(sys.modules, 'torchvision', tv)
    msg = _smith_exit(tmp_path, '--data', 'cifar10', '--data-root', str(tmp_path / 'data'))
    folder = tmp_path / 'data' / 'cifar-10-batches-py'
    assert msg.startswith('smith: --data cifar10: the download failed (OSError: <urlopen error [Errno -3] Temporary '
                          f'failure in name resolution>) and {folder} lacks data_batch_1, data_batch_2, data_batch_3 '
                          'and 4 more files; get "CIFAR-10 python version" from https://')
    assert msg.endswith(f'extract it into {tmp_path / "data"}, or give --data-root the folder that holds '
                        'cifar-10-batches-py')
    assert 'download=True' not in msg


# ---- Ctrl-C: one line, exit 130, and the next run resumes -------------------------------------------------------
def test_smith_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    _tiny_smith(monkeypatch)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(smith, 'step_final', interrupted)
    argv = ['smith', '--quick', '--quiet', '--out', str(tmp_path), '--max-lr', '1e-2', '--n-train', '64',
            '--num-it', '8']
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ['smith: interrupted; run the same command again to resume (finished steps, '
                                        'grid runs and checkpoints are kept)']
    assert holds(tmp_path) == 0 and not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(KeyboardInterrupt):
        main([*argv, '--debug'])


SIGINT_CHILD = '''
import os, sys, time
sys.path.insert(0, {tests!r})
from conftest import make_data, make_mlp
from minifast import smith
from minifast.cli import main

def fake_data(args, s, cmd='smith'):
    data = make_data(n_train=s['n_train'], n_valid=32, bs=16, n_out=6, seed=args.seed)
    data.device = 'cpu'
    return data, 'tiny set'
smith.make_data = fake_data
smith.model_fn = lambda arch, c: (lambda: make_mlp(n_out=c))
smith.step_data = lambda data, out: None

class WaitForCtrlC(smith.WeightSnapshots):
    """In the final fit, at epoch 1's second batch, waits for the parent's SIGINT (the first press sets a flag)."""
    def after_batch(self, learn):
        if os.environ.get('WAIT') and learn.training and learn.epoch == 1 and learn.iter == 1:
            print('WAITING', flush=True)
            t = time.time()
            while not learn.ctrl_c.requested and time.time() - t < 60:
                time.sleep(0.01)
smith.WeightSnapshots = WaitForCtrlC
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow  # two processes that import torch (about 12 s here); test_smith_ctrl_c_is_one_line... is the fast one
def test_smith_sigint_prints_one_line_and_the_next_run_resumes(tmp_path):
    """A real SIGINT during the final fit: one line on stderr, exit 130, no traceback; the same command again
    reuses the LR range test and the grid runs and resumes the final fit from its checkpoint."""
    import signal
    code = SIGINT_CHILD.format(tests=str(Path(__file__).parent))
    argv = [sys.executable, '-c', code, 'smith', '--quick', '--out', str(tmp_path), '--n-train', '64', '--num-it', '8',
            '--grid-epochs', '1', '--epochs', '3']
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**_env(), 'WAIT': '1'})
    out = []
    for line in child.stdout:
        out.append(line)
        if line.strip() == 'WAITING':
            child.send_signal(signal.SIGINT)
    err = child.stderr.read()
    assert child.wait(60) == 130, ''.join(out) + err
    assert 'Traceback' not in err and err.strip().splitlines()[-1] == (
        'smith: interrupted; run the same command again to resume (finished steps, grid runs and checkpoints are '
        'kept)'), err
    out = ''.join(out)
    assert '#na#' not in out and 'LR Finder is complete' not in out  # the sweep printed no table, no hint
    assert list(tmp_path.glob('checkpoints/*/ckpt_*.pth'))
    again = subprocess.run(argv, capture_output=True, text=True, env=_env())
    assert again.returncode == 0, again.stdout + again.stderr
    assert 'LR range test skipped' in again.stdout and f'0 grid run(s) trained, {N_GRID + 1} skipped' in again.stdout
    assert re.search(r'6/7 final fit: resuming from ckpt_\S+ \(', again.stdout), again.stdout
    assert re.search(r'6/7 final fit resumed from ckpt_\S+ and finished in \d+\.\d s', again.stdout)
    finals = [r for r in _records(tmp_path) if r['name'] == 'final']
    assert len(finals) == 1 and [e['epoch'] for e in finals[0]['epochs']] == [0, 1, 2]


def test_smith_fewer_training_images_than_a_batch_is_one_line(tmp_path, monkeypatch):
    """23 images and --bs 32: step 1 raised a traceback from an empty training loader."""
    monkeypatch.setenv('MINIFAST_CACHE', str(tmp_path / 'cache'))
    root = _image_folder(tmp_path / 'imgs', n=2)
    msg = _smith_exit(tmp_path, '--data', str(root), '--bs', '8')
    assert msg.startswith(f'smith: the image folder {root}') and msg.endswith(
        '6 training images, fewer than one batch (--bs 8); lower --bs')
    assert _smith_exit(tmp_path, '--n-train', '20', '--bs', '32').endswith(
        '20 training images, fewer than one batch (--bs 32); lower --bs or raise --n-train')


# ------------------------------------------------------------------------------------------------ smith: issue 17
def test_smith_momentum_step_reuses_step_3s_1cycle_run(tmp_path):
    """Step 4's (0.95, 0.85) run has step 3's 1cycle settings (config, seed, epochs, max_lr, policy): it is taken
    from runs.jsonl, one run fewer, the same record."""
    log = tmp_path / 'runs.jsonl'
    mk = lambda: _learner(silent=True)  # noqa: E731
    sc, _, tr1, _ = smith.step_superconvergence(mk, tmp_path, [0, 1], 1, 1e-2, log, True)
    mo, _, tr2, sk2 = smith.step_momentum(mk, tmp_path, [0, 1], 1, 1e-2, log, True)
    assert (tr1, tr2, sk2) == (4, 2, 2) and len(read_log(log)) == 6  # per seed: 2 + 1 runs, not 2 + 2
    for seed in (0, 1):
        one = next(r for r in sc.runs if r['seed'] == seed and r['config']['policy'] == 'one_cycle')
        mom = next(r for r in mo.runs if r['seed'] == seed and r['config'] == {'moms': [0.95, 0.85]})
        assert mom['steps'] == one['steps'] and mom['final'] == one['final'] and mom['name'] == 'moms=(0.95, 0.85)'
    (tmp_path / 'b').mkdir()  # and it is the run step 4 trains when it is alone
    alone, _, tr, _ = smith.step_momentum(mk, tmp_path / 'b', 0, 1, 1e-2, tmp_path / 'b' / 'runs.jsonl', True)
    assert tr == 2 and alone.runs[0]['steps'] == sc.runs[0]['steps']


def test_smith_seeds_flag_runs_every_grid_config_per_seed(tmp_path, monkeypatch, capsys):
    _tiny_smith(monkeypatch)
    assert smith.run(_args(tmp_path, seeds=2, seed=5)) == 0
    recs = read_log(tmp_path / 'runs.jsonl')
    grid = [r for r in recs if r['name'] != 'final']
    assert len(grid) == 2 * N_GRID and sorted({r['seed'] for r in grid}) == [5, 6]
    assert [r['seed'] for r in recs if r['name'] == 'final'] == [5]  # the final fit: one run, --seed
    report = (tmp_path / 'report.md').read_text()
    assert 'ran with 2 seeds (5, 6' in report and 'valid_loss sd' in report
    out = capsys.readouterr().out
    assert re.search(rf'{2 * N_GRID} grid run\(s\) trained, 2 skipped', out), out  # step 4 reuses step 3's per seed


def test_smith_default_seeds_and_quick_seeds(capsys):
    assert smith._sizes(_args('x', quick=True))['seeds'] == 1
    assert smith._sizes(_args('x', quick=False))['seeds'] == smith.SIZES['default']['seeds'] >= 2
    assert smith._sizes(_args('x', seeds=3))['seeds'] == 3
    with pytest.raises(SystemExit, match='--seeds 0: it must be at least 1'):
        smith._sizes(_args('x', seeds=0))
    with pytest.raises(SystemExit):
        main(['smith', '--help'])
    assert '--seeds' in capsys.readouterr().out


def _wd_rec(wd, seed, loss, noop=False):
    return {'name': f'wd={wd:g}', 'config': {'moms': [0.95, 0.85], 'wd': wd}, 'seed': seed, 'status': 'done',
            'seconds': 1.0, 'final': {'valid_loss': loss}, 'verdict': 'flat', 'diagnosis': 'flat',
            'epochs': [{'epoch': 0, 'train_loss': 1., 'valid_loss': loss}],
            'decay': {'wd': wd, 'true_wd': True, 'steps': 4, 'acting_steps': 0 if noop else 4}}


def test_smith_wd_choice_on_a_tie_and_with_a_decay_that_never_acted():
    grid = smith.GridResult
    clear = grid([_wd_rec(w, s, v) for w, vs in ((1e-3, (0.4, 0.42)), (0., (0.5, 0.52))) for s, v in enumerate(vs)])
    assert smith._pick_wd(clear, 1e-4, 'wd') == (1e-3, 'the lowest mean final valid loss')
    # 1e-4 and 0 within the seed spread (differences +0.02, -0.01): a tie, reported; the lowest mean is still the
    # pick (0: 0.495 against 0.5), not the largest tied value, which would favour the grid's top whenever 2 seeds tie
    tie = grid([_wd_rec(w, s, v) for w, vs in ((1e-4, (0.5, 0.5)), (0., (0.48, 0.51)), (1e-3, (0.6, 0.61)))
                for s, v in enumerate(vs)])
    wd, why = smith._pick_wd(tie, 1e-4, 'wd')
    assert wd == 0. and why == ('the lowest mean final valid loss (a tie: the seeds cannot tell wd = 0.0001, 0 apart; '
                                'more seeds, --seeds, would say more)')
    # 1e-5 never acted: the same runs as 0; it is never the pick, whichever is listed first
    noop = grid([_wd_rec(1e-5, s, v, noop=True) for s, v in enumerate((0.3, 0.31))] +
                [_wd_rec(0., s, v) for s, v in enumerate((0.3, 0.31))] +
                [_wd_rec(1e-3, s, v) for s, v in enumerate((0.5, 0.52))])
    assert smith._pick_wd(noop, 1e-4, 'wd')[0] == 0.
    alone = grid([_wd_rec(1e-5, s, v, noop=True) for s, v in enumerate((0.3, 0.31))] +
                 [_wd_rec(1e-3, s, v) for s, v in enumerate((0.5, 0.52))])
    assert smith._pick_wd(alone, 1e-4, 'wd')[0] == 0.  # the best had no decay at all: 0, not 1e-5


def test_report_says_how_wd_is_applied_and_marks_decay_that_never_acted(smith_run):
    out, _ = smith_run
    report = (out / 'report.md').read_text()
    for words in ('**decoupled** decay', 'SGD with L2', '2^-25', 'on at least half of the 1cycle steps',
                  "step 3's 1cycle run", 'only identical results count as a tie'):
        assert words in report, words
    noop = [r for r in _records(out) if 'wd' in r['config'] and not r['config'].get('final') and r['config']['wd']
            and r['decay']['acting_steps'] == 0]
    assert bool(noop) == ('No-op in this grid' in report)
    for r in noop:
        assert f"{r['config']['wd']:g}" in report.split('No-op in this grid')[1].split('\n')[0]


# ------------------------------------------------------------------------------------------------ smith: issue 20
FAST = dict(grid_epochs=1, epochs=2)  # the least the workflow takes: 1-epoch grid runs, 2 epochs of final fit


def _child_runs(client, exp_name):
    """{parent run: [its child runs]} of the MLflow experiment `exp_name`, parents oldest first."""
    runs = client.search_runs([client.get_experiment_by_name(exp_name).experiment_id])
    parents = sorted((r for r in runs if 'mlflow.parentRunId' not in r.data.tags), key=lambda r: r.info.start_time)
    return [(p, [r for r in runs if r.data.tags.get('mlflow.parentRunId') == p.info.run_id]) for p in parents]


def _expected_children(recs):
    """The child run names a tracker shows for one smith invocation's runs.jsonl records: each grid run once per
    grid it is in ('<name> seed N'; step 4 shows step 3's 1cycle run again as 'moms=(0.95, 0.85) seed N'), and
    'final'; {name: the record}."""
    want = {}
    for r in recs:
        if r['name'] == 'final':
            want['final'] = r
        else:
            want[f"{r['name']} seed {r['seed']}"] = r
            if r['config'].get('policy') == 'one_cycle':
                want[f"moms=({', '.join(map(str, r['config']['moms']))}) seed {r['seed']}"] = r
    return want


@pytest.fixture(scope='module')
def mlflow_db(tmp_path_factory):
    """An SQLite MLflow store with its tables made (MLflow's migrations take seconds per new store)."""
    from mlflow import MlflowClient
    db = tmp_path_factory.mktemp('mlflow') / 'mlflow.db'
    MlflowClient(tracking_uri=f'sqlite:///{db}').search_experiments()
    return db


@pytest.mark.slow  # 10-20 s here (MLflow's SQLite store, two figures per run); the fast variants: the TensorBoard
# tests below (the same children and replays) and test_searchjob's MLflow test (parent, children, artifacts)
def test_smith_tracker_mlflow_mirrors_every_run_and_a_second_invocation_replays_them(tmp_path, monkeypatch,
                                                                                   mlflow_db):
    from mlflow import MlflowClient
    _tiny_smith(monkeypatch)
    monkeypatch.delenv('MLFLOW_TRACKING_URI', raising=False)
    shutil.copy(mlflow_db, tmp_path / 'mlflow.db')  # OUT/mlflow.db, the default store (tables already made)
    assert smith.run(_args(tmp_path, tracker='mlflow', **FAST)) == 0
    recs = read_log(tmp_path / 'runs.jsonl')
    assert smith.run(_args(tmp_path, tracker='mlflow', **FAST)) == 0  # everything reused
    assert read_log(tmp_path / 'runs.jsonl') == recs
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (p1, kids1), (p2, kids2) = _child_runs(c, 'minifast smith')
    want = _expected_children(recs)
    assert len(want) == N_GRID + 2
    assert sorted(k.info.run_name for k in kids1) == sorted([*want, 'LR range test'])
    assert sorted(k.info.run_name for k in kids2) == sorted(want)  # the LR range test is a cache, not a run
    pngs = {p.name for p in tmp_path.glob('*.png')}
    for parent, kids in ((p1, kids1), (p2, kids2)):
        assert parent.info.run_name.startswith('minifast smith ') and parent.info.status == 'FINISHED'
        assert {a.path for a in c.list_artifacts(parent.info.run_id)} == {'report.md', *pngs}
        for k in kids:
            assert k.info.status == 'FINISHED', k.info.run_name
            if k.info.run_name == 'LR range test':
                assert {a.path for a in c.list_artifacts(k.info.run_id)} == {'lr_find.png'}
                continue
            r = want[k.info.run_name]
            for key in ('train_loss', 'valid_loss', 'accuracy'):
                hist = sorted(c.get_metric_history(k.info.run_id, key), key=lambda m: m.step)
                assert [m.value for m in hist] == [e[key] for e in r['epochs']], (k.info.run_name, key)
            assert k.data.params['seed'] == str(r['seed'])
    lr_kid = next(k for k in kids1 if k.info.run_name == 'LR range test')
    assert lr_kid.data.params['num_it'] == '8'


def _tb(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={'scalars': 0, 'images': 0})
    acc.Reload()
    return acc


def test_smith_tracker_tensorboard_one_folder_per_invocation_holding_every_run(tmp_path, monkeypatch):
    _tiny_smith(monkeypatch)
    assert smith.run(_args(tmp_path, tracker='tensorboard', **FAST)) == 0
    assert smith.run(_args(tmp_path, tracker='tensorboard', **FAST)) == 0
    recs = read_log(tmp_path / 'runs.jsonl')
    want = _expected_children(recs)
    first, second = sorted((tmp_path / 'tensorboard').iterdir())
    for folder, extra in ((first, {'LR range test'}), (second, set())):
        kids = {p.name for p in folder.iterdir() if p.is_dir() and p.name != 'artifacts'}
        assert kids == set(want) | extra, folder
        assert {p.name for p in (folder / 'artifacts').iterdir()} == {'report.md', *(p.name for p in
                                                                               tmp_path.glob('*.png'))}
        for name, r in want.items():
            got = [(e.step, e.value) for e in _tb(folder / name).Scalars('valid_loss')]
            assert [s for s, _ in got] == [e['epoch'] for e in r['epochs']], name
            assert [v for _, v in got] == pytest.approx([e['valid_loss'] for e in r['epochs']], rel=1e-6), name
    assert set(_tb(first / 'LR range test').Tags()['images']) == {'lr_find'}


def test_smith_tracker_tensorboard_two_invocations_in_one_second_get_two_folders(tmp_path, monkeypatch):
    """The folder was named by the second only: a reused invocation takes under a second, and the next one then
    wrote its replayed runs into the same folder, each run twice."""
    _tiny_smith(monkeypatch)
    assert smith.run(_args(tmp_path, **FAST)) == 0
    monkeypatch.setattr(smith.time, 'strftime', lambda *a: '20260101-120000')
    for _ in range(2):
        assert smith.run(_args(tmp_path, tracker='tensorboard', **FAST)) == 0
    folders = sorted(p.name for p in (tmp_path / 'tensorboard').iterdir())
    assert len(folders) == 2 and folders[0] == '20260101-120000', folders
    for f in folders:
        got = _tb(tmp_path / 'tensorboard' / f / 'final').Scalars('valid_loss')
        assert [e.step for e in got] == [0, 1], f


def test_smith_tracker_missing_library_exits_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util
    _tiny_smith(monkeypatch)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'wandb' else real(name, *a))
    with pytest.raises(SystemExit) as e:
        smith.run(_args(tmp_path, tracker='wandb'))
    assert str(e.value.code) == ('smith: --tracker wandb: the wandb package is not installed; pip install '
                                 'minifast[track]')
    assert not (tmp_path / 'runs.jsonl').exists() and not (tmp_path / 'lr_find.json').exists()


class _FakeWorker:
    """A grid worker process that waits (for a max_lr) until it is terminated."""
    pid = 4242

    def __init__(self, *a, **k):
        self.terminated = False
        STARTED.append(self)

    def terminate(self):
        self.terminated = True

    def wait(self, timeout=None):
        assert self.terminated, 'the main invocation waited for a grid worker it never told to stop: it hangs'
        return -15


STARTED = []


def test_smith_failing_main_stops_its_grid_workers_instead_of_waiting_for_them(tmp_path, monkeypatch):
    """--workers 2 and a main invocation that stops before it publishes max_lr (here a missing tracker library; a
    data error or a failing step likewise): its grid workers wait for max_lr for ever, and the main waited for them."""
    import importlib.util
    _tiny_smith(monkeypatch)
    STARTED.clear()
    monkeypatch.setattr(smith.subprocess, 'Popen', _FakeWorker)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'wandb' else real(name, *a))
    with pytest.raises(SystemExit, match='pip install minifast'):
        smith.run(_args(tmp_path, tracker='wandb', workers=2, argv=['smith', '--quick']))
    assert len(STARTED) == 1 and STARTED[0].terminated


# ---- --storage: the grids through an Optuna study ---------------------------------------------------------------
def _search_module():
    import importlib
    return importlib.import_module('minifast.search')  # the module (minifast.search is also the function)


def _count_grid_fits(monkeypatch):
    fits, mod = [], _search_module()
    real = mod.fit_run
    monkeypatch.setattr(mod, 'fit_run', lambda *a, **k: (fits.append(a[2]), real(*a, **k))[1])
    return fits


def _finals(recs):
    return {json.dumps(r['key'], sort_keys=True): r['final'] for r in recs}


def _report_sans_times(out):
    text = (out / 'report.md').read_text()
    text = re.sub(r'\b\d+\.\d(?=\s+(done|diverged|pruned)\b)', 'T', text)  # the tables' seconds column
    return re.sub(r'\d+\.\d s\b', 'T s', text)


@pytest.fixture(scope='module')
def plain_tiny_run(tmp_path_factory):
    """The tiny smith without --storage: its run folder."""
    mp = pytest.MonkeyPatch()
    try:
        _tiny_smith(mp)
        out = tmp_path_factory.mktemp('plain')
        assert smith.run(_args(out, **FAST)) == 0
    finally:
        mp.undo()
    return out


def test_smith_storage_grids_go_through_the_study_and_choose_as_a_plain_run(tmp_path, monkeypatch, plain_tiny_run):
    import optuna
    _tiny_smith(monkeypatch)
    fits = _count_grid_fits(monkeypatch)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert smith.run(_args(tmp_path / 'run', storage=url, **FAST)) == 0
    assert len(fits) == N_GRID
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(url))
    setup = [n for n in names if n.startswith('smith setup ')]
    grids = [n for n in names if not n.startswith('smith setup ')]
    assert len(setup) == 1 and smith.wait_for(url, setup[0], 'max_lr', timeout=0) == 1e-2
    # a study per grid and seed (steps 3, 4, 5 coarse and fine; step 4's first pair is step 3's run, from the log)
    assert len(grids) == 4 and all(re.fullmatch(r'smith [0-9a-f]{10} seed 0', n) for n in grids), names
    from minifast.search import SearchResult
    stored = [r for n in grids for r in SearchResult.from_storage(url, n).runs]
    assert len(stored) == N_GRID and len({json.dumps(r['key'], sort_keys=True) for r in stored}) == N_GRID
    recs, plain_recs = read_log(tmp_path / 'run' / 'runs.jsonl'), read_log(plain_tiny_run / 'runs.jsonl')
    assert len(recs) == len(plain_recs) == N_GRID + 1
    assert _finals(recs) == _finals(plain_recs) == {**_finals(stored), **_finals([recs[-1]])}  # bit-identical runs
    assert _report_sans_times(tmp_path / 'run') == _report_sans_times(plain_tiny_run)  # choices, tables, verdicts


def test_smith_grid_worker_needs_a_storage(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(smith, 'make_data', lambda *a, **k: made.append(a))
    with pytest.raises(SystemExit) as e:
        smith.run(_args(tmp_path / 'run', grid_worker=True))
    assert '--grid-worker' in str(e.value.code) and '--storage' in str(e.value.code)
    assert not made and not (tmp_path / 'run' / 'runs.jsonl').exists()


def test_smith_grid_worker_runs_steps_3_to_5_and_the_main_then_trains_no_grid_run(tmp_path, monkeypatch, capsys):
    _tiny_smith(monkeypatch)
    fits = _count_grid_fits(monkeypatch)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert smith.run(_args(tmp_path / 'w', grid_worker=True, storage=url, **FAST)) == 0  # --max-lr: no waiting
    out = capsys.readouterr().out
    assert len(fits) == N_GRID and 'grid worker: steps 3 to 5 done' in out and '6/7' not in out
    assert not (tmp_path / 'w' / 'report.md').exists() and not (tmp_path / 'w' / 'lr_find.json').exists()
    assert len(read_log(tmp_path / 'w' / 'runs.jsonl')) == N_GRID
    assert smith.run(_args(tmp_path / 'main', storage=url, **FAST)) == 0
    assert len(fits) == N_GRID  # every grid run came from the study
    recs = read_log(tmp_path / 'main' / 'runs.jsonl')
    assert len(recs) == N_GRID + 1 and (tmp_path / 'main' / 'report.md').exists()
    assert _finals(recs[:-1]) == _finals(read_log(tmp_path / 'w' / 'runs.jsonl'))


def test_smith_grid_worker_waits_for_the_published_max_lr(tmp_path, monkeypatch, capsys):
    import threading
    import optuna
    _tiny_smith(monkeypatch)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = []
    t = threading.Thread(target=lambda: result.append(
        smith.run(_args(tmp_path / 'w', grid_worker=True, storage=url, max_lr=None, **FAST))))
    t.start()
    try:
        deadline = time.monotonic() + 60
        setup = []
        while not setup and time.monotonic() < deadline:  # the worker creates the study it waits in
            time.sleep(0.1)
            setup = [s.study_name for s in optuna.get_all_study_summaries(url)
                     if s.study_name.startswith('smith setup')]
        assert setup and t.is_alive() and not (tmp_path / 'w' / 'runs.jsonl').exists()
        smith.publish(url, setup[0], 'max_lr', 0.02)
    finally:
        t.join(120)
    assert result == [0]
    out = capsys.readouterr().out
    assert "waiting for the main invocation's max_lr" in out and 'grid worker: max_lr = 0.02' in out
    recs = read_log(tmp_path / 'w' / 'runs.jsonl')
    assert len(recs) == N_GRID and {r['key']['max_lr'] for r in recs} == {0.02}


def test_wait_for_times_out_naming_the_study_and_the_key(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no 'max_lr' in study 'smith setup x' of sqlite:///.*study.db after 0.3 s"):
        smith.wait_for(url, 'smith setup x', 'max_lr', poll=0.05, timeout=0.3)
    assert time.monotonic() - t0 < 10
    smith.publish(url, 'smith setup x', 'max_lr', 0.5)
    assert smith.wait_for(url, 'smith setup x', 'max_lr', timeout=0) == 0.5


TINY_CHILD = '''
import sys
sys.path.insert(0, {tests!r})
from conftest import make_data, make_mlp
from minifast import smith
from minifast.cli import main

def fake_data(args, s, cmd='smith'):
    data = make_data(n_train=s['n_train'], n_valid=32, bs=16, n_out=6, seed=args.seed)
    data.device = 'cpu'
    return data, f"tiny set ({{s['n_train']}} training rows)"
smith.make_data = fake_data
smith.model_fn = lambda arch, c: (lambda: make_mlp(n_out=c))
smith.step_data = lambda data, out: None
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow  # two processes importing torch at once (15-25 s here); the in-process grid worker tests are fast
# (this one shares the grids between two processes; the main's --workers 2 starts the same grid worker command)
def test_smith_main_and_a_grid_worker_process_train_each_run_once_as_one_process_does(tmp_path, plain_tiny_run):
    code = TINY_CHILD.format(tests=str(Path(__file__).parent))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    common = ['smith', '--quick', '--quiet', '--n-train', '64', '--num-it', '8', '--epochs', '2', '--grid-epochs',
              '1', '--max-lr', '1e-2', '--storage', url]  # as plain_tiny_run
    # the worker without --max-lr: it waits for the main's, published in the storage after its step 2
    worker = subprocess.Popen([sys.executable, '-c', code, *common[:-4], *common[-2:], '--out', str(tmp_path / 'w'),
                               '--grid-worker'],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    main_proc = subprocess.Popen([sys.executable, '-c', code, *common, '--out', str(tmp_path / 'main')],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    m_out = main_proc.communicate(timeout=300)[0]
    w_out = worker.communicate(timeout=300)[0]
    assert main_proc.returncode == 0, m_out
    assert worker.returncode == 0, w_out
    assert "waiting for the main invocation's max_lr" in w_out and 'grid worker: max_lr = 0.01' in w_out
    assert not (tmp_path / 'w' / 'report.md').exists()
    recs = read_log(tmp_path / 'main' / 'runs.jsonl')
    grid = [r for r in recs if r['name'] != 'final']
    keys = [json.dumps(r['key'], sort_keys=True) for r in grid]
    assert len(keys) == len(set(keys)) == N_GRID  # each run once in the export
    pids = {r['worker'].rsplit(':', 1)[1] for r in grid}  # who trained each run: the main or the grid worker
    assert pids <= {str(main_proc.pid), str(worker.pid)}, pids
    print('runs trained by the main:', sum(r['worker'].endswith(f':{main_proc.pid}') for r in grid), 'by the worker:',
          sum(r['worker'].endswith(f':{worker.pid}') for r in grid))
    assert _finals(read_log(tmp_path / 'w' / 'runs.jsonl')) == _finals(grid)  # the worker saw the same records
    assert _finals(recs) == _finals(read_log(plain_tiny_run / 'runs.jsonl'))  # as one process without a storage
    assert _report_sans_times(tmp_path / 'main') == _report_sans_times(plain_tiny_run)
