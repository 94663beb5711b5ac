"""The `minifast` command runs the main job end to end."""
from minifast.cli import main


def test_demo_runs_and_writes_its_outputs(tmp_path, capsys):
    assert main(['demo', '--epochs', '1', '--n-train', '320', '--out', str(tmp_path), '--quiet']) == 0
    out = capsys.readouterr().out
    assert 'built-in 32x32 shapes set (320 training images' in out and 'valid loss' in out
    for name in ('batch.png', 'losses.png', 'lr.png', 'metrics.png', 'models/demo.pth'):
        assert (tmp_path / name).stat().st_size > 0, name


def test_demo_rejects_values_that_train_nothing(tmp_path):
    import pytest
    with pytest.raises(SystemExit, match='demo: --epochs 0: it must be at least 1'):
        main(['demo', '--epochs', '0', '--n-train', '64', '--out', str(tmp_path), '--quiet'])
    assert not (tmp_path / 'models').exists()


# ---- the command starts fast: nothing imports torch before the arguments are parsed ------------------------------
def _env():
    import os
    from pathlib import Path
    import minifast
    root = str(Path(minifast.__file__).parents[1])
    return {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')]))}


def test_import_and_help_do_not_import_torch():
    """`minifast --help` took 3.5-7 s: minifast/__init__.py imported torch and matplotlib before argparse ran."""
    import subprocess
    import sys
    code = ('import sys\n'
            'import minifast\n'
            'heavy = lambda: sorted({m.split(".")[0] for m in sys.modules} & {"torch", "matplotlib", "numpy"})\n'
            'assert heavy() == [], ("import minifast", heavy())\n'
            'from minifast.cli import main\n'
            'for argv in (["--help"], ["smith", "--help"], ["demo", "--help"], ["smith", "--bogus"]):\n'
            '    try:\n'
            '        main(argv)\n'
            '    except SystemExit:\n'
            '        pass\n'
            '    assert heavy() == [], (argv, heavy())\n'
            'print("ok")\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), proc.stderr


def test_every_public_name_resolves_and_dir_lists_it():
    import minifast
    ns = {}
    exec('from minifast import *', ns)
    assert [n for n in minifast.__all__ if n not in ns] == []
    assert set(minifast.__all__) <= set(dir(minifast))
    assert {'grid', 'smith', 'cli', 'learner'} <= set(dir(minifast))  # submodules too
    assert minifast.grid.grid_search is minifast.grid_search  # a submodule by attribute, as before
    assert minifast.F is __import__('torch').nn.functional and minifast.Learner.__name__ == 'Learner'
    import pytest
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        minifast.no_such_name


# ---- demo: titled plots, top-k only with more than k classes, one-line data errors, Ctrl-C ------------------------
def test_demo_titles_every_plot(tmp_path, monkeypatch):
    import minifast.demo
    titles = {}

    def spy(fig, file, title):
        titles[file.name] = title
        return save(fig, file, title)
    save = minifast.demo.save_plot
    monkeypatch.setattr(minifast.demo, 'save_plot', spy)
    assert main(['demo', '--epochs', '1', '--n-train', '64', '--out', str(tmp_path), '--quiet']) == 0
    assert sorted(titles) == ['batch.png', 'losses.png', 'lr.png', 'metrics.png'] and all(titles.values())
    for name in titles:
        assert (tmp_path / name).stat().st_size > 0


def test_save_plot_titles_one_axes_or_the_figure(tmp_path):
    import matplotlib.pyplot as plt
    from minifast.smith import save_plot
    fig, ax = plt.subplots()
    save_plot(fig, tmp_path / 'one.png', 'one axes')
    assert ax.get_title() == 'one axes'
    fig, axs = plt.subplots(1, 2)
    save_plot(fig, tmp_path / 'two.png', 'two axes')
    assert fig.get_suptitle() == 'two axes' and [a.get_title() for a in axs] == ['', '']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['one.png', 'two.png']  # no temporary file left


def test_top_k_accuracy_only_with_more_classes_than_k():
    from minifast import accuracy, top_k_accuracy
    from minifast.smith import metrics_for
    assert metrics_for(10) == [accuracy, top_k_accuracy]
    assert metrics_for(6) == [accuracy, top_k_accuracy]
    assert metrics_for(5) == [accuracy] and metrics_for(2) == [accuracy]  # top-5 of 5 classes is always 1.0


def test_demo_missing_cifar_is_one_line_with_a_fix_the_command_has(tmp_path):
    import pytest
    with pytest.raises(SystemExit) as e:
        main(['demo', '--data', str(tmp_path), '--out', str(tmp_path / 'out'), '--quiet'])
    msg = str(e.value.code)
    assert msg.startswith(f'demo: --data {tmp_path}: ') and '\n' not in msg
    assert 'cifar-10-batches-py lacks data_batch_1' in msg and 'demo does not download' in msg
    assert 'download=True' not in msg and 'load_cifar' not in msg
    with pytest.raises(FileNotFoundError):  # --debug: the library's error itself, with its traceback
        main(['demo', '--data', str(tmp_path), '--out', str(tmp_path / 'out'), '--quiet', '--debug'])


def test_ctrl_c_in_demo_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    import pytest
    from minifast import Learner

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(Learner, 'fit', interrupted)
    argv = ['demo', '--epochs', '1', '--n-train', '64', '--out', str(tmp_path), '--quiet']
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines() == ['demo: interrupted; nothing was saved (the demo saves '
                                                            'its plots and weights at the end)']
    with pytest.raises(KeyboardInterrupt):
        main([*argv, '--debug'])


def test_demo_fewer_training_images_than_a_batch_is_one_line(tmp_path):
    import pytest
    with pytest.raises(SystemExit) as e:
        main(['demo', '--n-train', '10', '--out', str(tmp_path), '--quiet'])
    assert str(e.value.code) == ('demo: the built-in 32x32 shapes set (10 training images, 10 classes): 10 training '
                                 'images, fewer than one batch (--bs 64); lower --bs or raise --n-train')


# ---- minifast search: the command line (issue 20) ---------------------------------------------------------------
def test_search_help_lists_its_flags_and_neither_help_nor_the_modules_import_the_engines():
    """`minifast search --help` answers before torch is imported; importing the search command's modules imports
    none of the optional engines (they are imported when a search or tracker runs)."""
    import subprocess
    import sys
    code = ('import sys\n'
            'from minifast.cli import main\n'
            'try:\n'
            '    main(["search", "--help"])\n'
            'except SystemExit:\n'
            '    pass\n'
            'assert "torch" not in sys.modules\n'
            'import minifast.searchjob, minifast.smith\n'
            'print("engines", [m for m in ("optuna", "mlflow", "tensorboard", "wandb") if m in sys.modules])\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    for flag in ('--space', '--trials', '--sampler', '--pruner', '--storage', '--workers', '--folds', '--tracker',
                 '--study', '--monitor'):
        assert flag in proc.stdout, flag
    assert proc.stdout.strip().splitlines()[-1] == 'engines []'


def test_search_and_smith_refuse_too_few_workers_trials_or_folds(tmp_path):
    import pytest
    for argv, words in ((['search', '--workers', '0'], '--workers 0: it must be at least 1'),
                        (['search', '--trials', '0'], '--trials 0: it must be at least 1'),
                        (['search', '--folds', '1'], '--folds 1: it must be at least 2'),
                        (['smith', '--workers', '0'], '--workers 0: it must be at least 1')):
        with pytest.raises(SystemExit, match=words):
            main([*argv, '--quick', '--quiet', '--out', str(tmp_path / 'run')])
        assert not (tmp_path / 'run' / 'runs.jsonl').exists()


def test_ctrl_c_in_search_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    import pytest
    from minifast import searchjob

    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(searchjob, '_run', interrupted)
    argv = ['search', '--quick', '--quiet', '--out', str(tmp_path)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ['search: interrupted; run the same command again to go on (finished trials are '
                                        'kept in the storage; with an in-memory study, without --storage or '
                                        '--workers, they are lost)']
    with pytest.raises(KeyboardInterrupt):
        main([*argv, '--debug'])
