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
