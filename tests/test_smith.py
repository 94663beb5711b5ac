"""`minifast smith`: Smith's workflow end to end on tiny settings, its outputs, its run log, and re-running it."""
import json
import os
import re
import subprocess
import sys
import time

from pathlib import Path

import pytest

import minifast
from minifast.cli import main

PNGS = ('batch.png', 'lr_find.png', 'superconvergence.png', 'momentum.png', 'wd.png', 'wd_fine.png',
        'final_losses.png', 'final_lr.png', 'final_metrics.png', 'interpolation.png')
N_GRID = 2 + 2 + 4 + 2  # 1cycle vs constant, two momentum pairs, four wd values, two half-decade neighbours


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
    assert re.search(rf'0 grid run\(s\) trained, {N_GRID} skipped', out), out
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
