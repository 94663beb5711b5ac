"""grid_search: fair comparisons (same initial weights and data order), the run log and skipping finished runs,
divergence, the table, plots and seed 004's over/under-fitting verdicts; resuming an interrupted grid."""
import json
import math
import re
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

from minifast import Callback, Learner, accuracy, diagnose, grid_search, read_log
from minifast.grid import GridResult, append_record, plain
from minifast.optim import decay_acts, least_acting_wd

from conftest import make_data, make_mlp


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


# ---- several seeds, ties, weight decay that float32 cannot apply (issue 17) ---------------------------------------
def _rec(name, seed, loss, status='done', wd=None):
    """A run record of config {'x': name} with a final valid loss (for the tie rules)."""
    epochs = [{'epoch': 0, 'train_loss': 1.0, 'valid_loss': loss + 0.1}, {'epoch': 1, 'train_loss': 0.9,
                                                                          'valid_loss': loss}]
    return {'name': name, 'config': {'x': name}, 'seed': seed, 'status': status, 'seconds': 1.0,
            'final': {'train_loss': 0.9, 'valid_loss': loss}, 'verdict': 'underfitting', 'diagnosis': 'falling',
            'epochs': epochs, 'decay': None if wd is None else {'wd': wd, 'true_wd': True, 'steps': 10,
                                                                 'acting_steps': 0}}


def test_seeds_run_every_config_once_per_seed_from_that_seeds_weights():
    Probe.seen = []
    res = grid_search(make_learner, {'wd': [1e-2, 0.]}, epochs=1, seeds=[0, 1])
    assert [(r['config']['wd'], r['seed']) for r in res.runs] == [(0.01, 0), (0.0, 0), (0.01, 1), (0.0, 1)]
    (w0, y0), (w1, _), (w2, y2), (w3, _) = Probe.seen
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    assert same(w0, w1) and same(w2, w3) and not same(w0, w2)  # same weights within a seed, other weights across
    assert not torch.equal(y0, y2)  # and another data order
    (a, b) = res.summary()
    assert a['seeds'] == [0, 1] and a['n'] == 2 and a['final']['valid_loss'] == pytest.approx(
        np.mean([r['final']['valid_loss'] for r in res.runs[::2]]))
    assert a['sd']['valid_loss'] == pytest.approx(np.std([r['final']['valid_loss'] for r in res.runs[::2]], ddof=1))
    table = res.table()
    assert len(table.splitlines()) == 3 and 'valid_loss sd' in table and '0,1' in table


def test_one_seed_in_a_list_is_that_seed():
    a = grid_search(make_learner, {'wd': [1e-2]}, epochs=1, seed=3)
    b = grid_search(make_learner, {'wd': [1e-2]}, epochs=1, seeds=[3])
    assert a.runs[0]['steps'] == b.runs[0]['steps'] and a.runs[0]['seed'] == b.runs[0]['seed'] == 3
    with pytest.raises(ValueError, match='give seed= or seeds=, not both'):
        grid_search(make_learner, {'wd': [0.]}, seed=1, seeds=[0, 1])
    with pytest.raises(ValueError, match='seeds must be a non-empty list of distinct integers'):
        grid_search(make_learner, {'wd': [0.]}, seeds=[0, 0])


def test_a_difference_within_the_seed_to_seed_spread_is_a_tie():
    # b is worse than a on every seed by the same 0.01: not a tie however small; c's differences change sign: a tie
    runs = [_rec('a', s, v) for s, v in enumerate([0.50, 0.52, 0.51])]
    runs += [_rec('b', s, v) for s, v in enumerate([0.51, 0.53, 0.52])]
    runs += [_rec('c', s, v) for s, v in enumerate([0.53, 0.50, 0.52])]
    res = GridResult(runs)
    best = res.best()
    assert best['name'] == 'a' and best['tie'] == ['c'] and best['n'] == 3
    assert [c['rank'] for c in res.summary()] == ['best', 'worse', 'tie']
    rows = res.table().splitlines()
    assert rows[0].split()[-2:] == ['vs', 'best'] and rows[1].endswith('best') and rows[3].endswith('tie')
    assert '+0.0100' in rows[2]
    lines = res.verdicts().splitlines()
    assert 'TIE with c' in lines[0] and 'TIE with the best (a)' in lines[2] and 'TIE' not in lines[1]
    # one seed: only identical results tie
    one = GridResult([_rec('a', 0, 0.5), _rec('b', 0, 0.5), _rec('c', 0, 0.5001)])
    assert one.best()['tie'] == ['b'] and [c['rank'] for c in one.summary()] == ['best', 'tie', 'worse']


def test_a_seed_that_diverged_is_left_out_of_the_comparison():
    runs = [_rec('a', 0, 0.5), _rec('a', 1, 0.6), _rec('b', 0, 0.4), _rec('b', 1, float('nan'), status='diverged')]
    res = GridResult(runs)
    assert res.best()['name'] == 'a'  # b did not finish every seed: not a candidate
    b = res.summary()[1]
    assert b['status'] == 'diverged 1/2' and b['n'] == 1


def test_resumed_grid_with_seeds_trains_only_the_missing_config_seed_pairs(tmp_path):
    log, calls = tmp_path / 'runs.jsonl', []
    full = grid_search(lambda: make_learner(calls), {'wd': [1e-2, 0.]}, epochs=1, seeds=[0, 1], log=log)
    lines = log.read_text().splitlines()
    log.write_text('\n'.join(lines[:2] + lines[3:]) + '\n')  # (wd=0.01, seed 1) lost
    calls.clear()
    again = grid_search(lambda: make_learner(calls), {'wd': [1e-2, 0.]}, epochs=1, seeds=[0, 1], log=log)
    assert len(calls) == 2  # the initial weights of seed 1 and the one missing run
    assert [r['steps'] for r in again.runs] == [r['steps'] for r in full.runs]
    calls.clear()
    grid_search(lambda: make_learner(calls), {'wd': [1e-2, 0.]}, epochs=1, seeds=[0, 1, 2], log=log)
    assert len(calls) == 3 and len(read_log(log)) == 6  # a third seed: its two runs only


def test_a_logged_run_is_reused_by_another_grid_under_that_grids_name(tmp_path):
    log, calls = tmp_path / 'runs.jsonl', []
    first = grid_search(lambda: make_learner(calls), [{'policy': 'one_cycle', 'moms': (0.95, 0.85)}], epochs=1, log=log)
    calls.clear()
    res = grid_search(lambda: make_learner(calls), [{'moms': (0.95, 0.85)}, {'moms': (0.99, 0.9)}], epochs=1,
                      fixed={'policy': 'one_cycle'}, log=log)
    assert len(calls) == 2  # the initial weights and the second config: the first is the logged run
    assert res.runs[0]['steps'] == first.runs[0]['steps'] and res.runs[0]['name'] == 'moms=(0.95, 0.85)'
    assert res.runs[0]['fixed'] == {'policy': 'one_cycle'} and len(read_log(log)) == 2


def test_a_learner_that_is_not_silent_prints_which_run_its_epoch_table_belongs_to(capsys):
    grid_search(make_learner, {'wd': [1e-2, 0.]}, epochs=1, seeds=[0, 1], silent=False)
    out = capsys.readouterr().out.splitlines()
    heads = [i for i, line in enumerate(out) if line.startswith('grid run ')]
    assert [out[i] for i in heads] == ['grid run 1/4: wd=0.01, seed 0', 'grid run 2/4: wd=0, seed 0',
                                       'grid run 3/4: wd=0.01, seed 1', 'grid run 4/4: wd=0, seed 1']
    assert all(out[i + 1].startswith('epoch') for i in heads)  # each header comes just before its table


def test_grid_plots_are_titled_labelled_with_integer_epochs(tmp_path):
    res = grid_search(make_learner, {'wd': [1e-2, 0.]}, epochs=3, seeds=[0, 1])
    fig = res.plot()
    ax = fig.axes[0]
    assert ax.get_title() == 'valid_loss per epoch (mean of 2 seeds, range shaded)'
    assert ax.get_xlabel() == 'Epoch' and len(ax.lines) == 2 and len(ax.collections) == 2
    fig2 = res.plot_losses()
    assert fig2._suptitle.get_text().startswith('Train and validation loss per epoch')
    for a in fig2.axes:
        assert a.get_xlabel() == 'Epoch' and a.get_ylabel() == 'Loss' and 'seeds' in a.get_title()
        assert len(a.lines) == 4  # train and valid of each seed
    for a in (ax, *fig2.axes):
        fig.canvas.draw(), fig2.canvas.draw()
        ticks = [t for t in a.get_xticks() if a.get_xlim()[0] <= t <= a.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    fig.savefig(tmp_path / 'plot.png'), fig2.savefig(tmp_path / 'plot_losses.png')
    plt.close('all')


def test_float32_cannot_apply_decoupled_decay_at_or_below_2_to_the_minus_25():
    tiny = 2. ** -25  # half the float32 spacing below 1: 1 - x rounds to 1.0 for x <= tiny
    assert not decay_acts(1., tiny) and decay_acts(1., tiny * (1 + 1e-6)) and not decay_acts(2.78e-3, 1e-5)
    assert list(decay_acts(np.array([1e-4, 2.78e-3, 3e-3]), 1e-5)) == [False, False, True]
    assert least_acting_wd(2.78e-3) == pytest.approx(1.0721e-5, rel=1e-4)
    w = torch.randn(1000)
    assert torch.equal(w.clone().mul_(1 - tiny), w) and not torch.equal(w.clone().mul_(1 - 1.01 * tiny), w)


def _fit_wd(wd, true_wd=True, lr=2.78e-3):
    learn = Learner(make_data(n_train=96), make_mlp(), silent=True, wd=wd, true_wd=true_wd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        learn.fit_one_cycle(2, lr)
    return [p.detach().clone() for p in learn.model.parameters()], [str(w.message) for w in caught]


def test_fit_warns_when_weight_decay_can_never_act_and_trains_as_without_it():
    none, quiet = _fit_wd(0.)
    inert, said = _fit_wd(1e-5)  # 2.78e-3 * 1e-5 = 2.78e-8 <= 2**-25 at the peak: never applied
    assert all(torch.equal(a, b) for a, b in zip(none, inert))  # bit-identical to wd=0
    assert not quiet and len(said) == 1
    assert re.search(r'weight decay wd=1e-05 cannot change the weights: at the peak lr 0.0027[68] the decoupled factor '
                     r'1 - lr\*wd = 1 - 2.7[68]e-08 rounds to exactly 1.0 in float32.*Use wd > 1.1e-05', said[0]), said
    acting, said = _fit_wd(1.2e-5)  # above the threshold at the peak: it acts, no warning
    assert not said and not all(torch.equal(a, b) for a, b in zip(none, acting))
    l2, said = _fit_wd(1e-5, true_wd=False)  # L2 adds wd*w to the gradient: lr does not shrink it, it acts
    assert not said and not all(torch.equal(a, b) for a, b in zip(none, l2))


def test_a_grid_marks_a_weight_decay_that_never_acted_and_does_not_pick_it():
    with pytest.warns(UserWarning, match='wd=1e-05 cannot change the weights'):  # fit says so too
        res = grid_search(make_learner, {'wd': [1e-5, 0., 1e-1]}, epochs=2, max_lr=2.78e-3)
    noop, zero, big = res.runs
    assert noop['decay'] == {'wd': 1e-5, 'true_wd': True, 'steps': 12, 'acting_steps': 0}
    assert big['decay']['acting_steps'] == 11 and noop['steps'] == zero['steps']  # not the last: lr is max_lr/25e4
    summ = res.summary()
    assert [c['noop'] for c in summ] == [True, False, False]
    assert 'wd no-op' in res.table().splitlines()[1] and 'never acted' in res.verdicts().splitlines()[0]
    if res.best()['name'] != 'wd=0.1':  # identical runs: wd=0 is the pick, the no-op a tie with it
        assert res.best()['name'] == 'wd=0' and res.best()['tie'] == ['wd=1e-05']
    legend = [t.get_text() for t in res.plot().axes[0].get_legend().get_texts()]
    assert 'wd=1e-05 (wd no-op: = wd 0)' in legend and 'wd=0' in legend  # its dashed line drawn over wd=0's
    plt.close('all')


def test_table_gives_seconds_to_a_tenth_and_losses_to_four_places():
    """Seconds had 4 decimals (12.2557) in the table, a precision the timing does not have."""
    runs = [dict(_rec('a', s, 0.51234567), seconds=6.12849) for s in (0, 1)]
    header, row = GridResult(runs).table().splitlines()
    at = header.index('seconds')
    assert row[at:].split()[0] == '12.3' and row[header.index('valid_loss'):].split()[0] == '0.5123'
