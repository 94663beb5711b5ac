"""notebooks/finetuning.ipynb (seeds 000, 002, 003) runs top to bottom in a real Jupyter kernel at its 'tiny' size,
and what it claims to do really happens: the fine-tuned model starts from the body pretrained in its first section,
the head-only phase leaves the body's weights alone, the full phase moves them, and the learning rates per group
follow the slice, the per-block factors, layer decay and per-module settings.

Needs nbformat, nbclient and ipykernel (the `dev` extra); skipped when they are missing.
"""
import matplotlib
matplotlib.use('Agg')

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')
from nbrun import execute  # noqa: E402  (needs the three above)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'notebooks' / 'finetuning.ipynb'
MARK = 'FINETUNING-CHECK '

# Appended after the notebook's last cell: compares the weight snapshots the notebook took and prints, as JSON, what
# the test checks below.
PROBE = r'''
import json
def _kinds(model):
    norm = {f'{mn}.{pn}' for mn, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
            for pn, _ in m.named_parameters(recurse=False)}
    return {n: 'head' if n.startswith('1.') else 'norm' if n in norm else 'body' for n, _ in model.named_parameters()}

def _diff(a, b, kinds):
    out = {k: [0, 0] for k in ('body', 'norm', 'head')}
    for n, kind in kinds.items():
        out[kind][0] += int(not torch.equal(a[n], b[n]))
        out[kind][1] += 1
    return out

_k = _kinds(learn.model)
_loaded = all(torch.equal(w0['0.' + n], pretrained_body[n]) for n in pretrained_body
              if _k.get('0.' + n) == 'body')
print(%r + json.dumps({'head_phase': _diff(w0, w_head, _k), 'full_phase': _diff(w_head, w_full, _k),
                       'runs': runs, 'size': SIZE, 'n_train': len(data.train_ds), 'loaded': _loaded,
                       'task_a': [data_a.c, len(data_a.train_ds)], 'task_b': data.c, 'fresh_same': same,
                       'fresh_files': len(fresh['files']), 'top_losses': [float(v) for v in interp.top_losses(3)[0]],
                       'by_hand': [float(v) for v in F.cross_entropy(torch.log(interp.preds), interp.y_true,
                                                                    reduction='none').sort(descending=True)[0][:3]]}))
''' % MARK


def _code(nb):
    return [c for c in nb.cells if c.cell_type == 'code']


def _plot_cells(nb):
    starts = ('learn.recorder.plot', 'data.show_batch', 'interp.plot_', 'img.show')
    return [c for c in _code(nb) if any(line.startswith(starts) for line in c.source.splitlines())]


def test_finetuning_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = _code(nb)
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    first = code[0].source
    assert 'from minifast import *' in first and 'MINIFAST_NB_SIZE' in first and 'set_seed(0)' in first
    assert nb.metadata.kernelspec.name == 'python3'
    src = '\n'.join(c.source for c in code)
    assert 'pretrained=True' not in src and "weights='" not in src  # nothing is downloaded
    assert 'load_state_dict(pretrained_body)' in src  # ... the pretrained body is made in the notebook instead
    text = '\n'.join(c.source for c in nb.cells if c.cell_type == 'markdown')
    assert all(f'seed {n}' in text for n in ('000', '002', '003'))
    assert len(_plot_cells(nb)) >= 11


def _ratios(values):
    return [b / a for a, b in zip(values, values[1:])]


def test_finetuning_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.delenv('MPLBACKEND', raising=False)  # the kernel picks its own (inline) backend, as in Jupyter
    nb = nbformat.read(NOTEBOOK, as_version=4)
    n_plots = len(_plot_cells(nb))
    text = execute(nb, tmp_path, timeout=180, size='tiny', append=PROBE)
    plots = _plot_cells(nb)
    for c in plots:
        assert sum('image/png' in o.get('data', {}) for o in c.outputs) == 1, f'{c.source}: expected one figure'
    images = sum('image/png' in o.get('data', {}) for c in _code(nb) for o in c.outputs)
    assert images >= n_plots

    (line,) = [ln for ln in text.splitlines() if ln.startswith(MARK)]
    res = json.loads(line[len(MARK):])
    assert res['size'] == 'tiny' and res['n_train'] <= 500
    # section 1 pretrains the body on another task (its own classes and head); section 3 starts from that body
    assert res['task_a'][0] != res['task_b'] and res['task_a'][1] <= 500
    assert res['loaded'], 'the fine-tuned model does not start from the body pretrained in section 1'

    # head only (freeze, train_bn=True): body weights untouched, its BatchNorm layers and the whole head trained
    (body_moved, n_body), (norm_moved, _), (head_moved, n_head) = (res['head_phase'][k] for k in ('body', 'norm',
                                                                                                  'head'))
    assert n_body > 0 and body_moved == 0
    assert norm_moved > 0 and head_moved == n_head
    # full (unfreeze): every body weight moved
    assert res['full_phase']['body'][0] == res['full_phase']['body'][1] == n_body

    runs = {r['name']: r for r in res['runs']}
    assert list(runs) == ['head only', 'full, slice', 'layer3+layer4+head', 'layer decay 0.75, SGDR',
                          'CLR triangular2', 'body lr x0.1, head wd 0', 'plateau: RLROP, early stop']
    for r in runs.values():
        assert math.isfinite(r['valid_loss']) and 0 <= r['accuracy'] <= 1, r['name']

    # section 12: the export, loaded in a fresh process with no training data, predicts the PNGs bit for bit as the
    # live learner does; the interpretation's top losses are the cross-entropy of its predictions
    assert res['fresh_same'] is True and res['fresh_files'] == 12
    assert res['top_losses'] == pytest.approx(res['by_hand'], rel=1e-4, abs=1e-5)

    # slice(lo, hi) over the 3 create_cnn groups: geometric, increasing from body to head, hi/lo = 100
    full = runs['full, slice']
    assert full['peak_lrs'] == sorted(full['peak_lrs']) and len(set(full['peak_lrs'])) == 3
    assert all(r == pytest.approx(10, rel=1e-6) for r in _ratios(full['peak_lrs']))
    lo, hi = full['lr']
    assert full['peak_lrs'][-1] <= hi and full['peak_lrs'][-1] / full['peak_lrs'][0] == pytest.approx(hi / lo)

    # named blocks, freeze_to(-3): stem+layer1 and layer2 train only their BatchNorm, layer3, layer4, head fully
    sel = runs['layer3+layer4+head']
    assert len(sel['params']) == 5
    assert all(0 < t < p for t, p in zip(sel['trainable'][:2], sel['params'][:2]))
    assert sel['trainable'][2:] == sel['params'][2:]
    assert all(r == pytest.approx(10, rel=1e-6) for r in _ratios(sel['peak_lrs']))

    # layer decay 0.75 with SGDR: each block 0.75x the one above, the head at lr; the cosine restarts once
    ld = runs['layer decay 0.75, SGDR']
    assert all(r == pytest.approx(1 / 0.75, rel=1e-6) for r in _ratios(ld['peak_lrs']))
    assert ld['peak_lrs'][-1] == pytest.approx(ld['lr']) and ld['trainable'] == ld['params']
    lrs = ld['lrs']
    assert lrs[0] == pytest.approx(ld['lr']) and ld['epochs'] == 2
    restarts = [i for i in range(1, len(lrs)) if lrs[i] > lrs[i - 1]]
    assert len(restarts) == 1 and lrs[restarts[0]] == pytest.approx(ld['lr'])

    # cyclical lr: within [base_lr, max_lr], going up and down more than once
    clr = runs['CLR triangular2']
    lrs = clr['lrs']
    assert min(lrs) >= clr['base_lr'] * (1 - 1e-9) and max(lrs) <= clr['max_lr'] * (1 + 1e-9)
    ups = sum(b > a for a, b in zip(lrs, lrs[1:]))
    downs = sum(b < a for a, b in zip(lrs, lrs[1:]))
    assert ups >= 1 and downs >= 1

    # per-module settings: body (decay, no-decay) at 0.1x the head's lr; wd 0.05 on body weights only
    pm = runs['body lr x0.1, head wd 0']
    b1, b2, h1, h2 = pm['peak_lrs']
    assert b1 == pytest.approx(0.1 * h1) and b2 == pytest.approx(0.1 * h2) and h1 == pytest.approx(h2)
    assert pm['wd'] == [0.05, 0.0, 0.0, 0.0]

    # plateau: the head's lr is lr_full until the first drop, then 0.2x per drop (never below lr_full / 1000), constant
    # within an epoch; early stopping ends the fit after the epoch it names; the body keeps 0.1x the head's lr
    pl = runs['plateau: RLROP, early stop']
    steps, lrs = pl['steps'], pl['lrs']
    assert len(lrs) == pl['epochs'] * steps and pl['epochs'] <= 4
    assert pl['stopped'] is None or pl['stopped'] == pl['epochs'] - 1
    for e in range(pl['epochs']):
        drops = sum(d < e for d in pl['reductions'])
        want = max(pl['lr'] * 0.2 ** drops, pl['lr'] / 1000)
        assert lrs[e * steps:(e + 1) * steps] == pytest.approx([want] * steps, rel=1e-9), (e, pl['reductions'])
    b1, b2, h1, h2 = pl['peak_lrs']
    assert b1 == pytest.approx(0.1 * h1)

