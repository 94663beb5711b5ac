"""grid_search: fair comparisons (same initial weights and data order), the run log and skipping finished runs,
divergence, the table, plots and seed 004's over/under-fitting verdicts; resuming an interrupted grid."""
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

from minifast import Callback, Learner, accuracy, diagnose, grid_search, read_log
from minifast.grid import append_record, plain

from conftest import make_data


class Probe(Callback):
    """Records the initial weights and the first training batch's targets of each fit."""
    seen = []

    def before_fit(self, learn):
        self.w0 = [p.detach().clone() for p in learn.model.parameters()]

    def before_batch(self, learn):
        if learn.training and learn.train_iter == 0:
            Probe.seen.append((self.w0, learn.yb.clone()))


def make_learner(calls=None, hidden=16):
    if calls is not None:
        calls.append(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))  # unseeded
    return Learner(make_data(n_train=96), model, silent=True, metrics=[accuracy], callback_fns=[Probe])


def test_every_run_starts_from_the_same_weights_and_data_order():
    Probe.seen = []
    res = grid_search(make_learner, {'wd': [1e-2, 0.], 'moms': [(0.95, 0.85), (0.99, 0.9)]}, epochs=1)
    assert len(res.runs) == 4 == len(Probe.seen)
    w0, y0 = Probe.seen[0]
    for w, y in Probe.seen[1:]:
        assert all(torch.equal(a, b) for a, b in zip(w0, w)) and torch.equal(y0, y)
    assert [r['config'] for r in res.runs] == [{'wd': 0.01, 'moms': [0.95, 0.85]}, {'wd': 0.01, 'moms': [0.99, 0.9]},
                                               {'wd': 0.0, 'moms': [0.95, 0.85]}, {'wd': 0.0, 'moms': [0.99, 0.9]}]


def test_identical_configs_give_identical_results():
    res = grid_search(make_learner, [{'wd': 1e-3}, {'wd': 1e-3}, {'wd': 1e-1}], epochs=2, max_lr=1e-2)
    a, b, c = res.runs
    assert a['steps'] == b['steps'] and a['final'] == b['final']
    assert a['steps']['loss'] != c['steps']['loss']


def test_record_has_per_epoch_rows_and_per_step_traces():
    res = grid_search(make_learner, {'moms': [(0.95, 0.85)]}, epochs=3, max_lr=1e-2)
    (r,) = res.runs
    assert r['status'] == 'done' and r['seed'] == 0 and r['config'] == {'moms': [0.95, 0.85]}
    assert [e['epoch'] for e in r['epochs']] == [0, 1, 2]
    assert set(r['epochs'][0]) == {'epoch', 'train_loss', 'valid_loss', 'accuracy', 'time'}
    assert len(r['steps']['lr']) == len(r['steps']['mom']) == len(r['steps']['loss']) == 18
    assert max(r['steps']['lr']) == pytest.approx(1e-2, rel=0.02) and r['steps']['mom'][0] == pytest.approx(0.95)
    assert r['final']['valid_loss'] == r['epochs'][-1]['valid_loss']


def test_log_is_jsonl_and_finished_runs_are_skipped(tmp_path):
    log, calls = tmp_path / 'runs.jsonl', []
    grid = {'wd': [1e-2, 1e-4]}
    first = grid_search(lambda: make_learner(calls), grid, epochs=1, log=log)
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and len(calls) == 3  # one learner for the shared initial weights, one per run
    assert [json.loads(x)['config'] for x in lines] == [{'wd': 0.01}, {'wd': 0.0001}]
    again = grid_search(lambda: make_learner(calls), grid, epochs=1, log=log)
    assert len(calls) == 3 and len(log.read_text().splitlines()) == 2  # nothing trained, nothing appended
    assert [r['final'] for r in again.runs] == [r['final'] for r in first.runs]
    grid_search(lambda: make_learner(calls), grid, epochs=2, log=log)  # another budget is another run
    assert len(calls) == 6 and len(read_log(log)) == 4
    with open(log, 'a') as f:
        f.write('{"name": "killed while writi')  # a run killed mid-write: its line is ignored
    with pytest.warns(UserWarning, match=r'line\(s\) \[5\] are not valid JSON'):
        assert len(read_log(log)) == 4
    with pytest.warns(UserWarning, match='not valid JSON'):
        grid_search(lambda: make_learner(calls), {'wd': [1e-2, 1e-4, 0.]}, epochs=1, log=log)
    assert len(calls) == 8 and len(read_log(log)) == 5  # only the new config trained


def test_a_diverging_run_is_recorded_and_the_grid_goes_on():
    res = grid_search(make_learner, [{'max_lr': 1e9}, {'max_lr': 1e-2}], epochs=2)
    assert [r['status'] for r in res.runs] == ['diverged', 'done']
    assert res.best()['config'] == {'max_lr': 0.01}
    assert 'diverged' in res.table()


def test_constant_policy_keeps_the_lr_and_the_table_lists_both():
    res = grid_search(make_learner, {'policy': ['one_cycle', 'constant']}, epochs=2, max_lr=1e-2)
    one, const = res.runs
    assert len(set(const['steps']['lr'])) == 1 and const['steps']['lr'][0] == pytest.approx(1e-2)
    assert len(set(one['steps']['lr'])) > 2
    rows = res.rows()
    assert [r['policy'] for r in rows] == ['one_cycle', 'constant']
    assert {'train_loss', 'valid_loss', 'accuracy', 'seconds', 'status', 'verdict'} <= set(rows[0])
    assert len(res.table().splitlines()) == 3


def test_a_config_lr_is_the_one_cycle_peak():
    # {'lr': [...]} under the default one_cycle policy must train those lrs, not max_lr under their names
    res = grid_search(make_learner, {'lr': [1e-3, 5e-2]}, epochs=1, max_lr=1e-2)
    peaks = [max(r['steps']['lr']) for r in res.runs]
    assert peaks == [pytest.approx(1e-3, rel=0.05), pytest.approx(5e-2, rel=0.05)]
    assert res.runs[0]['final'] != res.runs[1]['final']
    both = grid_search(make_learner, [{'lr': 1e-3, 'max_lr': 5e-2}], epochs=1)  # max_lr wins, as lr does for 'constant'
    assert max(both.runs[0]['steps']['lr']) == pytest.approx(5e-2, rel=0.05)


def test_make_learner_gets_the_other_keys():
    res = grid_search(make_learner, {'hidden': [4, 32]}, epochs=1)
    assert [r['config'] for r in res.runs] == [{'hidden': 4}, {'hidden': 32}]
    assert all(r['status'] == 'done' for r in res.runs)


def test_plots():
    res = grid_search(make_learner, {'wd': [1e-2, 0.]}, epochs=2)
    fig = res.plot()
    assert len(fig.axes[0].lines) == 2 and fig.axes[0].get_ylabel() == 'valid_loss'
    fig2 = res.plot_losses()
    assert sum(len(a.lines) == 2 for a in fig2.axes) == 2
    assert res.verdicts().count('\n') == 1
    plt.close('all')


@pytest.mark.parametrize('valid, word', [
    ([1.0, 0.8, 0.6], 'underfitting'),
    ([1.0, 0.6, 0.7, 0.9], 'overfitting'),
    ([1.0, 0.6, 0.6], 'flat'),
    ([1.0, 0.6, 0.5999], 'underfitting'),  # still falling, however little
    ([1.0], 'too short'),
    ([None, float('nan')], 'too short'),
])
def test_diagnose(valid, word):
    got, why = diagnose(valid)
    assert got == word and why
    if word == 'overfitting':
        assert 'rose from 0.6000 (epoch 1) to 0.9000' in why


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match=r"grid\['wd'\] must be a non-empty list"):
        grid_search(make_learner, {'wd': 1e-4})
    with pytest.raises(ValueError, match='policy must be one of'):
        grid_search(make_learner, {'wd': [0.]}, policy='cosine')
    with pytest.raises(ValueError, match=r"'constant' policy takes lr \(or max_lr\) and wd only, not \['moms'\]"):
        grid_search(make_learner, [{'policy': 'constant', 'moms': (0.9, 0.8)}])
    with pytest.raises(ValueError, match='grid is empty'):
        grid_search(make_learner, [])


def test_best_mode_follows_the_monitor():
    res = grid_search(make_learner, {'wd': [1e-2, 0.]}, epochs=2)
    by_acc = res.best('accuracy')
    assert by_acc['final']['accuracy'] == max(r['final']['accuracy'] for r in res.runs)
    assert math.isfinite(res.best()['final']['valid_loss'])


def test_fixed_settings_apply_to_every_run_but_stay_out_of_the_names():
    res = grid_search(make_learner, {'wd': [1e-2, 0.]}, epochs=1, fixed={'moms': (0.99, 0.9)})
    assert [r['name'] for r in res.runs] == ['wd=0.01', 'wd=0']
    assert all(r['fixed'] == {'moms': [0.99, 0.9]} and r['steps']['mom'][0] == pytest.approx(0.99) for r in res.runs)
    plain = grid_search(make_learner, {'wd': [1e-2]}, epochs=1)
    assert plain.runs[0]['steps']['mom'][0] == pytest.approx(0.95)


# ---- edge cases found in review (each failed before its fix) ---------------------------------------------------------
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


def test_grid_plain_and_append_record_are_public(tmp_path):
    assert plain({'a': (1, np.float32(0.5)), 2: slice(None, 3), 'n': float('nan')}) == \
        {'a': [1, 0.5], '2': 'slice(None, 3)', 'n': None}
    log = tmp_path / 'runs.jsonl'
    log.write_text('{"cut": ')  # a record cut short by a kill: the next one starts on a line of its own
    append_record(log, {'x': 1})
    with pytest.warns(UserWarning, match='not valid JSON'):
        assert read_log(log) == [{'x': 1}]
