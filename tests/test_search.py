"""search on Optuna: spaces, samplers' plans, fairness with grid_search, pruning, records in the storage and skipping
finished slots; many worker processes on one SQLite / PostgreSQL study (every slot exactly once, the table of one
worker), a killed worker's trial failed as stale and resumed from its checkpoint by another worker."""
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from minifast import Callback, Learner, accuracy, grid_search
from minifast.grid import plain
from minifast.search import (HEARTBEAT_ATTR, Choice, IntRange, LogUniform, SearchResult, Uniform, search)

from conftest import make_data

optuna = pytest.importorskip('optuna')
ROOT = Path(__file__).resolve().parents[1]


def make_learner(calls=None, hidden=16):
    if calls is not None:
        calls.append(hidden)
    model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))  # unseeded
    return Learner(make_data(n_train=96), model, silent=True, metrics=[accuracy])


def strip(rec):
    """A record without what differs between two identical runs (timings, trial numbers)."""
    drop = {'seconds', 'trial', 'slot', 'resumed_from', 'worker'}
    out = {k: v for k, v in rec.items() if k not in drop}
    out['epochs'] = [{k: v for k, v in e.items() if k != 'time'} for e in rec['epochs']]
    return out


@pytest.mark.parametrize('space, match', [
    ({}, 'non-empty dict'),
    ({'lr': 1e-3}, r"space\['lr'\] must be LogUniform"),
    ({'lr': LogUniform(0, 1e-2)}, r"space\['lr'\].*log scale needs low > 0, got low=0"),
    ({'wd': Uniform(0.1, 0.01)}, r"space\['wd'\].*low \(0.1\) must be below high \(0.01\)"),
    ({'wd': Uniform(0, float('nan'))}, 'finite numbers'),
    ({'hidden': IntRange(4, 8.5)}, r"space\['hidden'\].*bounds must be integers, got 8.5"),
    ({'moms': Choice([])}, r"space\['moms'\] = Choice\(\[\]\)"),
    ({'moms': Choice([(0.9, 0.8), (0.9, 0.8)])}, r'\[0.9, 0.8\] appear twice'),
])
def test_space_errors_name_the_key_and_the_bad_value(space, match):
    with pytest.raises(ValueError, match=match):
        search(make_learner, space, n_trials=1)


def test_other_argument_errors():
    with pytest.raises(ValueError, match=r"sampler='grid' needs Choice or IntRange.*\['lr'\]"):
        search(make_learner, {'lr': LogUniform(1e-3, 1e-2)}, sampler='grid')
    with pytest.raises(ValueError, match=r"\['wd'\] are both searched"):
        search(make_learner, {'wd': Uniform(0, 1)}, fixed={'wd': 0.1})
    with pytest.raises(ValueError, match='grace_period'):
        search(make_learner, {'wd': Uniform(0, 1)}, heartbeat_interval=5, grace_period=5)
    with pytest.raises(ValueError, match='neither a database URL'):
        search(make_learner, {'wd': Uniform(0, 1)}, storage='study.db')


def test_choice_of_tuples_gives_the_tuple_and_grid_runs_the_product():
    moms = [(0.95, 0.85), (0.9, 0.8)]
    res = search(make_learner, {'moms': Choice(moms), 'hidden': IntRange(4, 5)}, sampler='grid', pruner=None,
                 epochs=1)
    assert [r['config'] for r in res.runs] == [{'moms': list(m), 'hidden': h} for m in moms for h in (4, 5)]
    assert res.study.trials[0].params['moms'] == '[0.95, 0.85]'  # Optuna sees a label
    assert res.runs[0]['steps']['mom'][0] == pytest.approx(0.95)  # the fit got the tuple itself
    with pytest.warns(UserWarning, match='has 4 points; n_trials=9 is capped at 4'):
        assert len(search(make_learner, {'moms': Choice(moms), 'hidden': IntRange(4, 5)}, sampler='grid',
                          pruner=None, epochs=1, n_trials=9).runs) == 4


def test_random_configs_depend_only_on_sampler_seed_and_slot():
    space = {'lr': LogUniform(1e-4, 1e-1), 'hidden': IntRange(4, 32, log=True), 'moms': Choice([(0.9, 0.8), (0.95, 0.85)])}
    kw = dict(sampler='random', pruner=None, epochs=1)
    a = [r['config'] for r in search(make_learner, space, n_trials=3, **kw).runs]
    b = [r['config'] for r in search(make_learner, space, n_trials=5, **kw).runs]
    c = [r['config'] for r in search(make_learner, space, n_trials=3, sampler_seed=1, **kw).runs]
    assert a == b[:3] and a != c and len({json.dumps(x) for x in b}) == 5
    assert all(1e-4 <= x['lr'] <= 1e-1 and 4 <= x['hidden'] <= 32 for x in b)


def test_same_config_same_record_and_grid_search_agrees():
    space = {'lr': Choice([3e-2]), 'wd': Choice([1e-3])}
    a = search(make_learner, space, n_trials=1, pruner=None, epochs=2)
    b = search(make_learner, space, n_trials=1, pruner=None, epochs=2)
    assert strip(a.runs[0]) == strip(b.runs[0])  # bit-identical: same process, same threads
    g = grid_search(make_learner, {'lr': [3e-2], 'wd': [1e-3]}, epochs=2)
    assert strip(a.runs[0])['epochs'] == strip(g.runs[0])['epochs'] and a.runs[0]['steps'] == g.runs[0]['steps']
    assert a.runs[0]['key'] == g.runs[0]['key']


def test_pruning_stops_hopeless_trials_early():
    space = {'lr': Choice([1e-1, 8e-2, 6e-2, 5e-2, 1e-7, 1e-8])}  # the last two barely move the weights
    kw = dict(sampler='grid', epochs=4, fixed={'wd': 0.})
    pruned = search(make_learner, space, pruner='median', **kw)
    full = search(make_learner, space, pruner=None, **kw)
    assert pruned.n_pruned >= 1 and full.n_pruned == 0 and pruned.n_complete + pruned.n_pruned == 6
    low = [r for r in pruned.runs if r['config']['lr'] < 1e-6]
    assert all(r['status'] == 'pruned' and len(r['epochs']) < 4 for r in low)
    assert sum(len(r['epochs']) for r in pruned.runs) < sum(len(r['epochs']) for r in full.runs)
    assert pruned.best()['status'] == 'done' and pruned.best()['config']['lr'] > 1e-2
    assert 'pruned' in pruned.table() and '1 pruned' in repr(pruned) or '2 pruned' in repr(pruned)
    states = [t.state.name for t in pruned.study.trials]
    assert states.count('PRUNED') == pruned.n_pruned


def test_records_live_in_the_storage_and_a_second_call_trains_nothing(tmp_path):
    url, calls, log = f'sqlite:///{tmp_path}/study.db', [], tmp_path / 'runs.jsonl'
    space = {'lr': LogUniform(1e-3, 1e-1), 'hidden': Choice([8, 16])}
    kw = dict(n_trials=3, sampler='random', pruner=None, epochs=1, storage=url, log=log)
    first = search(lambda **k: make_learner(calls, **k), space, **kw)
    n = len(calls)
    assert n == 4 and len(first.runs) == 3  # the initial weights' learner, then one per trial
    again = search(lambda **k: make_learner(calls, **k), space, **kw)
    assert len(calls) == n and again.table() == first.table()
    stored = SearchResult.from_storage(url, 'minifast')
    assert stored.table() == first.table() and [r['trial'] for r in stored.runs] == [0, 1, 2]
    assert [json.loads(x)['slot'] for x in log.read_text().splitlines()] == [0, 1, 2]  # the export
    more = search(lambda **k: make_learner(calls, **k), space, **{**kw, 'n_trials': 4})  # the study's total
    assert len(more.runs) == 4 and len(calls) == n + 2 and more.runs[:3] == first.runs
    with pytest.raises(ValueError, match=r"other settings \(epochs: 1 there, 2 here\)"):
        search(make_learner, space, **{**kw, 'epochs': 2})


def test_a_config_already_finished_is_reused_not_trained(tmp_path):
    calls = []
    res = search(lambda **k: make_learner(calls, **k), {'hidden': Choice([8])}, n_trials=3, sampler='random',
                 pruner=None, epochs=1)
    assert len(calls) == 2 and [r['slot'] for r in res.runs] == [0, 1, 2]
    assert res.runs[1]['reused'] == 0 and res.runs[1]['final'] == res.runs[0]['final']


def test_a_stale_trial_is_failed_and_its_slot_retried_with_its_params(tmp_path):
    """One process: a RUNNING trial claiming slot 0 whose heartbeat stopped (a killed worker, on a journal file)."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    path = tmp_path / 'study.log'
    storage = JournalStorage(JournalFileBackend(str(path)))
    ghost_study = optuna.create_study(storage=storage, study_name='minifast')
    ghost = ghost_study.ask()
    ghost.suggest_float('lr', 1e-3, 1e-1, log=True)  # TPE chose a value; the retry must train that one
    ghost.set_user_attr('slot', 0)
    storage.set_trial_system_attr(ghost._trial_id, HEARTBEAT_ATTR, time.time() - 100)
    lr = ghost.params['lr']
    res = search(make_learner, {'lr': LogUniform(1e-3, 1e-1)}, n_trials=1, sampler='tpe', n_random=0, pruner=None,
                 epochs=1, storage=str(path), heartbeat_interval=1, grace_period=2)
    assert [t.state.name for t in res.study.trials] == ['FAIL', 'COMPLETE']
    assert res.runs[0]['config'] == {'lr': lr} and res.runs[0]['slot'] == 0 and res.n_failed == 1


def test_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    with pytest.raises(RuntimeError, match='not under torchrun'):
        search(make_learner, {'wd': Uniform(0, 1)})


# ---- worker processes -------------------------------------------------------------------------------------------
WORKER = textwrap.dedent('''
    import sys, time
    import torch
    torch.set_num_threads(1)
    sys.path[:0] = [{root!r}, {tests!r}]
    from conftest import make_data
    from minifast import Callback, Learner, accuracy
    from minifast.search import search, LogUniform, IntRange

    class Slow(Callback):
        def after_batch(self, learn):
            time.sleep(float(sys.argv[2]))

    def make_learner(hidden=16):
        model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
        return Learner(make_data(n_train=96), model, silent=True, metrics=[accuracy], callback_fns=[Slow])

    res = search(make_learner, {{'lr': LogUniform(1e-3, 1e-1), 'hidden': IntRange(4, 32)}}, n_trials=int(sys.argv[3]),
                 sampler='random', pruner=None, epochs=int(sys.argv[4]), storage=sys.argv[1], heartbeat_interval=1,
                 grace_period=3, checkpoints=sys.argv[5])
    print('worker done', len(res.runs), flush=True)
''')


def worker_script(tmp_path):
    f = tmp_path / 'worker.py'
    f.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / 'tests')))
    return f


def start(script, url, sleep, n, epochs, ck):
    return subprocess.Popen([sys.executable, str(script), url, str(sleep), str(n), str(epochs), str(ck)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(ps, timeout=300):
    outs = [p.communicate(timeout=timeout)[0] for p in ps]
    assert all(p.returncode == 0 for p in ps), outs
    return outs


def check_exactly_once(res, n):
    slots = [r['slot'] for r in res.runs]
    assert sorted(slots) == list(range(n))  # no slot twice, none missing
    done = [t for t in res.study.trials if t.state.name in ('COMPLETE', 'PRUNED')]
    assert len(done) == n and len({t.user_attrs['slot'] for t in done}) == n


def rows(res):
    return [{k: v for k, v in r.items() if k != 'seconds'} for r in res.rows()]


def test_three_workers_run_every_slot_once_and_match_one_worker(tmp_path):
    script, n = worker_script(tmp_path), 6
    many, one = f'sqlite:///{tmp_path}/many.db', f'sqlite:///{tmp_path}/one.db'
    t0 = time.perf_counter()
    finish([start(script, many, 0.1, n, 2, tmp_path / 'ck') for _ in range(3)])  # ~1.5 s a trial: all join
    finish([start(script, one, 0, n, 2, tmp_path / 'ck1')])
    a, b = SearchResult.from_storage(many), SearchResult.from_storage(one)
    check_exactly_once(a, n)
    assert rows(a) == rows(b) and [strip(r) for r in a.runs] == [strip(r) for r in b.runs]
    trials = {t.user_attrs['record']['trial'] for t in a.study.trials if 'record' in t.user_attrs}
    assert len(trials) == n and len({r['worker'] for r in a.runs}) >= 2  # shared, not one worker doing it all
    print(f'3 workers + 1 worker: {time.perf_counter() - t0:.1f} s')


def test_a_killed_worker_trial_completes_in_another_worker_from_its_checkpoint(tmp_path):
    script, url, ck = worker_script(tmp_path), f'sqlite:///{tmp_path}/study.db', tmp_path / 'ck'
    slow = start(script, url, 0.25, 1, 3, ck)  # 6 batches of 0.25 s per epoch
    deadline = time.time() + 120
    while not glob.glob(f'{ck}/**/*_epoch0_*.pth', recursive=True):
        assert time.time() < deadline and slow.poll() is None, 'no checkpoint of epoch 0 appeared'
        time.sleep(0.1)
    os.kill(slow.pid, signal.SIGKILL)
    slow.wait()
    finish([start(script, url, 0, 1, 3, ck)])
    res = SearchResult.from_storage(url)
    assert [t.state.name for t in res.study.trials] == ['FAIL', 'COMPLETE'] and res.n_failed == 1
    (rec,) = res.runs
    assert 'epoch0' in rec['resumed_from']  # continued from the killed worker's checkpoint, not restarted
    ref_url = f'sqlite:///{tmp_path}/ref.db'
    finish([start(script, ref_url, 0, 1, 3, tmp_path / 'ck_ref')])
    (ref,) = SearchResult.from_storage(ref_url).runs
    assert strip(rec)['epochs'] == strip(ref)['epochs'] and rec['final'] == ref['final']


def _pg_bin():
    for d in [None, *sorted(glob.glob('/usr/lib/postgresql/*/bin'))]:
        initdb = shutil.which('initdb', path=d)
        if initdb and shutil.which('pg_ctl', path=d):
            return Path(initdb).parent
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_workers_on_a_postgresql_server(tmp_path):
    pytest.importorskip('psycopg2')
    bin_ = _pg_bin()
    if bin_ is None:
        pytest.skip('no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin')
    root = os.geteuid() == 0  # postgres refuses to run as root: run it as the postgres user
    as_pg = ['runuser', '-u', 'postgres', '--'] if root else []
    # a folder of its own under /tmp: pytest's tmp_path is closed to other users
    data, port = Path(tempfile.mkdtemp(prefix='minifast-pg-')), _free_port()
    if root:
        shutil.chown(data, 'postgres')
    user = 'postgres' if root else os.environ.get('USER', 'postgres')
    subprocess.run([*as_pg, str(bin_ / 'initdb'), '-D', str(data), '-A', 'trust', '-U', user], check=True,
                   capture_output=True)
    try:
        subprocess.run([*as_pg, str(bin_ / 'pg_ctl'), '-D', str(data), '-w', '-l', str(data / 'log'), '-o',
                        f'-p {port} -k {data} -c listen_addresses=127.0.0.1', 'start'], check=True,
                       capture_output=True)
        import sqlalchemy
        eng = sqlalchemy.create_engine(f'postgresql+psycopg2://{user}@127.0.0.1:{port}/postgres',
                                       isolation_level='AUTOCOMMIT')
        with eng.connect() as c:
            c.execute(sqlalchemy.text('CREATE DATABASE study'))
        eng.dispose()
        url, script, n = f'postgresql+psycopg2://{user}@127.0.0.1:{port}/study', worker_script(tmp_path), 4
        finish([start(script, url, 0.02, n, 2, tmp_path / 'ck') for _ in range(2)])
        res = SearchResult.from_storage(url)
        check_exactly_once(res, n)
        assert len({r['trial'] for r in res.runs}) == n
    finally:
        subprocess.run([*as_pg, str(bin_ / 'pg_ctl'), '-D', str(data), '-m', 'immediate', 'stop'],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


# ------------------------------------------------------------------------- a list of configs, trackers, folds
def test_a_list_of_configs_runs_exactly_those_and_matches_grid_search(tmp_path):
    configs = [{'policy': 'one_cycle', 'moms': (0.95, 0.85)}, {'policy': 'constant', 'lr': 3e-3}]
    res = search(make_learner, configs, pruner=None, epochs=2, fixed={'wd': 1e-4}, storage=f'sqlite:///{tmp_path}/s.db')
    g = grid_search(make_learner, configs, epochs=2, fixed={'wd': 1e-4})
    assert [r['config'] for r in res.runs] == [{'policy': 'one_cycle', 'moms': [0.95, 0.85]},
                                               {'policy': 'constant', 'lr': 3e-3}]
    assert [r['key'] for r in res.runs] == [r['key'] for r in g.runs]
    for a, b in zip(res.runs, g.runs):  # same initial weights (the first config's) and data order
        assert a['steps'] == b['steps'] and strip(a)['epochs'] == strip(b)['epochs']
    assert [t.params for t in res.study.trials] == [{'config': json.dumps(plain(c))} for c in configs]
    with pytest.raises(ValueError, match='list of config dicts'):
        search(make_learner, [{'lr': 1e-3}, 'wd=0'])


class FakeTracker:
    """A tracker that notes what it is given (the trackers themselves are tested in test_trackers.py)."""

    def __init__(self):
        self.children, self.replayed = [], []

    @contextlib.contextmanager
    def child(self, name, params=None):
        cb = EpochCounter()
        yield cb
        self.children.append((name, params, cb.epochs))

    def log_record(self, rec, name=None):
        self.replayed.append((name, rec['status']))


class EpochCounter(Callback):
    def __init__(self):
        self.epochs = 0

    def after_epoch(self, learn):
        self.epochs += 1


def test_each_trained_trial_is_a_child_run_of_the_tracker():
    t = FakeTracker()
    space = {'lr': Choice([3e-2, 1e-2]), 'wd': Choice([0., 1e-3])}
    res = search(make_learner, space, sampler='grid', pruner=None, epochs=2, tracker=t)
    assert [n for n, _, _ in t.children] == [f"trial {r['trial']} {r['name']}" for r in res.runs]
    assert all(e == 2 for _, _, e in t.children) and t.children[0][1] == {'lr': 3e-2, 'wd': 0., 'seed': 0,
                                                                          'trial': 0}


def test_folds_score_each_trial_by_the_mean_over_folds_and_can_prune_between_folds():
    from minifast.crossval import cross_validate
    data = make_data(n_train=120, n_valid=20)

    def mk(data=data, hidden=16):
        model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
        return Learner(data, model, silent=True, metrics=[accuracy])

    t = FakeTracker()
    res = search(mk, {'lr': Choice([3e-2, 1e-8])}, sampler='grid', pruner=None, epochs=2, folds=3, data=data,
                 tracker=t)
    cv = cross_validate(mk, data, k=3, config={'lr': 3e-2}, epochs=2)  # by hand: the same initial weights
    rec = res.runs[0]
    assert rec['final']['valid_loss'] == pytest.approx(cv.mean['valid_loss'], rel=1e-6)
    assert rec['k'] == 3 and rec['status'] == 'done' and rec['config'] == {'lr': 3e-2}
    assert res.best()['config'] == {'lr': 3e-2} and len(t.replayed) == 2
    # a pruner that always prunes stops a trial after its first fold
    always = optuna.pruners.ThresholdPruner(upper=-1.0)
    cut = search(mk, {'lr': Choice([3e-2])}, sampler='grid', pruner=always, epochs=2, folds=3, data=data)
    assert cut.runs[0]['status'] == 'pruned' and len(cut.runs[0]['folds']) == 1 and cut.n_pruned == 1
    with pytest.raises(ValueError, match=r'folds must be an integer >= 2 and come with data='):
        search(mk, {'lr': Choice([3e-2])}, folds=3)
