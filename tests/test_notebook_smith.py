"""notebooks/smith_cifar100.ipynb (seed 004's workflow with minifast): stored clean, its full-size code path
binds to the real API, and at MINIFAST_NB_SIZE=tiny it runs top to bottom in a real kernel (nbclient + ipykernel)
with every plot shown and the grids, snapshots and interpolation doing what the text says.

Needs nbformat, nbclient and ipykernel (the `dev` extra); skipped when they are missing.
"""
import matplotlib
matplotlib.use('Agg')

import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')
from nbrun import execute  # noqa: E402  (needs the three above)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'notebooks' / 'smith_cifar100.ipynb'
PLOT = re.compile(r'\.plot\w*\(|plot_interpolation\(|show_batch\(|ShowGraph[^\n]*\n[^\n]*\.fit')
MARK = 'SMITH_RESULTS '

# appended to the notebook when it runs: what the cells produced, as one JSON line
REPORT = r'''
import json
from pathlib import Path
grids = {'lr': lr_grid, 'sc': sc_grid, 'mom': mom_grid, 'wd': wd_grid, 'wd_fine': wd_fine, 'wd_all': wd_all}
one_cycle = [r for r in sc_grid.runs if r['config']['policy'] == 'one_cycle'][0]
default_moms = [r for r in mom_grid.runs if tuple(r['config']['moms']) == (0.95, 0.85)][0]
out = {
    'size': SIZE, 'S': S, 'max_lr': MAX_LR, 'moms': list(MOMS), 'wd': WD,
    'rows': {k: len(g.runs) for k, g in grids.items()},
    'table_lines': {k: len(g.table().splitlines()) for k, g in grids.items()},
    'status': {k: [r['status'] for r in g.runs] for k, g in grids.items()},
    'verdicts': {k: [r['verdict'] for r in g.runs] for k, g in grids.items()},
    'verdict_lines': {k: len(g.verdicts().splitlines()) for k, g in grids.items()},
    'first_loss': {k: [r['steps']['loss'][0] for r in g.runs] for k, g in grids.items()},
    'wd_values': [r['config']['wd'] for r in wd_all.runs],
    'best_wd': best_wd,
    'twin_losses': [one_cycle['steps']['loss'], default_moms['steps']['loss']],
    'snapshots': sorted(snap_learn.snapshots),
    'snapshots_differ': any(not torch.equal(w1[k], w2[k]) for k in w1 if w1[k].is_floating_point()),
    'snapshot_check': [evaluate_weights(snap_learn, w1)['loss'], snap_learn.recorder.val_losses[e1]],
    'alphas': [float(a) for a in interp.alphas],
    'interp': {dl: [float(x) for x in interp.loss(dl)] for dl in interp.dls},
    'wide_dls': interp_wide.dls,
    'barrier': [float(interp.barrier('valid').height), bool(interp.barrier('valid').same_basin)],
    'checkpoints': sorted(p.name for p in Path(CKPT).glob('*.pth')),
    'final_epochs': len(final.recorder.val_losses),
    'final_validate': final.validate(),
}
print('SMITH_RESULTS ' + json.dumps(out))
'''


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def _cell(nb, cell_id):
    (c,) = [c for c in nb.cells if c.get('id') == cell_id]
    return c


def test_smith_notebook_is_saved_clean():
    nb = _read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert 'from minifast import *' in code[0].source
    assert nb.metadata.kernelspec.name == 'python3'
    sizes = _cell(nb, 'sizes').source
    assert "os.environ.get('MINIFAST_NB_SIZE', 'small')" in sizes and 'set_seed(0)' in sizes
    for api in ('lr_find(', 'plot(suggestion=True)', 'fit_one_cycle(', 'plot_lr(show_moms=True)', 'grid_search(',
                'WeightSnapshots(', 'interpolate_losses(', 'plot_interpolation(', '.barrier(', '.summary()',
                'Checkpoint', 'resume=CKPT if resumable(CKPT)', '.verdicts()', '.table()', 'show_batch('):
        assert any(api in c.source for c in code), api


def _exec_cells(nb, ids, ns):
    for i in ids:
        src = '\n'.join(line for line in _cell(nb, i).source.splitlines() if not line.startswith('%'))
        exec(compile(src, f'<cell {i}>', 'exec'), ns)


def test_full_size_code_path(monkeypatch):
    """MINIFAST_NB_SIZE=full: the CIFAR-100 call binds to cifar100's real signature (a small stand-in data set is
    returned, there is no network here) and the model is the seed's ResNet-56 with 100 outputs."""
    import minifast
    monkeypatch.setenv('MINIFAST_NB_SIZE', 'full')
    calls = []

    def fake_cifar100(*args, **kwargs):
        inspect.signature(minifast.cifar100).bind(*args, **kwargs)  # a wrong keyword fails here
        calls.append((args, kwargs))
        return minifast.synthetic_cifar(n_classes=100, n_train=200, n_valid=100, tfms=kwargs.get('tfms'),
                                        bs=kwargs.get('bs', 64), val_bs=kwargs.get('val_bs'))

    monkeypatch.setattr(minifast, 'cifar100', fake_cifar100)
    nb = _read()
    ns = {}
    _exec_cells(nb, ['imports', 'sizes', 'data', 'model'], ns)
    ((args, kwargs),) = calls
    assert args == ('data',) and kwargs['download'] is True and kwargs['bs'] == 256
    assert ns['S']['depth'] == 56 and ns['data'].c == 100
    assert sum(p.numel() for p in ns['learn'].model.parameters()) == 885_044


def test_smith_notebook_runs_tiny(tmp_path, monkeypatch):
    monkeypatch.delenv('MPLBACKEND', raising=False)  # the kernel picks its own (inline) backend, as in Jupyter
    monkeypatch.setenv('MINIFAST_NB_SIZE', 'tiny')
    # one intra-op thread: on a busy 2-core machine torch's spinning threads make the run several times slower
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    nb = _read()
    text = execute(nb, tmp_path, timeout=300, size='tiny', append=REPORT)
    for c in nb.cells:
        if c.cell_type == 'code':
            if PLOT.search(c.source) and c is not nb.cells[-1]:
                n = sum('image/png' in o.get('data', {}) for o in c.outputs)
                assert n >= 1, f'no figure shown by cell {c.get("id")}'
                if '\n' not in c.source.strip():  # a one-line plot call: shown exactly once
                    assert n == 1, f'cell {c.get("id")} shows {n} figures'
    assert (tmp_path / 'checkpoints_tiny').is_dir()  # written in the working folder, not in the repository

    (line,) = [ln for ln in text.splitlines() if ln.startswith(MARK)]
    r = json.loads(line[len(MARK):])
    assert r['size'] == 'tiny'

    # the grids: one row per configuration, a header line in each table, one verdict line per run
    expect = {'lr': 2, 'sc': 2, 'mom': 2, 'wd': 4, 'wd_fine': 2, 'wd_all': 6}
    assert r['rows'] == expect
    assert r['table_lines'] == {k: n + 1 for k, n in expect.items()}
    assert r['verdict_lines'] == expect
    assert r['status']['sc'] == r['status']['mom'] == ['done', 'done']
    ok = {'underfitting', 'overfitting', 'flat', 'too short'}
    assert all(v in ok for vs in r['verdicts'].values() for v in vs)
    assert all(v != 'too short' for v in r['verdicts']['wd'])  # two epochs per run: a real diagnosis
    assert r['wd_values'][:4] == [1e-3, 1e-4, 1e-5, 0]
    lo, hi = sorted(r['wd_values'][4:])
    if r['best_wd'] > 0:  # the half-decade neighbours of the best value, to one significant figure
        half = [math.log10(hi / r['best_wd']), math.log10(r['best_wd'] / lo)]  # 3e-4 / 1e-4, 1e-3 / 3e-4
        assert all(abs(h - 0.5) < 0.06 for h in half), half
    else:
        assert 0 < lo < hi < 1e-5
    assert r['wd'] in r['wd_values'] and r['max_lr'] in (1e-2, 1e-1)

    # every run of every grid starts from the same weights on the same first batch: identical first losses
    firsts = [x for vs in r['first_loss'].values() for x in vs]
    assert len(set(firsts)) == 1 and math.isfinite(firsts[0])
    # two runs with the same effective configuration (1cycle at MAX_LR, moms 0.95-0.85) in different grids
    a, b = r['twin_losses']
    assert a == b and len(a) > 1

    # snapshots and the interpolation between them
    assert r['snapshots'] == r['S']['save'] and r['snapshots_differ']
    assert math.isclose(*r['snapshot_check'], rel_tol=1e-5)
    assert 0.0 in r['alphas'] and 1.0 in r['alphas'] and len(r['alphas']) == r['S']['alphas'] + 2
    assert set(r['interp']) == {'valid', 'train'}
    assert all(math.isfinite(x) for vs in r['interp'].values() for x in vs)
    assert set(r['wide_dls']) == {'valid', 'train'}
    assert math.isfinite(r['barrier'][0])

    # the final run checkpointed, and finished
    assert r['checkpoints'] and r['final_epochs'] == r['S']['final']
    loss, acc, top5 = r['final_validate']
    assert math.isfinite(loss) and 0 <= acc <= top5 <= 1
