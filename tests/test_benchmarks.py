"""The benchmarks' CPU smoke modes, so the scripts cannot rot where no GPU runs them (CI)."""
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch


def _load(name):
    path = Path(__file__).resolve().parents[1] / 'benchmarks' / f'{name}.py'
    spec = importlib.util.spec_from_file_location(f'bench_{name}', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_resnet56_tiny_runs_all_three_runners(tmp_path, capsys):
    out = _load('gpu_resnet56').main(['--tiny', '--json', str(tmp_path / 'r.json')])
    for k in ('hand-written', 'minifast', 'plain fp32'):
        assert out[k]['img_per_s'] > 0 and math.isfinite(out[k]['final']['valid_loss'])
        assert 0 <= out[k]['final']['accuracy'] <= 1
    assert out['ratio_minifast_vs_hand_written'] == out['minifast']['img_per_s'] / out['hand-written']['img_per_s']
    assert json.loads((tmp_path / 'r.json').read_text())['env']['device']
    assert 'RESULT minifast/hand-written' in capsys.readouterr().out


def test_gpu_resnet56_variants_and_profiles(tmp_path, capsys):
    """The diagnostic variants run beside minifast and train the same model (same losses: the variants change how
    the loop runs, not what it computes); --profile writes one summary line per runner."""
    mod = _load('gpu_resnet56')
    out = mod.main(['--tiny', '--baseline-epochs', '0', '--variants', 'no-guard,one-group,no-pred',
                    '--profile', str(tmp_path / 'p.txt')])
    names = ['hand-written', 'minifast', 'minifast[no-guard]', 'minifast[one-group]', 'minifast[no-pred]']
    assert [k for k in out if k in names] == names
    for v in names[2:]:
        assert out[v]['final']['train_loss'] == pytest.approx(out['minifast']['final']['train_loss'], rel=1e-5)
        assert out[v]['accuracy_by_epoch'] == pytest.approx(out['minifast']['accuracy_by_epoch'])
    text = (tmp_path / 'p.txt').read_text()
    for name in names:
        assert re.search(rf'^{re.escape(name)} +wall +\d+\.\d+ ms/step', text, re.M), name
    assert 'aten::copy_' in text
    only = mod.main(['--tiny', '--baseline-epochs', '0', '--runners', 'minifast'])
    assert 'hand-written' not in only and 'ratio_minifast_vs_hand_written' not in only
    assert 'RESULT minifast 1 epochs in' in capsys.readouterr().out
    for bad in (['--variants', 'fast'], ['--runners', 'hand-written', '--variants', 'no-guard']):
        with pytest.raises(SystemExit):
            mod.main(['--tiny', *bad])


def test_crop_flip_is_a_per_sample_shifted_window():
    import torch
    crop_flip = _load('gpu_resnet56').crop_flip
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    torch.manual_seed(0)
    out = crop_flip(x, pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(2):  # every output is some 6x6 window of the padded image, maybe flipped
        ok = any(torch.equal(o, padded[n, :, r:r + 6, c:c + 6]) for r in range(5) for c in range(5)
                 for o in (out[n], out[n].flip(2)))
        assert ok


def test_data_benchmark_smoke_run_leaves_no_cache_behind(tmp_path, monkeypatch, capsys):
    import os
    import tempfile
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
    (tmp_path / 'tmp').mkdir()
    monkeypatch.delenv('MINIFAST_CACHE', raising=False)
    assert _load('data').main(['--n', '64', '--classes', '4', '--bs', '16', '--rounds', '1', '--workers', '0',
                               '--root', str(tmp_path / 'png')]) == 0
    assert 'RESULT cifar_transforms' in capsys.readouterr().out
    assert list((tmp_path / 'tmp').glob('minifast_bench_cache_*')) == []  # the run's decoded-image cache is gone
    assert 'MINIFAST_CACHE' not in os.environ


def test_lr_suggestions_quick_run_caches_fits_and_sweeps(tmp_path, capsys):
    cache = tmp_path / 'c.json'
    mod = _load('lr_suggestions')
    threads = torch.get_num_threads()
    argv = ['--quick', '--datasets', 'digits', '--cache', str(cache), '--threads', str(threads % 2 + 1)]
    out = mod.main(argv)
    assert torch.get_num_threads() == threads  # the suite's bit-identity tests compare at its own thread count
    text = capsys.readouterr().out
    assert 'fastai is not installed' in text or 'fastai is installed' in text
    assert 'RESULT worst-case regret' in text and 'max_lr' in text.split('RESULT')[1]
    rules = out['digits']['rules']
    assert {'max_lr', 'valley', 'steep', 'minimum', 'fastai slide', 'lightning', 'torch-lr-finder'} <= set(rules)
    stored = json.loads(cache.read_text())
    sweeps = [v for k, v in stored.items() if k.startswith('sweep')]
    assert len(sweeps) == 2  # lr_find's own, and one with stop_div=False for the peers' finders
    assert all(len(s['lrs']) == len(s['raw_losses']) > 5 for s in sweeps)
    mod.main(argv)  # again: everything from the cache (its fits are keyed by the thread count too)
    assert '0 fits trained now' in capsys.readouterr().out


def test_peer_rules_follow_their_documented_behaviour():
    import numpy as np
    mod = _load('lr_suggestions')
    lrs = list(np.logspace(-7, 1, 100))
    x = np.log10(lrs)
    losses = list(2.3 - 1.0 / (1 + np.exp(-4 * (x + 3))) + np.where(x > -1, 3 * (x + 1) ** 2, 0))  # steepest at 1e-3
    assert mod.lightning(lrs, losses) == pytest.approx(1e-3, rel=0.2)
    assert mod.torch_lr_finder(lrs, losses) > 1e-3  # its EMA (0.05 on the new loss) trails: later than the slope
    slide = mod.fastai_slide(lrs, losses)
    # the window slides left over the rise and the fall until the gradients at its two ends agree: the fall's foot
    assert 1e-5 < slide < 1e-3


def test_search_benchmark_smoke_runs_both_searches_on_the_same_configs(capsys):
    pytest.importorskip('optuna')
    out = _load('search').main(['--trials', '3', '--epochs', '2', '--n-train', '64', '--n-valid', '32', '--bs', '32',
                                '--rounds', '1'])
    full, pruned = out['no pruner'], out['median pruner']
    assert [r['config'] for r in full['res'].runs] == [r['config'] for r in pruned['res'].runs]  # the same draws
    assert full['epochs'] == 6 and pruned['epochs'] <= 6 and full['res'].n_pruned == 0
    assert 'pruned/unpruned wall time' in capsys.readouterr().out
