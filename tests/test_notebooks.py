"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel (nbclient + ipykernel).

Needs nbformat, nbclient and ipykernel (the `dev` extra); skipped when they are missing.
"""
import matplotlib
matplotlib.use('Agg')

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')
from nbrun import execute  # noqa: E402  (needs the three above)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / 'notebooks' / 'quickstart.ipynb'


def _cell(nb, text):
    (c,) = [c for c in nb.cells if c.cell_type == 'code' and text in c.source]
    return c


def _count(outputs, mime):
    return sum(mime in o.get('data', {}) for o in outputs)


def test_quickstart_is_saved_without_outputs():
    nb = nbformat.read(QUICKSTART, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert 'from minifast import *' in code[0].source
    assert nb.metadata.kernelspec.name == 'python3'


def test_quickstart_executes(tmp_path, monkeypatch):
    monkeypatch.delenv('MPLBACKEND', raising=False)  # the kernel picks its own (inline) backend, as in Jupyter
    nb = nbformat.read(QUICKSTART, as_version=4)
    (tmp_path / 'quickstart.ipynb').write_text(nbformat.writes(nb))  # a temporary copy; the repo's stays clean
    execute(nb, tmp_path, timeout=120)  # minifast from this checkout, in the tests' Python

    fit = _cell(nb, 'learn.fit(')
    html = [o['data']['text/html'] for o in fit.outputs if 'text/html' in o.get('data', {})]
    table = [h for h in html if 'train_loss' in h]
    assert table, 'no epoch table in the fit cell'
    assert all(name in table[-1] for name in ('valid_loss', 'accuracy', 'top_k_accuracy'))
    assert all(f'<td>{e}</td>' in table[-1] for e in range(3))
    assert _count(fit.outputs, 'image/png') == 1  # ShowGraph's live graph

    for text in ('plot_losses()', 'plot_lr(show_moms=True)'):
        c = _cell(nb, text)
        assert _count(c.outputs, 'image/png') == 1, f'{text}: the figure should be displayed exactly once'

    val = _cell(nb, 'learn.validate()')
    (res,) = [o for o in val.outputs if o.output_type == 'execute_result']
    values = ast.literal_eval(res['data']['text/plain'])
    assert isinstance(values, list) and len(values) == 3 and all(isinstance(v, float) for v in values)
    loss, acc, top5 = values
    assert 0 < loss < 2.3 and 0.3 < acc <= top5 <= 1  # it learned something in 3 epochs (10 classes)


INTERRUPTS = [
    f'import sys\nsys.path.insert(0, {str(REPO)!r})\n'
    'import os, signal, torch\nfrom minifast import *\nfrom conftest_nb import *',
    # Ctrl-C arrives as SIGINT in the kernel, mid-batch (between backward and step)
    'class CtrlC(Callback):\n'
    '    def after_backward(self, learn):\n'
    '        if learn.train_iter == 5:\n'
    '            os.kill(os.getpid(), signal.SIGINT)\n'
    'learn.fit_one_cycle(3, 1e-2, callbacks=[CtrlC(), Checkpoint(every=2)])',
    'assert learn.interrupted and learn.train_iter == 6 and len(learn.recorder.raw_losses) == 6\n'
    'assert learn.progress.pbar is None and learn.progress.mbar is None and learn.callbacks == []\n'
    'print("after interrupt", learn.train_iter)',
    'learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=2)], resume="checkpoints")\n'
    'assert not learn.interrupted and learn.train_iter == 18',
    # an interrupted lr_find leaves the learner as it was
    'w = {k: v.clone() for k, v in learn.model.state_dict().items()}\n'
    'class CtrlC2(Callback):\n'
    '    def after_step(self, learn):\n'
    '        if learn.train_iter == 3:\n'
    '            os.kill(os.getpid(), signal.SIGINT)\n'
    'orig = learn.fit\n'
    'learn.fit = lambda *a, callbacks=None, **k: orig(*a, callbacks=[*callbacks, CtrlC2()], **k)\n'
    'learn.lr_find(num_it=10)',
    'del learn.fit\n'
    'assert learn.interrupted and all(torch.equal(v, learn.model.state_dict()[k]) for k, v in w.items())\n'
    'learn.fit(1, 1e-3)\nprint("kernel alive")',
]
HELPER = '''
import torch
from torch import nn
from minifast import DataBunch, Learner
g = torch.Generator().manual_seed(0)
x = torch.randn(120, 8, generator=g)
y = x[:, :3].argmax(1)
data = DataBunch.from_tensors(x[:96], y[:96], x[96:], y[96:], bs=16)
torch.manual_seed(0)
learn = Learner(data, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)))
'''


def test_ctrl_c_in_a_notebook_kernel(tmp_path, monkeypatch):
    """A real kernel: SIGINT during fit and lr_find raises KeyboardInterrupt in that cell only; the learner is
    consistent, resumes from the boundary checkpoint, and the kernel goes on."""
    monkeypatch.delenv('MPLBACKEND', raising=False)
    (tmp_path / 'conftest_nb.py').write_text(HELPER)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in INTERRUPTS]
    for i in (1, 4):
        nb.cells[i].metadata['tags'] = ['raises-exception']
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=120,
                                     resources={'metadata': {'path': str(tmp_path)}})
    client.execute()
    errors = [[o for o in c.outputs if o.output_type == 'error'] for c in nb.cells]
    assert [e[0].ename if e else None for e in errors] == [None, 'KeyboardInterrupt', None, None,
                                                           'KeyboardInterrupt', None]
    text = ''.join(o.get('text', '') for c in nb.cells for o in c.outputs)
    assert 'after interrupt 6' in text and 'kernel alive' in text
