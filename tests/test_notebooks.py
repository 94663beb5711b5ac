"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel (nbclient + ipykernel).

Needs nbformat, nbclient and ipykernel (the `dev` extra); skipped when they are missing.
"""
import matplotlib
matplotlib.use('Agg')

import ast  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

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
    # minifast from this checkout, installed or not; and report which Python the kernel runs
    setup = nbformat.v4.new_code_cell(f'import sys\nsys.path.insert(0, {str(REPO)!r})\nprint(sys.prefix)')
    nb.cells.insert(0, setup)
    (tmp_path / 'quickstart.ipynb').write_text(nbformat.writes(nb))  # a temporary copy; the repo's stays clean
    client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=120,
                                     resources={'metadata': {'path': str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    kernel_prefix = ''.join(o.get('text', '') for o in setup.outputs).strip()
    assert kernel_prefix == sys.prefix, 'the python3 kernel does not run the Python that runs the tests'
    for c in nb.cells:
        if c.cell_type == 'code':
            assert not [o for o in c.outputs if o.output_type == 'error'], c.source

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
