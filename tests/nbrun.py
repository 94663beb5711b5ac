"""Running a notebook of notebooks/ in a real Jupyter kernel for the notebook tests (nbclient + ipykernel).

Not collected by pytest (no test_ prefix); the tests import it after their `pytest.importorskip` of nbformat,
nbclient and ipykernel.
"""
import sys
from pathlib import Path

import nbclient
import nbformat

REPO = Path(__file__).resolve().parents[1]


def execute(nb, folder, timeout, size=None, append=None):
    """Run `nb` top to bottom in a python3 kernel working in `folder`. A first cell puts this checkout on sys.path
    (and sets MINIFAST_NB_SIZE to `size`); `append` (source code) becomes the last cell. Raises CellExecutionError on
    the first failing cell; checks that the kernel runs the tests' Python and that no cell shows an error. Returns
    the text the appended cell printed ('' without one)."""
    size_env = '' if size is None else f"import os\nos.environ['MINIFAST_NB_SIZE'] = {size!r}\n"
    setup = nbformat.v4.new_code_cell(f'{size_env}import sys\nsys.path.insert(0, {str(REPO)!r})\nprint(sys.prefix)')
    nb.cells.insert(0, setup)
    last = None if append is None else nbformat.v4.new_code_cell(append)
    if last is not None:
        nb.cells.append(last)
    nbclient.NotebookClient(nb, kernel_name='python3', timeout=timeout,
                            resources={'metadata': {'path': str(folder)}}).execute()
    kernel_prefix = ''.join(o.get('text', '') for o in setup.outputs).strip()
    assert kernel_prefix == sys.prefix, 'the python3 kernel does not run the Python that runs the tests'
    for c in nb.cells:
        if c.cell_type == 'code':
            assert not [o for o in c.outputs if o.output_type == 'error'], c.source
    return '' if last is None else ''.join(o.get('text', '') for o in last.outputs if o.output_type == 'stream')
