"""The package's structure, measured from its source with `ast`: the layers import one way, no cycle, few imports
inside functions (each with its reason), no private name crossing a module, a short loop.

`python tests/test_structure.py` prints the figures."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / 'minifast'
MAX_LAZY, MAX_LONG, LONG, MAX_LEARNER = 10, 3, 60, 400


def _modules():
    """{dotted name: (path, ast)} of every module of the package."""
    out = {}
    for f in sorted(PKG.rglob('*.py')):
        parts = f.relative_to(PKG.parent).with_suffix('').parts
        name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
        out[name] = (f, ast.parse(f.read_text(), str(f)))
    return out


MODS = _modules()


def _targets(cur, node):
    """(module, imported name or None) for each minifast module an import statement in module `cur` names."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name.split('.')[0] == 'minifast']
    if node.level:
        base = cur.split('.') if MODS[cur][0].name == '__init__.py' else cur.split('.')[:-1]
        base = base[:len(base) - node.level + 1]
        mod = '.'.join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ''
    if mod.split('.')[0] != 'minifast':
        return []
    return [(f'{mod}.{a.name}' if f'{mod}.{a.name}' in MODS else mod, a.name) for a in node.names]


def _lazy_table(tree):
    """The package's table of lazily imported names ({submodule: (names)}, minifast/__init__.py's `_SUBMODULES`) with
    its line, or ({}, 0) when the module has none."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == '_SUBMODULES'):
            return ast.literal_eval(node.value), node.lineno
    return {}, 0


def _imports():
    """[(module, target module, imported name, line, inside a function, source line and the line above)]; a package's
    lazy table counts as its imports at the top level (what they import is what `from .x import name` would)."""
    rows = []
    for cur, (f, tree) in MODS.items():
        lines = f.read_text().splitlines()
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, name in _targets(cur, node):
                    if target in MODS and target != cur:
                        near = lines[node.lineno - 2:node.lineno]
                        rows.append((cur, target, name, node.lineno, id(node) not in top, near))
        table, line = _lazy_table(tree)
        for sub, names in table.items():
            rows += [(cur, f'{cur}.{sub}', name, line, False, lines[line - 2:line]) for name in names]
    return rows


IMPORTS = _imports()


def _cycles():
    """The strongly connected groups of modules (Tarjan), counting imports inside functions; a package's __init__
    importing its own submodules is left out (that is how a package exposes its names)."""
    edges = {}
    for cur, target, *_ in IMPORTS:
        if not (MODS[cur][0].name == '__init__.py' and target.startswith(cur + '.')):
            edges.setdefault(cur, set()).add(target)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))
    for v in MODS:
        if v not in index:
            visit(v)
    return out


def _long_functions():
    return [(f'{f.relative_to(PKG.parent)}:{n.lineno} {n.name}', n.end_lineno - n.lineno + 1)
            for f, tree in MODS.values() for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > LONG]


def _learner_class_lines():
    tree = MODS['minifast.learner'][1]
    cls = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == 'Learner'][0]
    return cls.end_lineno - cls.lineno + 1


def figures():
    lazy = list({(r[0], r[3]): r for r in IMPORTS if r[4]}.values())  # one row per import statement
    private = [r for r in IMPORTS if r[2] and r[2].startswith('_') and not r[2].startswith('__')]
    return {'cycles': _cycles(), 'lazy': lazy, 'private': private, 'long': _long_functions(),
            'learner': _learner_class_lines()}


def test_no_import_cycle_even_counting_imports_inside_functions():
    assert figures()['cycles'] == []


def test_few_imports_inside_functions_and_each_says_why():
    lazy = figures()['lazy']
    assert len(lazy) <= MAX_LAZY, [f'{m}:{line} {t}' for m, t, _, line, _, _ in lazy]
    unexplained = [f'{m}:{line}' for m, _, _, line, _, near in lazy if not any('#' in s for s in near)]
    assert unexplained == []


def test_no_private_name_imported_across_modules():
    assert [f'{m}:{line} {t}.{n}' for m, t, n, line, _, _ in figures()['private']] == []


def test_few_long_functions_and_a_short_learner():
    f = figures()
    assert len(f['long']) <= MAX_LONG, f['long']
    assert f['learner'] <= MAX_LEARNER


def test_the_layers_import_one_way():
    """core imports nothing from minifast; callbacks never import the learner or the policies."""
    assert [t for m, t, *_ in IMPORTS if m == 'minifast.core'] == []
    up = {'minifast.learner', 'minifast.policies', 'minifast.smith', 'minifast.cli', 'minifast.grid', 'minifast'}
    assert [(m, t) for m, t, *_ in IMPORTS if m.startswith('minifast.callbacks.') and t in up] == []


def test_the_measurement_sees_a_cycle_and_a_private_import(tmp_path):
    """The figures are not vacuous: a module pair importing each other inside functions, and a private name
    imported from another module, are found."""
    global MODS, IMPORTS
    a = ast.parse('def f():\n    from .b import _hidden  # reason\n')
    b = ast.parse('def g():\n    from . import a\n')
    mods = {'minifast': (PKG / '__init__.py', ast.parse('')), 'minifast.a': (tmp_path / 'a.py', a),
            'minifast.b': (tmp_path / 'b.py', b)}
    (tmp_path / 'a.py').write_text('def f():\n    from .b import _hidden  # reason\n')
    (tmp_path / 'b.py').write_text('def g():\n    from . import a\n')
    old = MODS, IMPORTS
    MODS = mods
    try:
        IMPORTS = _imports()
        assert _cycles() == [['minifast.a', 'minifast.b']]
        assert [(m, n) for m, _, n, *_ in IMPORTS if n and n.startswith('_')] == [('minifast.a', '_hidden')]
        assert all(lazy for *_, lazy, _ in IMPORTS)
    finally:
        MODS, IMPORTS = old



def _defined(tree):
    """The names a module binds at its top level (definitions, assignments, imports)."""
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split('.')[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                out |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return out


def test_the_lazy_table_names_modules_that_define_its_names_and_only_public_ones():
    """minifast/__init__.py imports nothing eagerly but names each public name's module: every entry exists, defines
    the name, and the table and __all__ agree (the names that are not minifast's are the fastai v1 conveniences)."""
    table, line = _lazy_table(MODS['minifast'][1])
    assert table and line
    wrong = [f'{sub}.{n}' for sub, names in table.items() for n in names
             if f'minifast.{sub}' not in MODS or n not in _defined(MODS[f'minifast.{sub}'][1])]
    assert wrong == []
    names = [n for ns in table.values() for n in ns]
    assert len(names) == len(set(names)), 'a name listed under two modules'
    init = MODS['minifast'][1]
    all_ = next(ast.literal_eval(n.value) for n in init.body if isinstance(n, ast.Assign)
                and isinstance(n.targets[0], ast.Name) and n.targets[0].id == '__all__')
    assert set(all_) - set(names) == {'np', 'torch', 'nn', 'F', 'plt', 'partial', 'Path'}
    assert set(names) <= set(all_)
    # the package's __init__ imports no minifast module at its top (else `import minifast` pays for torch again)
    eager = [n.lineno for n in ast.walk(init)
             if isinstance(n, (ast.Import, ast.ImportFrom)) and _targets('minifast', n)]
    assert eager == []


def test_the_measurement_reads_the_lazy_table_as_imports(tmp_path):
    """The lazy table's entries are rows of the package's imports: a private name there is caught."""
    global MODS, IMPORTS
    init = "_SUBMODULES = {\n    'a': ('_hidden', 'f'),\n}\n"
    a = 'import minifast\ndef f():\n    pass\n'
    (tmp_path / '__init__.py').write_text(init)
    (tmp_path / 'a.py').write_text(a)
    (tmp_path / 'b.py').write_text('from . import a\n')
    old = MODS, IMPORTS
    MODS = {'minifast': (tmp_path / '__init__.py', ast.parse(init)), 'minifast.a': (tmp_path / 'a.py', ast.parse(a)),
            'minifast.b': (tmp_path / 'b.py', ast.parse('from . import a\n'))}
    try:
        IMPORTS = _imports()
        assert ('minifast', 'minifast.a', '_hidden') in [r[:3] for r in IMPORTS]
        assert [(m, n) for m, _, n, *_ in IMPORTS if n and n.startswith('_')] == [('minifast', '_hidden')]
        assert _cycles() == []  # as with `from .a import f`: a package importing its own submodule is no cycle
    finally:
        MODS, IMPORTS = old


if __name__ == '__main__':
    f = figures()
    print(f"import cycles: {len(f['cycles'])} {f['cycles']}")
    print(f"imports of minifast modules inside functions: {len(f['lazy'])} (at most {MAX_LAZY})")
    for m, t, _, line, _, near in f['lazy']:
        print(f'    {m}:{line} {t}   {near[-1].strip()}')
    print(f"private names imported across modules: {len(f['private'])}")
    for m, t, n, line, _, _ in f['private']:
        print(f'    {m}:{line} {t}.{n}')
    print(f"functions over {LONG} lines: {len(f['long'])} (at most {MAX_LONG})")
    for name, n in f['long']:
        print(f'    {name} {n} lines')
    print(f"Learner class: {f['learner']} lines (at most {MAX_LEARNER})")
