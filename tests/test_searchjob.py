"""`minifast search`: --space parsing and its errors, an in-process search on a tiny task (table, best line,
search.md, search.png, runs.jsonl), a second run on the same storage training nothing, the command line of the extra
workers, --tracker mlflow (one child run per trial under one parent), and --workers 2 as real processes."""
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import minifast
from minifast import searchjob, smith
from minifast.cli import main
from minifast.options import worker_argv
from minifast.search import Choice, IntRange, LogUniform, SearchResult, Uniform
from helpers import patch_tiny_task

optuna = pytest.importorskip('optuna')
search_mod = importlib.import_module('minifast.search')  # the module (minifast.search is also the function)


# ---- --space ------------------------------------------------------------------------------------------------------
def test_parse_space_every_kind_and_tuples_in_choice():
    space = searchjob.parse_space(['max_lr=log:1e-3:1e-1', 'wd=uniform:0:1e-3', 'epochs=int:2:6',
                                   'moms=choice:0.95,0.85/0.99,0.9', 'pct_start=choice:0.25/0.3/0.5'])
    assert list(space) == ['max_lr', 'wd', 'epochs', 'moms', 'pct_start']
    assert isinstance(space['max_lr'], LogUniform) and (space['max_lr'].low, space['max_lr'].high) == (1e-3, 1e-1)
    assert isinstance(space['wd'], Uniform) and (space['wd'].low, space['wd'].high) == (0, 1e-3)
    assert isinstance(space['epochs'], IntRange) and (space['epochs'].low, space['epochs'].high) == (2, 6)
    assert type(space['epochs'].low) is int and type(space['wd'].low) is int  # '0' is the integer 0
    assert isinstance(space['moms'], Choice) and space['moms'].values == [(0.95, 0.85), (0.99, 0.9)]
    assert space['pct_start'].values == [0.25, 0.3, 0.5]
    default = searchjob.parse_space(searchjob.DEFAULT_SPACE)
    assert sorted(default) == ['max_lr', 'moms', 'wd'] and default['moms'].values == [(0.95, 0.85), (0.99, 0.9)]


@pytest.mark.parametrize('spec, words', [
    ('max_lr=normal:0:1', "unknown kind 'normal'"),
    ('max_lr', 'expected KEY=KIND:ARGS'),
    ('max_lr=log', 'expected KEY=KIND:ARGS'),
    ('=log:1e-3:1e-1', 'expected KEY=KIND:ARGS'),
    ('max_lr=log:1e-3', 'log takes two bounds, LOW:HIGH'),
    ('max_lr=log:1e-3:1e-2:1e-1', 'log takes two bounds, LOW:HIGH'),
    ('max_lr=log:small:1e-1', "'small' is not a number"),
    ('moms=choice:0.95,x/0.99,0.9', "'x' is not a number"),
    ('hidden=int:4:8', "'hidden' is not a setting the search trains with"),
    ('policy=choice:one_cycle', "'policy' is not a setting"),
    ('wd=uniform:1e-3:1e-4', 'low (0.001) must be below high (0.0001)'),
    ('wd=uniform:1e-3:1e-3', 'must be below high'),
    ('max_lr=log:0:1e-1', 'a log scale needs low > 0'),
    ('epochs=int:1.5:4', 'bounds must be integers, got 1.5'),
    ('moms=choice:0.9,0.8/0.9,0.8', 'appear twice'),
])
def test_parse_space_errors_name_the_space_string(spec, words):
    with pytest.raises(SystemExit) as e:
        searchjob.parse_space([spec])
    msg = str(e.value.code)
    assert msg.startswith(f'search: --space {spec!r}: ') and words in msg, msg


def test_parse_space_key_twice_names_the_second_string():
    with pytest.raises(SystemExit) as e:
        searchjob.parse_space(['wd=log:1e-5:1e-3', 'wd=uniform:0:1e-3'])
    assert str(e.value.code) == "search: --space 'wd=uniform:0:1e-3': 'wd' is given twice"


def test_bad_space_is_refused_before_any_data_or_training(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(searchjob, 'make_data', lambda *a, **k: made.append(a))
    with pytest.raises(SystemExit, match=r"--space 'wd=uniform:1:0'"):
        main(['search', '--quiet', '--out', str(tmp_path / 'run'), '--space', 'wd=uniform:1:0'])
    assert not made and not (tmp_path / 'run' / 'runs.jsonl').exists()


# ---- the command line of the extra workers ----------------------------------------------------------------------
def test_worker_argv_replaces_workers_storage_out_and_drops_tracker_in_both_forms():
    tail = ['--workers', '1', '--storage', 'sqlite:///s.db', '--out', '/w/1', '--quiet']
    for argv in (['search', '--quick', '--workers', '3', '--storage', 'sqlite:///old.db', '--out', 'runs/x',
                  '--tracker', 'mlflow', '--trials', '5'],
                 ['search', '--quick', '--workers=3', '--storage=sqlite:///old.db', '--out=runs/x',
                  '--tracker=mlflow', '--trials', '5'],
                 ['search', '--workers=3', '--quick', '--storage', 'sqlite:///old.db', '--out=runs/x', '--tracker',
                  'mlflow', '--trials=5']):
        cmd = worker_argv(argv, 'sqlite:///s.db', Path('/w/1'))
        assert cmd[:3] == [sys.executable, '-m', 'minifast'], cmd
        rest = cmd[3:]
        assert rest[-len(tail):] == tail, cmd
        kept = rest[:-len(tail)]
        assert kept[0] == 'search' and '--quick' in kept and ('--trials' in kept or '--trials=5' in kept), cmd
        assert not any(a.split('=')[0] in ('--workers', '--storage', '--out', '--tracker') for a in kept), cmd
        assert not {'3', 'sqlite:///old.db', 'runs/x', 'mlflow'} & set(kept), cmd
    assert worker_argv(['smith', '--quick'], 'x.log', '/w/2', extra=['--grid-worker'])[-1] == '--grid-worker'


# ---- an in-process search on a tiny task ------------------------------------------------------------------------
def _tiny(monkeypatch):
    """searchjob with a tiny MLP task in place of images and ResNets (the search, storage and outputs are real)."""
    patch_tiny_task(monkeypatch, searchjob, 'search')


def _count_fits(monkeypatch):
    fits, real = [], search_mod.fit_run
    monkeypatch.setattr(search_mod, 'fit_run', lambda *a, **k: (fits.append(a[2]), real(*a, **k))[1])
    return fits


def _argv(out, *more):
    return ['search', '--quick', '--quiet', '--n-train', '64', '--trials', '4', '--epochs', '2', '--sampler', 'random',
            '--pruner', 'none', '--out', str(out), *more]


def _lines(file):
    return [json.loads(x) for x in Path(file).read_text().splitlines() if x.strip()]


def test_search_prints_table_and_best_and_writes_its_files(tmp_path, monkeypatch, capsys):
    from PIL import Image
    _tiny(monkeypatch)
    fits = _count_fits(monkeypatch)
    assert main(_argv(tmp_path)) == 0
    out = capsys.readouterr().out
    assert len(fits) == 4
    recs = _lines(tmp_path / 'runs.jsonl')
    assert [r['slot'] for r in recs] == [0, 1, 2, 3] and len({r['name'] for r in recs}) == 4
    assert all(r['status'] == 'done' and len(r['epochs']) == 2 for r in recs)
    assert {'max_lr', 'moms', 'wd'} == set(recs[0]['config'])
    for r in recs:
        assert r['name'] in out  # the table names every trial
    best = min(recs, key=lambda r: r['final']['valid_loss'])
    best_line = [ln for ln in out.splitlines() if ln.startswith('search: best: ')]
    assert len(best_line) == 1 and best_line[0].startswith(
        f"search: best: {best['name']} (valid_loss {best['final']['valid_loss']:.4f}); 4 trials done, 0 pruned, "
        f"0 failed"), best_line
    md = (tmp_path / 'search.md').read_text()
    assert md.startswith('# minifast search minifast-search') and '![search](search.png)' in md
    assert all(r['name'] in md for r in recs)
    png = tmp_path / 'search.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == 'PNG' and min(im.size) > 100


def test_search_again_on_the_same_storage_trains_nothing(tmp_path, monkeypatch, capsys):
    _tiny(monkeypatch)
    fits = _count_fits(monkeypatch)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(_argv(tmp_path / 'run', '--storage', url)) == 0
    first = capsys.readouterr().out
    log1 = (tmp_path / 'run' / 'runs.jsonl').read_text()
    assert len(fits) == 4
    assert main(_argv(tmp_path / 'run', '--storage', url)) == 0
    second = capsys.readouterr().out
    assert len(fits) == 4, 'the second run trained again'
    assert (tmp_path / 'run' / 'runs.jsonl').read_text() == log1  # nothing appended twice
    def best(text):
        return next(ln for ln in text.splitlines() if ln.startswith('search: best:')).split('; took')[0]
    assert best(second) == best(first)
    res = SearchResult.from_storage(url, 'minifast-search')
    assert [r['slot'] for r in res.runs] == [0, 1, 2, 3] and res.n_complete == 4
    # a lost export is written again from the storage, still training nothing
    (tmp_path / 'run' / 'runs.jsonl').unlink()
    assert main(_argv(tmp_path / 'run', '--storage', url)) == 0
    assert len(fits) == 4 and [r['slot'] for r in _lines(tmp_path / 'run' / 'runs.jsonl')] == [0, 1, 2, 3]


@pytest.fixture(scope='module')
def mlflow_db(tmp_path_factory):
    """An SQLite MLflow store with its tables made (MLflow's migrations take seconds per new store)."""
    from mlflow import MlflowClient
    db = tmp_path_factory.mktemp('mlflow') / 'mlflow.db'
    MlflowClient(tracking_uri=f'sqlite:///{db}').search_experiments()
    return db


def test_search_tracker_mlflow_one_child_per_trial_under_one_parent(tmp_path, monkeypatch, mlflow_db, capsys):
    from mlflow import MlflowClient
    _tiny(monkeypatch)
    monkeypatch.delenv('MLFLOW_TRACKING_URI', raising=False)
    tmp_path.joinpath('run').mkdir()
    shutil.copy(mlflow_db, tmp_path / 'run' / 'mlflow.db')
    assert main(_argv(tmp_path / 'run', '--tracker', 'mlflow')) == 0
    recs = _lines(tmp_path / 'run' / 'runs.jsonl')
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    exp = c.get_experiment_by_name('search minifast-search')
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if 'mlflow.parentRunId' not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    assert parent.info.run_name.startswith('search minifast-search ') and parent.info.status == 'FINISHED'
    kids = [r for r in runs if r.data.tags.get('mlflow.parentRunId') == parent.info.run_id]
    assert len(kids) == len(runs) - 1 == 4
    by_name = {k.info.run_name: k for k in kids}
    assert sorted(by_name) == sorted(f"trial {r['trial']} {r['name']}" for r in recs)
    for r in recs:
        k = by_name[f"trial {r['trial']} {r['name']}"]
        assert k.info.status == 'FINISHED'
        hist = sorted(c.get_metric_history(k.info.run_id, 'valid_loss'), key=lambda m: m.step)
        assert [m.value for m in hist] == [e['valid_loss'] for e in r['epochs']]
        assert k.data.params['seed'] == '0' and k.data.params['trial'] == str(r['trial'])
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {'search.md', 'search.png'}


class FakeProc:
    pid, returncode = 12345, 0
    terminated = False

    def wait(self):
        return 0

    def terminate(self):
        self.terminated = True


def test_search_missing_tracker_library_exits_before_starting_workers(tmp_path, monkeypatch):
    """--workers 2 --tracker X without X installed: the extra worker was started first, and went on training the
    whole search alone after the main invocation exited."""
    _tiny(monkeypatch)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'mlflow' else real(name, *a))
    started = []
    monkeypatch.setattr(smith.subprocess, 'Popen', lambda *a, **k: started.append(a) or FakeProc())
    with pytest.raises(SystemExit) as e:
        main(_argv(tmp_path, '--workers', '2', '--tracker', 'mlflow'))
    assert str(e.value.code) == ('search: --tracker mlflow: the mlflow package is not installed; pip install '
                                 'minifast[track]')
    assert started == [] and not (tmp_path / 'runs.jsonl').exists()


def test_a_failing_main_search_stops_the_workers_it_started(tmp_path, monkeypatch):
    """An error (or Ctrl-C) in the main invocation's search terminates its extra workers instead of waiting for them
    to train the whole study."""
    _tiny(monkeypatch)
    procs = []
    monkeypatch.setattr(smith.subprocess, 'Popen', lambda *a, **k: procs.append(FakeProc()) or procs[-1])

    def broken(*a, **k):
        raise RuntimeError('a bug in the main worker')
    monkeypatch.setattr(searchjob, 'search', broken)
    with pytest.raises(RuntimeError, match='a bug in the main worker'):
        main(_argv(tmp_path, '--workers', '3'))
    assert len(procs) == 2 and all(p.terminated for p in procs)
    assert not (tmp_path / 'search.md').exists()


# ---- --workers 2: real processes --------------------------------------------------------------------------------
def _env():
    """The subprocess imports this checkout's minifast, installed or not."""
    root = str(Path(minifast.__file__).parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')]))
    return {**os.environ, 'MPLBACKEND': 'Agg', 'PYTHONPATH': path}


@pytest.mark.slow  # two processes importing torch and training ResNet-8s (20-40 s here); the fast variants above
def test_search_two_workers_run_every_slot_once(tmp_path):
    out = tmp_path / 'run'
    n = 6
    proc = subprocess.run([sys.executable, '-m', 'minifast', 'search', '--quick', '--quiet', '--trials', str(n),
                           '--epochs', '1', '--sampler', 'random', '--pruner', 'none', '--workers', '2',
                           '--out', str(out)], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'started 1 more worker(s)' in proc.stdout and 'warning: worker exit codes' not in proc.stdout
    url = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name='minifast-search', storage=url)
    done = [t for t in study.trials if t.state.name == 'COMPLETE']
    assert sorted(t.user_attrs['slot'] for t in done) == list(range(n))  # each slot finished exactly once
    recs = _lines(out / 'runs.jsonl')
    assert [r['slot'] for r in recs] == list(range(n))
    assert len({json.dumps(r['key'], sort_keys=True) for r in recs}) == n
    workers = {r['worker'] for r in recs}
    helper_log = (out / 'workers' / '1.log').read_text()
    assert 1 <= len(workers) <= 2 and 'search: best:' in helper_log, helper_log
    helper = _lines(out / 'workers' / '1' / 'runs.jsonl')  # the helper's export: the same study
    assert [r['key'] for r in helper] == [r['key'] for r in recs]
