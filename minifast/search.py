"""Hyper-parameter search on Optuna: random, grid or TPE sampling over log-uniform / uniform / int / categorical
spaces, pruning of hopeless trials after each epoch, and many worker processes (or machines) sharing one study, each
trial run exactly once.

Optuna is imported only when a search runs (it is an optional extra). The study's storage is the source of truth:
every finished trial's run record (grid.run_record, with its key, fixed settings, trial and slot numbers) is a user
attribute of its Optuna trial, and SearchResult reads them back; a JSONL `log=` is an export.

Exactly once: a search of n trials has n slots 0..n-1. A worker claims the lowest slot that no finished record holds
and no live RUNNING trial claims, by writing the slot into its trial (committed at once) and then reading the study
again: if another RUNNING trial claims that slot too, it yields (its trial ends FAIL with 'yielded') and tries again
after a random pause. Of two claimants the later writer reads after both writes, so at most one goes on. A killed
worker's trial stops sending heartbeats, is failed as stale, and its slot is taken by a waiting worker with the same
parameters, which resumes from the slot's Checkpoint.
"""
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import socket
import threading
import time
import warnings
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from .callbacks.tracking import Checkpoint, monitor_mode, monitored_values
from .core import Callback, CancelFitException
from .determinism import set_seed
from .distributed import launched
from .crossval import CVResult, cross_validate
from .grid import (POLICIES, GridResult, append_record, config_name, fit_run, fresh_learner, initial_weights, plain,
                   run_key, run_record, split_config, tracked)
from .resume import find_checkpoint, resumable

__all__ = ['search', 'SearchResult', 'LogUniform', 'Uniform', 'IntRange', 'Choice', 'OptunaPruning',
           'open_storage', 'SAMPLERS', 'PRUNERS', 'publish', 'wait_for', 'quiet_optuna',
           'worker_id']

SAMPLERS = ('tpe', 'random', 'grid')
PRUNERS = ('median', 'hyperband', None)
HEARTBEAT_ATTR = 'minifast_heartbeat'  # the journal storage's heartbeat (wall-clock seconds), a trial system attr


def _real(x):
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


class _Range:
    log = False

    def __init__(self, low, high):
        self.low, self.high = low, high

    def __repr__(self):
        return f'{type(self).__name__}({self.low!r}, {self.high!r}' + (', log=True)' if self.log else ')')

    def check(self, key):
        """Raise, naming `key` and the bad bound, unless the bounds make a range."""
        who = f'search: space[{key!r}] = {self!r}'
        if not (_real(self.low) and _real(self.high)):
            raise ValueError(f'{who}: low and high must be finite numbers')
        if not self.low < self.high:
            raise ValueError(f'{who}: low ({self.low}) must be below high ({self.high})')
        if self.log and self.low <= 0:
            raise ValueError(f'{who}: a log scale needs low > 0, got low={self.low}')

    def base(self):
        return self.low

    def points(self):
        return None  # a continuous range has no grid

    def label(self, value):
        return value

    def value(self, label):
        return label


class LogUniform(_Range):
    """A float drawn log-uniformly from [low, high] (learning rates, weight decay)."""
    log = True

    def __repr__(self):
        return f'LogUniform({self.low!r}, {self.high!r})'

    def draw(self, rng):
        return float(min(self.high, max(self.low, math.exp(rng.uniform(math.log(self.low), math.log(self.high))))))

    def suggest(self, trial, key):
        return trial.suggest_float(key, self.low, self.high, log=True)


class Uniform(_Range):
    """A float drawn uniformly from [low, high] (dropout, pct_start)."""

    def draw(self, rng):
        return float(min(self.high, max(self.low, rng.uniform(self.low, self.high))))

    def suggest(self, trial, key):
        return trial.suggest_float(key, self.low, self.high)


class IntRange(_Range):
    """An integer from low to high, both included; log=True draws it log-uniformly (layer widths)."""

    def __init__(self, low, high, log=False):
        super().__init__(low, high)
        self.log = log

    def check(self, key):
        for b in (self.low, self.high):
            if not isinstance(b, Integral) or isinstance(b, bool):
                raise ValueError(f'search: space[{key!r}] = {self!r}: bounds must be integers, got {b!r}')
        super().check(key)

    def draw(self, rng):
        if not self.log:
            return int(rng.integers(self.low, self.high + 1))
        x = math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1)))
        return int(min(self.high, max(self.low, math.floor(x))))

    def points(self):
        return list(range(self.low, self.high + 1))

    def suggest(self, trial, key):
        return trial.suggest_int(key, self.low, self.high, log=self.log)


_CATEGORICAL = (type(None), bool, int, float, str)  # what Optuna's categorical distribution takes


class Choice:
    """One of `values` (any values: tuples such as moms pairs too; Optuna sees them as labels, the config holds the
    value itself)."""

    def __init__(self, values):
        self.values = list(values) if isinstance(values, (list, tuple, range)) else values

    def __repr__(self):
        return f'Choice({self.values!r})'

    def check(self, key):
        if not isinstance(self.values, list) or not self.values:
            raise ValueError(f'search: space[{key!r}] = Choice({self.values!r}): give a non-empty list of values')
        seen = [json.dumps(plain(v), sort_keys=True) for v in self.values]
        dup = sorted({s for s in seen if seen.count(s) > 1})
        if dup:
            raise ValueError(f'search: space[{key!r}] = {self!r}: the value(s) {", ".join(dup)} appear twice')

    def labels(self):
        """Optuna's categorical choices: the values when Optuna takes them, else their JSON text."""
        if all(isinstance(v, _CATEGORICAL) for v in self.values):
            return list(self.values)
        return [json.dumps(plain(v)) for v in self.values]

    def label(self, value):
        return self.labels()[self.values.index(value)]

    def value(self, label):
        return self.values[self.labels().index(label)]

    def base(self):
        return self.values[0]

    def points(self):
        return list(self.values)

    def draw(self, rng):
        return self.values[int(rng.integers(len(self.values)))]

    def suggest(self, trial, key):
        return self.value(trial.suggest_categorical(key, self.labels()))


def _check_space(space, fixed):
    if not isinstance(space, dict) or not space:
        raise ValueError(f'search: space must be a non-empty dict {{config key: LogUniform/Uniform/IntRange/Choice}}, '
                         f'got {space!r:.80}')
    for k, dim in space.items():
        if not isinstance(k, str):
            raise ValueError(f'search: space keys are config keys (strings), got {k!r}')
        if not isinstance(dim, (_Range, Choice)):
            raise ValueError(f'search: space[{k!r}] must be LogUniform, Uniform, IntRange or Choice, got {dim!r:.60}'
                             f' (a setting shared by every trial goes in fixed=)')
        dim.check(k)
    both = sorted(set(space) & set(fixed))
    if both:
        raise ValueError(f'search: {both} are both searched (space) and fixed (fixed=); give each setting once')


def _grid_points(space):
    """Every point of the product of the space's values, in order (the last key varying fastest)."""
    bad = [k for k, d in space.items() if d.points() is None]
    if bad:
        raise ValueError(f"search: sampler='grid' needs Choice or IntRange for every key; {bad} "
                         f'{"is" if len(bad) == 1 else "are"} continuous ({", ".join(repr(space[k]) for k in bad)})')
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k].points() for k in keys))]


class _Plan:
    """The config of each slot where it is fixed in advance: the grid's i-th point, or the i-th random draw (a
    numpy Generator seeded with (sampler_seed, i)), so the table does not depend on the number of workers. TPE's
    first `n_random` slots are the random draws too; later TPE slots have none (TPE suggests)."""

    def __init__(self, space, sampler, sampler_seed, n_random):
        self.space, self.sampler, self.seed, self.n_random = space, sampler, sampler_seed, n_random
        self.grid = _grid_points(space) if sampler == 'grid' else None

    def __call__(self, slot):
        if self.grid is not None:
            return self.grid[slot]
        if self.sampler == 'tpe' and slot >= self.n_random:
            return None
        rng = np.random.default_rng([self.seed, slot])
        return {k: d.draw(rng) for k, d in self.space.items()}


def _planned_sampler(base_for):
    """An Optuna sampler that answers with the fixed parameters of a trial when it has some (a planned slot, or a
    retry of a killed trial's slot), else asks `base_for(trial number)`: trial.params stay right for Optuna's own
    tools. Only independent sampling (TPE's default): relative sampling happens when a trial is asked, before its
    slot is known."""
    import optuna  # an optional extra: imported when a search runs

    class PlannedSampler(optuna.samplers.BaseSampler):
        def __init__(self):
            self.fixed, self.bases = {}, {}

        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, param_name, param_distribution):
            fixed = self.fixed.get(trial.number)
            if fixed is not None and param_name in fixed:
                return fixed[param_name]
            if trial.number not in self.bases:
                self.bases[trial.number] = base_for(trial.number)
            return self.bases[trial.number].sample_independent(study, trial, param_name, param_distribution)

    return PlannedSampler()


def _pruner(pruner, epochs):
    import optuna
    if pruner is None:
        return optuna.pruners.NopPruner()
    if pruner == 'median':
        # after 4 finished trials, a trial whose value is worse than the median of the others at the same epoch
        # stops; the first quarter of the epochs is never judged (a one-cycle warm-up's values mislead)
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=epochs // 4)
    if pruner == 'hyperband':
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    raise ValueError(f'search: pruner must be one of {PRUNERS} or an optuna pruner, got {pruner!r}')


class OptunaPruning(Callback):
    """Reports `monitor` to the Optuna `trial` after each epoch (step = epoch) and stops the fit
    (CancelFitException) when the study's pruner says the trial is hopeless; `pruned` then says so. A resumed fit
    reports the epochs its checkpoint had done too."""
    order = 60  # after the Recorder (50): the epoch's values are in it

    def __init__(self, trial, monitor='valid_loss'):
        self.trial, self.monitor, self.pruned, self.reported = trial, monitor, False, set()

    def before_fit(self, learn):
        self.pruned = False

    def after_epoch(self, learn):
        for e, v in enumerate(monitored_values(learn.recorder, self.monitor)):
            if e not in self.reported and v is not None and math.isfinite(v):
                self.trial.report(float(v), e)
                self.reported.add(e)
        # the last epoch is the trial's end: nothing left to save by stopping
        if learn.epoch + 1 < learn.n_epoch and self.trial.should_prune():
            self.pruned = True
            raise CancelFitException()


def open_storage(storage, heartbeat_interval=10, grace_period=30):
    """An Optuna storage: None -> in memory (one process); 'journal:PATH' or a path ending in '.log' -> Optuna's
    journal file (a shared file system; minifast's own heartbeat); any other 'dialect://...' string -> an RDBStorage
    (SQLite, PostgreSQL, MySQL) with Optuna's heartbeat; an Optuna storage object is used as it is."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    if storage is None:
        return optuna.storages.InMemoryStorage()
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    text, path = str(storage), _journal_file(storage)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if '://' not in text:
        raise ValueError(f"search: storage {text!r} is neither a database URL ('sqlite:///study.db', "
                         f"'postgresql://user@host/db'), a journal file ('journal:PATH' or a .log path) nor None")
    kw = {'connect_args': {'timeout': 60}} if text.startswith('sqlite') else {'pool_pre_ping': True}
    for attempt in range(5):  # workers started together race to create the tables of a new database
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(text, engine_kwargs=kw, heartbeat_interval=heartbeat_interval,
                                                  grace_period=grace_period)
        except Exception:  # noqa: BLE001 (sqlalchemy's errors vary by dialect) the last try raises
            if attempt == 4:
                raise
            time.sleep(0.2 + random.random())


def _journal_file(storage):
    """The file of a journal storage ('journal:PATH', or a path ending in .log), else None."""
    text = str(storage) if isinstance(storage, (str, Path)) else ''
    if text.startswith('journal:'):
        return Path(text[len('journal:'):])
    return Path(text) if text.endswith('.log') and '://' not in text else None


def _storage_file(storage):
    """The file of a SQLite or journal storage (where checkpoints go by default), else None."""
    text = str(storage) if isinstance(storage, (str, Path)) else ''
    if text.startswith('sqlite:///') and len(text) > len('sqlite:///'):
        return Path(text[len('sqlite:///'):])
    return _journal_file(storage)


@contextlib.contextmanager
def quiet_optuna():
    """Optuna's INFO lines (a line per trial, 'Using an existing study') off for the body of a with statement: the
    search prints its own table; Optuna's verbosity is restored afterwards (no lasting side effect)."""
    import optuna
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(old, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(old)


def _state(t):
    return t.state.name  # 'RUNNING', 'COMPLETE', 'PRUNED', 'FAIL', 'WAITING'


def _finished(t):
    """Whether trial `t` holds a finished run of its slot (a record, told COMPLETE or PRUNED)."""
    return _state(t) in ('COMPLETE', 'PRUNED') and 'record' in t.user_attrs


class _Heartbeat:
    """While a trial runs: Optuna's heartbeat for an RDBStorage (the database's clock judges staleness), else a
    wall-clock heartbeat in a trial system attribute (the journal file: machines sharing it need synchronised
    clocks, within the grace period)."""

    def __init__(self, storage, trial_id, interval):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def beat(self):
        if callable(getattr(self.storage, 'record_heartbeat', None)):
            self.storage.record_heartbeat(self.trial_id)
        else:
            self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_ATTR, time.time())

    def _run(self):
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a finished trial refuses beats; the next ask starts a new one
                self.beat()

    def __enter__(self):
        self.beat()  # before the trial claims a slot: a claim is never made by a trial without a heartbeat
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class _Search:
    """One worker's view of a shared search (see the module's docstring for the slot protocol)."""

    def __init__(self, study, raw, n, plan, sampler, args):
        self.study, self.raw, self.n, self.plan, self.sampler, self.a = study, raw, n, plan, sampler, args
        self.study_id = raw.get_study_id_from_name(study.study_name)
        self.sign = 1 if monitor_mode(args['monitor'], args['mode']) == 'min' else -1
        self.init = None

    def trials(self):
        # straight from the storage, not Optuna's cache: a claim must see every other trial's latest attributes
        return self.raw.get_all_trials(self.study_id, deepcopy=False)

    def slots(self, trials, mine=None):
        """(finished slots, slots claimed by RUNNING trials other than trial number `mine`)."""
        done = {t.user_attrs.get('slot') for t in trials if _finished(t)}
        running = {t.user_attrs.get('slot') for t in trials if _state(t) == 'RUNNING' and t.number != mine
                   and 'slot' in t.user_attrs}
        return done - {None}, running - {None}

    def free_slot(self):
        """The lowest free slot; None when every slot is finished or claimed by a running trial; 'all done'."""
        done, running = self.slots(self.trials())
        if len(done) >= self.n:
            return 'all done'
        return next((i for i in range(self.n) if i not in done and i not in running), None)

    def claim(self, trial, slot):
        """Write the claim, then read: True unless another running or finished trial holds `slot`."""
        trial.set_user_attr('slot', slot)
        done, running = self.slots(self.trials(), mine=trial.number)
        return slot not in done and slot not in running

    def fail_stale(self):
        """Fail the RUNNING trials whose heartbeat stopped (their worker was killed)."""
        import optuna
        if callable(getattr(self.raw, 'record_heartbeat', None)):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
            return
        now = time.time()
        for t in self.trials():
            beat = t.system_attrs.get(HEARTBEAT_ATTR)
            if _state(t) == 'RUNNING' and beat is not None and now - beat > self.a['grace_period']:
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    self.raw.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)

    def fixed_params(self, slot):
        """Optuna's parameter values for `slot`: an earlier attempt's (a retry continues the same run), else the
        plan's, else None (TPE chooses)."""
        space = self.a['space']
        for t in self.trials():
            if t.user_attrs.get('slot') == slot and set(space) <= set(t.params) and 'yielded' not in t.user_attrs:
                return {k: t.params[k] for k in space}
        planned = self.plan(slot)
        return None if planned is None else {k: space[k].label(v) for k, v in planned.items()}

    def reusable(self, key):
        """A finished (not pruned) record of the run `key` in the study, or None."""
        want = json.dumps(key, sort_keys=True)
        return next((t.user_attrs['record'] for t in self.trials() if _state(t) == 'COMPLETE' and 'record' in
                     t.user_attrs and json.dumps(t.user_attrs['record'].get('key'), sort_keys=True) == want), None)

    def work(self):
        """Run free slots until every slot is finished, waiting for (and taking over from) other workers."""
        import optuna
        pause = min(2.0, max(0.2, self.a['heartbeat_interval'] / 2))
        while True:
            slot = self.free_slot()
            if slot == 'all done':
                return
            if slot is None:  # every open slot runs elsewhere: wait for them, or for one to go stale
                self.fail_stale()
                time.sleep(pause)
                continue
            with warnings.catch_warnings():  # ask/tell with our own heartbeat thread, as optimize does it
                warnings.filterwarnings('ignore', 'Heartbeat of storage is supposed to be used')
                trial = self.study.ask()
            with _Heartbeat(self.raw, trial._trial_id, self.a['heartbeat_interval']):
                if not self.claim(trial, slot):
                    trial.set_user_attr('yielded', f'yielded slot {slot}')
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    time.sleep(random.uniform(0.05, 0.5))
                    continue
                self.run(trial, slot)

    def checkpoint_folder(self, learn, key):
        ck = self.a['checkpoints']
        if ck is False or (ck is None and self.a['in_memory']):
            return None  # an in-memory study dies with its process: nothing could resume
        root = Path(ck) if ck is not None else learn.path / 'search_checkpoints'
        return root / self.study.study_name / hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def run(self, trial, slot):
        """Train the run of `slot` in `trial` (or reuse its finished record) and store its record in the study."""
        import optuna
        a = self.a
        params = self.fixed_params(slot)
        if params is not None:
            self.sampler.fixed[trial.number] = params
        config = {k: d.suggest(trial, k) for k, d in a['space'].items()}
        if a['configs'] is not None:  # a list of configs: the one chosen is the config
            config = dict(config['config'])
        full = {**a['fixed'], **config}
        pol, n_ep, fit, made = split_config(full, a['policy'], a['epochs'])
        key = run_key(full, a['seed'], n_ep, a['max_lr'], pol, a['tag'])
        rec = self.reusable(key)
        if rec is not None:  # the same run (config and seed) already finished in another slot
            rec = {**rec, 'reused': rec.get('trial')}
            if a['tracker'] is not None:
                a['tracker'].log_record(rec, name=f'trial {trial.number} {config_name(config)}')
        else:
            try:
                rec = self.train(trial, config, made, fit, pol, n_ep, key)
                rec['worker'] = worker_id()
            except BaseException as e:  # an error or Ctrl-C: the slot stays open for a later run
                with contextlib.suppress(Exception):
                    trial.set_user_attr('error', f'{type(e).__name__}: {e}'[:500])
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
        rec.update(key=key, fixed=plain(a['fixed']), trial=trial.number, slot=slot)
        self.finish(trial, rec, key)

    def train(self, trial, config, made, fit, pol, n_ep, key):
        a = self.a
        if a['folds']:
            return self.cross_validate(trial, config)
        if self.init is None:
            self.init = initial_weights(a['make_learner'], a['base'], a['seed'])
        learn = fresh_learner(a['make_learner'], made, self.init, a['seed'], a['silent'])
        if not learn.silent:
            print(f'search trial {trial.number} (slot {trial.user_attrs["slot"]}): {config}', flush=True)
        pruning = OptunaPruning(trial, a['monitor'])
        cbs, resume, folder = [pruning], None, self.checkpoint_folder(learn, key)
        if folder is not None:
            if folder.exists() and not resumable(folder):
                shutil.rmtree(folder)  # a finished or unusable state: this attempt starts over
            resume = folder if folder.exists() and find_checkpoint(folder) is not None else None
            cbs.append(Checkpoint(path=folder, every='epoch', monitor=a['monitor'], mode=a['mode'], keep_last=1))
        resumed = find_checkpoint(resume).name if resume is not None else None
        set_seed(a['seed'])
        t0 = time.perf_counter()
        with tracked(a['tracker'], f'trial {trial.number} {config_name(config)}',
                     {**plain(config), 'seed': a['seed'], 'trial': trial.number}) as extra:
            status = fit_run(learn, pol, n_ep, dict(fit), a['max_lr'], callbacks=cbs + extra, resume=resume)
        status = 'pruned' if pruning.pruned and status == 'done' else status
        rec = run_record(learn, config, a['seed'], status, time.perf_counter() - t0)
        if resumed is not None:
            rec['resumed_from'] = resumed
        rec['_folder'] = str(folder) if folder is not None else None
        return rec

    def cross_validate(self, trial, config):
        """The record of `config` scored by k-fold cross-validation of `data` (the mean over folds): after each fold
        the running mean of the monitor is reported (step = fold) and the pruner may stop the trial there."""
        a, done = self.a, []
        if self.init is None:  # from the whole training set's learner: the folds' models have its shapes
            self.init = initial_weights(lambda **kw: a['make_learner'](data=a['data'], **kw), a['base'], a['seed'])

        def on_fold(i, rec):
            done.append(rec)
            v = CVResult(done, monitor=a['monitor']).mean.get(a['monitor'])
            if v is not None and math.isfinite(v):
                trial.report(float(v), i)
            if i + 1 < a['folds'] and trial.should_prune():
                raise _FoldsPruned()

        status = None
        try:
            cv = cross_validate(a['make_learner'], a['data'], k=a['folds'], config={**a['fixed'], **config},
                                epochs=a['epochs'], max_lr=a['max_lr'], seed=a['seed'], policy=a['policy'],
                                monitor=a['monitor'], silent=a['silent'], on_fold=on_fold, init=self.init)
        except _FoldsPruned:
            cv, status = CVResult(done, monitor=a['monitor']), 'pruned'
        rec = cv.record(name=config_name(config))
        rec.update(config=plain(config), name=config_name(config), _folder=None)
        if status is not None:
            rec['status'] = status
        if a['tracker'] is not None:
            a['tracker'].log_record(rec, name=f'trial {trial.number} {config_name(config)}')
        return rec

    def finish(self, trial, rec, key):
        """Store the record and tell Optuna; a trial failed meanwhile as stale keeps nothing (another worker runs
        its slot)."""
        import optuna
        folder = rec.pop('_folder', None)
        v = rec['final'].get(self.a['monitor'])
        try:
            trial.set_user_attr('record', rec)
            if rec['status'] == 'pruned':
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:  # a diverged run (or no value) is the worst value, so TPE learns to avoid it
                ok = rec['status'] == 'done' and v is not None and math.isfinite(v)
                self.study.tell(trial, v if ok else self.sign * math.inf)
        except optuna.exceptions.UpdateFinishedTrialError:
            warnings.warn(f'search: trial {trial.number} (slot {rec["slot"]}) was failed by another worker while it '
                          f'ran (its heartbeat was stale); its result is dropped and the slot runs elsewhere')
            return
        if self.a['log'] is not None:
            append_record(self.a['log'], rec)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


class _FoldsPruned(Exception):
    """The pruner stopped a cross-validated trial after a fold."""


class SearchResult(GridResult):
    """The finished trials of a search, read from its Optuna storage: GridResult's table, plots and verdicts
    (a pruned trial shows status 'pruned' and is never the best), plus `study` and counts of the trials done,
    pruned, diverged and failed (attempts killed or stopped by an error; their slots ran again)."""

    def __init__(self, runs, monitor='valid_loss', study=None, n_failed=0):
        super().__init__(runs, monitor)
        self.study, self.n_failed = study, n_failed

    @property
    def n_complete(self):
        """Trials that trained to the end."""
        return sum(r['status'] == 'done' for r in self.runs)

    @property
    def n_pruned(self):
        """Trials the pruner stopped early."""
        return sum(r['status'] == 'pruned' for r in self.runs)

    @property
    def n_diverged(self):
        """Trials whose loss became non-finite."""
        return sum(r['status'] == 'diverged' for r in self.runs)

    @classmethod
    def from_study(cls, study, monitor=None):
        """The result of an Optuna study a search wrote (records in slot order)."""
        trials = study.get_trials(deepcopy=False)
        info = study.user_attrs.get('minifast') or {}
        runs = sorted((t.user_attrs['record'] for t in trials if _finished(t)), key=lambda r: r.get('slot', 0))
        failed = sum(_state(t) == 'FAIL' and 'slot' in t.user_attrs and 'yielded' not in t.user_attrs
                     for t in trials)
        return cls(runs, monitor or info.get('monitor') or 'valid_loss', study, failed)

    @classmethod
    def from_storage(cls, storage, study_name='minifast', monitor=None):
        """The result of the search `study_name` in `storage` (a URL, a journal path or an Optuna storage)."""
        import optuna
        with quiet_optuna():
            return cls.from_study(optuna.load_study(study_name=study_name, storage=open_storage(storage)), monitor)

    def header(self):
        """'study 'x': 20 trials: 14 done, 5 pruned, 1 diverged; 2 failed attempts (ran again)'."""
        name = self.study.study_name if self.study is not None else '?'
        parts = [f'{self.n_complete} done', f'{self.n_pruned} pruned'] + \
            ([f'{self.n_diverged} diverged'] if self.n_diverged else [])
        return (f"SearchResult of study {name!r}: {len(self.runs)} trials: {', '.join(parts)}; "
                f'{self.n_failed} failed attempt(s)')

    def __repr__(self):
        return self.header() + '\n' + self.table()


def _identity(a):
    """What makes two invocations the same search (n_trials aside): a study is only continued by the same one."""
    return plain({'space': {k: repr(d) for k, d in a['space'].items()}, 'sampler': a['sampler'],
                  'sampler_seed': a['sampler_seed'], 'seed': a['seed'], 'epochs': a['epochs'], 'max_lr': a['max_lr'],
                  'policy': a['policy'], 'fixed': a['fixed'], 'tag': a['tag'], 'monitor': a['monitor'],
                  'mode': a['mode'], **({'folds': a['folds']} if a['folds'] else {})})


def _open_study(a, sampler, pruner):
    import optuna
    raw = open_storage(a['storage'], a['heartbeat_interval'], a['grace_period'])
    direction = 'minimize' if monitor_mode(a['monitor'], a['mode']) == 'min' else 'maximize'
    study = optuna.create_study(storage=raw, study_name=a['study_name'], sampler=sampler, pruner=pruner,
                                direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ValueError(f"search: study {a['study_name']!r} in {a['storage']} is a {study.direction.name.lower()} "
                         f"study; monitor {a['monitor']!r} needs {direction}")
    mine = _identity(a)
    theirs = study.user_attrs.get('minifast')
    if theirs is None:
        study.set_user_attr('minifast', mine)  # workers starting together write the same value
    elif theirs != mine:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ValueError(f"search: study {a['study_name']!r} in {a['storage']} was started with other settings "
                         f"({', '.join(f'{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here' for k in diff)}); "
                         f'run the same search to continue it, or give another study_name')
    return study, raw


def search(make_learner, space, n_trials=None, sampler='tpe', pruner='median', epochs=2, max_lr=1e-2, seed=0,
           policy='one_cycle', monitor='valid_loss', mode='auto', storage=None, study_name='minifast', log=None,
           fixed=None, tag=None, silent=None, checkpoints=None, tracker=None, sampler_seed=0, heartbeat_interval=10,
           grace_period=30, n_random=10, folds=None, data=None):
    """Search `space` with Optuna, trials trained as grid_search trains its runs; returns a SearchResult.

    Args:
        make_learner: a function returning a fresh Learner; config keys other than fit's (grid.FIT_KEYS) are its
            keyword arguments.
        space: {config key: LogUniform(lo, hi) | Uniform(lo, hi) | IntRange(lo, hi, log=False) | Choice(values)},
            or a list of config dicts: exactly those configs, one slot each, in order (as grid_search's list of
            configs; the sampler is then 'grid').
        n_trials: the study's total number of trials (not per call or per worker): 20 by default, the whole grid
            for sampler='grid' (a larger n_trials is capped at the grid's size, with a warning).
        sampler: 'random' (slot i's config is the i-th draw of numpy's Generator seeded with (sampler_seed, i)),
            'grid' (slot i is the i-th point of the product of the Choice / IntRange values) or 'tpe' (Optuna's
            TPESampler; its first `n_random` slots are the random draws). Random and grid give the same configs,
            hence the same table, whatever the number of workers; TPE depends on the order trials finish.
        pruner: 'median' (MedianPruner: after 4 finished trials, a trial worse than the median at the same epoch
            stops; the first epochs // 4 epochs are never judged), 'hyperband' (HyperbandPruner, 1 to `epochs`
            epochs), None, or an Optuna pruner. A pruned trial's partial record has status 'pruned'.
        epochs, max_lr, policy, fixed, tag, silent: as grid_search.
        seed: every trial starts from the same initial weights (those make_learner builds after set_seed(seed)
            from the space's base config: `fixed`, and each key's first Choice value or low bound) and sees the same
            data order (set_seed(seed) before each fit), in every worker.
        monitor, mode: the value a trial reports each epoch and ends with; its direction is the study's.
        storage: None (in memory, this process), an SQLAlchemy URL ('sqlite:///study.db', 'postgresql://...':
            Optuna's RDBStorage with heartbeat_interval / grace_period in seconds) or a journal file ('journal:PATH'
            or a path ending in .log, on a file system every worker shares). The storage is the source of truth:
            each trial's record is stored in it, and calling search again with the same arguments trains only the
            slots still missing (a run whose config and seed already finished is reused, not trained).
        study_name: the study in the storage; a study started with other settings is refused, naming them.
        log: a JSONL file each finished trial's record is also appended to (an export; locked appends).
        checkpoints: where each running trial keeps a Checkpoint, so a retry after a killed worker resumes it:
            by default a folder '<study_name>/' under 'search_checkpoints' beside learn.path (the storage's
            folder for SQLite and journal files, as '<file>_checkpoints'); False for none. With an in-memory
            storage there are none unless a folder is given. Use a shared folder for workers on several machines.
        tracker: a tracker (minifast.callbacks.trackers): each trial this worker trains is a child run of it
            (named 'trial N config'), logged live; a trial reused from an equal finished run, or scored by
            cross-validation, is replayed into it from its record.
        folds, data: score each trial by k-fold cross-validation (minifast.crossval.cross_validate) of `data`'s
            training set, make_learner(data=fold, ...) making each fold's learner: the trial's value is the mean
            over folds, reported to the pruner after each fold (a trial can be pruned between folds). A killed
            worker's cross-validated trial starts over (no checkpoints).
        sampler_seed: the seed of the samplers (not of training: that is `seed`).

    Many workers: start the same call in N processes (or on N machines, with a database URL every machine
    reaches): each claims a free slot in the study, so every slot trains exactly once, N at a time. A worker with
    no free slot waits for the others, and takes over the slot of one whose heartbeat stopped for grace_period
    seconds (a killed worker), resuming from its checkpoint when it can reach it. One process per GPU:
    CUDA_VISIBLE_DEVICES=i for the i-th worker. Not under torchrun (each worker is one process).
    """
    if launched():
        raise RuntimeError('search runs as one process per worker, not under torchrun (each worker trains its own '
                           'trials); start several workers instead (one per GPU with CUDA_VISIBLE_DEVICES), or set '
                           'MINIFAST_DISTRIBUTED=0')
    a = _arguments(locals())
    plan = _Plan(a['space'], a['sampler'], sampler_seed, n_random)
    n = _n_trials(n_trials, plan)
    samplers = _base_sampler(a['sampler'], sampler_seed, n_random)
    planned = _planned_sampler(samplers)
    with quiet_optuna():
        study, raw = _open_study(a, planned, _pruner(pruner, epochs))
        _Search(study, raw, n, plan, planned, a).work()
        return SearchResult.from_study(study, monitor)


def _arguments(a):
    """search's arguments, checked, as one dict (with the base config of the initial weights)."""
    if a['policy'] not in POLICIES:
        raise ValueError(f"search: policy must be one of {POLICIES}, got {a['policy']!r}")
    if a['sampler'] not in SAMPLERS:
        raise ValueError(f"search: sampler must be one of {SAMPLERS}, got {a['sampler']!r}")
    for k in ('heartbeat_interval', 'grace_period'):
        if not isinstance(a[k], Integral) or isinstance(a[k], bool) or a[k] < 1:
            raise ValueError(f'search: {k} must be a whole number of seconds >= 1, got {a[k]!r}')
    if a['grace_period'] <= a['heartbeat_interval']:
        raise ValueError(f"search: grace_period ({a['grace_period']} s) must exceed heartbeat_interval "
                         f"({a['heartbeat_interval']} s), or live trials are failed as stale")
    monitor_mode(a['monitor'], a['mode'])
    a = dict(a, fixed=dict(a['fixed'] or {}), configs=None)
    if a['folds'] is not None and (not isinstance(a['folds'], Integral) or isinstance(a['folds'], bool) or
                                   a['folds'] < 2 or a['data'] is None):
        raise ValueError(f"search: folds must be an integer >= 2 and come with data= (the DataBunch whose training "
                         f"set is split), got folds={a['folds']!r}, data={type(a['data']).__name__}")
    if isinstance(a['space'], (list, tuple)):
        if not a['space'] or not all(isinstance(c, dict) for c in a['space']):
            raise ValueError(f"search: a list space must be a non-empty list of config dicts, got {a['space']!r:.80}")
        a['configs'] = [dict(c) for c in a['space']]
        a['space'], a['sampler'] = {'config': Choice(a['configs'])}, 'grid'
    _check_space(a['space'], a['fixed'])
    base = {k: d.base() for k, d in a['space'].items()}
    a['base'] = {**(base['config'] if a['configs'] is not None else base), **a['fixed']}
    a['in_memory'] = a['storage'] is None
    if a['checkpoints'] is None and _storage_file(a['storage']) is not None:
        f = _storage_file(a['storage'])
        a['checkpoints'] = f.parent / f'{f.name}_checkpoints'
    return a


def _n_trials(n_trials, plan):
    if n_trials is not None and (not isinstance(n_trials, Integral) or isinstance(n_trials, bool) or n_trials < 1):
        raise ValueError(f'search: n_trials must be a positive integer, got {n_trials!r}')
    if plan.grid is None:
        return 20 if n_trials is None else n_trials
    size = len(plan.grid)
    if n_trials is not None and n_trials > size:
        warnings.warn(f"search: sampler='grid' has {size} points; n_trials={n_trials} is capped at {size}")
    return size if n_trials is None else min(n_trials, size)


def _base_sampler(sampler, sampler_seed, n_random):
    """A function of the trial number giving the Optuna sampler for parameters no plan fixes (TPE's later slots;
    seeded per trial, so two workers never draw the same sequence)."""
    import optuna

    def make(number):
        s = (sampler_seed * 1_000_003 + number) % 2 ** 32
        if sampler == 'tpe':
            return optuna.samplers.TPESampler(seed=s, n_startup_trials=0)
        return optuna.samplers.RandomSampler(seed=s)
    return make


def _note_study(storage, name):
    import optuna
    with quiet_optuna():
        return optuna.create_study(storage=open_storage(storage), study_name=name, load_if_exists=True)


def worker_id():
    """'host:pid' of this process: the record of a trial says which worker trained it."""
    return f'{socket.gethostname()}:{os.getpid()}'


def publish(storage, name, key, value):
    """Write `value` (JSON-able) under `key` in the storage's study `name` (created when missing): how one worker
    hands others a value they must share, e.g. `minifast smith`'s max_lr to its grid workers."""
    _note_study(storage, name).set_user_attr(key, plain(value))


def wait_for(storage, name, key, poll=1.0, timeout=None):
    """The value `publish` wrote under `key` in the study `name`, waiting for it (TimeoutError after `timeout`
    seconds, naming the study and key; None waits for ever)."""
    study, t0 = _note_study(storage, name), time.monotonic()
    while True:
        attrs = study.user_attrs  # read from the storage at each call
        if key in attrs:
            return attrs[key]
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise TimeoutError(f'search: no {key!r} in study {name!r} of {storage} after {timeout} s')
        time.sleep(poll)
