"""Trackers (TensorBoardLogger, MLflowLogger, WandbLogger): what they write, read back with each library's own reader,
equals the Recorder's history."""
import matplotlib
matplotlib.use('Agg')

import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from minifast import Callback, CallbackException, DataBunch, Learner, LRFinder, accuracy  # noqa: E402
from minifast.callbacks.trackers import (MLflowLogger, TensorBoardLogger, Tracker, WandbLogger,  # noqa: E402
                                         fit_params, param_value)
from minifast.grid import run_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close('all')


def make_learner(path, **kwargs):
    torch.manual_seed(0)
    x, y = torch.randn(128, 8), torch.randint(0, 3, (128,))
    xv, yv = torch.randn(40, 8), torch.randint(0, 3, (40,))
    data = DataBunch.from_tensors(x, y, xv, yv, bs=32)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return Learner(data, model, metrics=[accuracy], path=path, silent=True, device='cpu',
                   layer_groups=[model[0], model[2]], **kwargs)


def fit(learn, tracker, epochs=2):
    learn.fit_one_cycle(epochs, slice(1e-3, 1e-2), callbacks=[tracker])
    return learn.recorder


def expected_steps(r, start=0):
    """{name: [(step, value)]} of the per-step series a tracker writes for Recorder `r`."""
    out = {}
    for i, lrs in enumerate(r.group_lrs):
        for g, v in enumerate(lrs):
            out.setdefault(f'lr/group{g}', []).append((start + i, v))
        for g, v in enumerate(r.group_moms[i]):
            out.setdefault(f'mom/group{g}', []).append((start + i, v))
        out.setdefault('loss/raw', []).append((start + i, r.raw_losses[i]))
        out.setdefault('loss/smooth', []).append((start + i, r.losses[i]))
    return out


def expected_epochs(r, start=0):
    out = {'train_loss': [(start + e, v) for e, v in enumerate(r.train_losses)],
           'valid_loss': [(start + e, v) for e, v in enumerate(r.val_losses)]}
    for i, name in enumerate(r.metrics_names):
        out[name] = [(start + e, m[i]) for e, m in enumerate(r.metrics)]
    return out


class Boom(Callback):
    """Raises `error` at the second batch of epoch 1."""
    def __init__(self, error):
        self.error = error

    def after_batch(self, learn):
        if learn.epoch == 1 and learn.iter == 1 and learn.training:
            raise self.error


# ---- no library at import, a clear error without one -------------------------------------------------------------
def test_import_minifast_imports_no_tracking_library():
    code = ('import sys, minifast, minifast.callbacks.trackers\n'
            "print([m for m in ('optuna', 'mlflow', 'tensorboard', 'wandb', 'torch.utils.tensorboard') "
            'if m in sys.modules])')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]'


@pytest.mark.parametrize('make,module', [(lambda p: TensorBoardLogger(p / 'tb'), 'torch.utils.tensorboard'),
                                         (lambda p: MLflowLogger(tracking_uri=f'sqlite:///{p}/m.db'), 'mlflow'),
                                         (lambda p: WandbLogger(dir=p), 'wandb')])
def test_a_missing_library_names_the_extra(tmp_path, monkeypatch, make, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when it is not installed
    tr = make(tmp_path)
    with pytest.raises(ImportError, match=r'pip install minifast\[track\]'):
        tr.log_params({'a': 1})


def test_param_values_and_fit_params(tmp_path):
    assert param_value((0.95, 0.85)) == '(0.95, 0.85)'
    assert param_value(slice(1e-3, 1e-2)) == 'slice(0.001, 0.01)'
    assert param_value(float('nan')) == 'nan' and param_value(None) == 'None'
    assert param_value(torch.tensor(2.5)) == 2.5 and param_value(True) is True
    learn = make_learner(tmp_path)
    assert not any(hasattr(Tracker, h) for h in ('after_step', 'after_batch', 'before_batch'))  # no per-step hook
    learn.fit(1, 1e-3)
    p = fit_params(learn)
    assert p['epochs'] == 1 and p['lr'] == 1e-3 and p['opt_func'].startswith('AdamW(') and p['n_groups'] == 2
    assert p['bs'] == 32 and p['true_wd'] is True and p['wd'] == learn.wd


# ---- TensorBoard ------------------------------------------------------------------------------------------------
def tb_reader(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={'scalars': 0, 'images': 0, 'tensors': 0})
    acc.Reload()
    return acc


def tb_series(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def assert_series(got, want, rel):
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=rel)


def test_tensorboard_scalars_hparams_and_figures_equal_the_recorder(tmp_path):
    learn = make_learner(tmp_path)
    tb = TensorBoardLogger(tmp_path / 'tb', params={'note': 'first'})
    r = fit(learn, tb)
    acc = tb_reader(tmp_path / 'tb')
    want = {**expected_steps(r), **expected_epochs(r)}
    assert len(want['lr/group0']) == 8 and want['lr/group0'][0][1] < want['lr/group1'][0][1]
    for tag, series in want.items():
        assert_series(tb_series(acc, tag), series, rel=1e-6)  # TensorBoard keeps float32
    assert tb_series(acc, 'final/accuracy') == [(1, pytest.approx(r.metrics[-1][0], rel=1e-6))]
    from tensorboard.plugins.hparams import plugin_data_pb2
    content = acc.PluginTagToContent('hparams')
    exp = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/experiment']).experiment
    assert {m.name.tag for m in exp.metric_infos} == {'final/train_loss', 'final/valid_loss', 'final/accuracy'}
    start = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/session_start_info']).session_start_info
    assert start.hparams['epochs'].number_value == 2 and start.hparams['note'].string_value == 'first'
    assert start.hparams['opt_func'].string_value.startswith('AdamW(')
    assert set(acc.Tags()['images']) == {'losses', 'lr_mom'}
    assert plt.get_fignums() == []  # the figures were closed


def test_tensorboard_second_fit_continues_and_child_is_a_subfolder(tmp_path):
    learn = make_learner(tmp_path)
    tb = TensorBoardLogger(tmp_path / 'tb')
    r1 = expected_steps(fit(learn, tb))['loss/raw']
    r2 = expected_steps(fit(learn, tb, epochs=1), start=8)['loss/raw']
    assert_series(tb_series(tb_reader(tmp_path / 'tb'), 'loss/raw'), r1 + r2, rel=1e-6)
    with tb.child('wd=0.1') as c:
        fit(make_learner(tmp_path), c)
    assert tb_series(tb_reader(tmp_path / 'tb' / 'wd=0.1'), 'train_loss')[-1][0] == 1


def test_an_lr_range_test_logs_its_curve(tmp_path):
    learn = make_learner(tmp_path)
    tb = TensorBoardLogger(tmp_path / 'tb')
    learn.fit(3, 1e-5, callbacks=[LRFinder(1e-5, 1., num_it=10, stop_div=False), tb])
    assert set(tb_reader(tmp_path / 'tb').Tags()['images']) == {'lr_find'}


def test_other_ranks_write_nothing(tmp_path):
    learn = make_learner(tmp_path)
    learn.is_main = False
    tb = TensorBoardLogger(tmp_path / 'tb')
    fit(learn, tb)
    tb.log_metrics({'x': 1.})
    assert not (tmp_path / 'tb').exists()


# ---- MLflow -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def mlflow_db(tmp_path_factory):
    """One SQLite store for the module, its tables made here (MLflow's migrations take seconds per new store)."""
    from mlflow import MlflowClient
    db = tmp_path_factory.mktemp('mlflow') / 'mlflow.db'
    MlflowClient(tracking_uri=f'sqlite:///{db}').search_experiments()  # (its experiment 0 only names ./mlruns)
    return db


@pytest.fixture
def mlflow_uri(mlflow_db):
    return f'sqlite:///{mlflow_db}'


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_mlflow_metrics_params_and_artifacts_equal_the_recorder(tmp_path, mlflow_uri):
    learn = make_learner(tmp_path)
    ml = MLflowLogger('equal', tracking_uri=mlflow_uri, artifact_location=tmp_path / 'art', run_name='one',
                      params={'data': 'random'})
    r = fit(learn, ml)
    first = expected_steps(r)['loss/raw']
    c = ml.client
    run = c.get_run(ml.run_id)
    assert run.info.status == 'FINISHED' and run.info.run_name == 'one'
    for key, series in {**expected_steps(r), **expected_epochs(r)}.items():
        assert history(c, ml.run_id, key) == series, key  # float64 in the store: the very values
    p = run.data.params
    assert p['epochs'] == '2' and p['opt_func'].startswith('AdamW(') and p['data'] == 'random' and p['n_groups'] == '2'
    assert float(p['lr/group1']) == learn.fit_args['lr'][1] and float(p['wd']) == learn.fit_args['wd']
    assert {a.path for a in c.list_artifacts(ml.run_id)} == {'losses.png', 'lr_mom.png'}
    report = tmp_path / 'report.md'
    report.write_text('# report\n')
    ml.log_artifact(report)
    ml.close()
    assert 'report.md' in {a.path for a in c.list_artifacts(ml.run_id)}
    assert c.get_run(ml.run_id).info.status == 'FINISHED'
    with pytest.raises(FileNotFoundError, match='nothere.md'):
        ml.log_artifact(tmp_path / 'nothere.md')
    # a second fit appends to the same run: steps continue, a changed parameter is kept as fit1/...
    r2 = fit(learn, ml, epochs=1)
    assert history(c, ml.run_id, 'loss/raw') == first + expected_steps(r2, 8)['loss/raw']  # (r2 is r: reset)
    assert history(c, ml.run_id, 'accuracy')[-1] == (2, r2.metrics[-1][0])
    run = c.get_run(ml.run_id)
    assert run.data.params['epochs'] == '2' and run.data.params['fit1/epochs'] == '1'
    assert run.info.status == 'FINISHED'


@pytest.mark.parametrize('error,status', [(ValueError('boom'), 'FAILED'), (KeyboardInterrupt(), 'KILLED')])
def test_mlflow_run_ends_failed_or_killed_with_the_fit(tmp_path, mlflow_uri, error, status):
    learn = make_learner(tmp_path)
    ml = MLflowLogger('fails', tracking_uri=mlflow_uri, artifact_location=tmp_path / 'art')
    with pytest.raises(CallbackException if isinstance(error, Exception) else KeyboardInterrupt):
        learn.fit_one_cycle(2, 1e-2, callbacks=[ml, Boom(error)])
    c = ml.client
    assert c.get_run(ml.run_id).info.status == status
    # the epoch cut short is there too: 4 steps of epoch 0 and the 2 of epoch 1 (written at after_fit)
    assert history(c, ml.run_id, 'loss/raw') == expected_steps(learn.recorder)['loss/raw']
    assert len(history(c, ml.run_id, 'loss/raw')) == 6 and len(history(c, ml.run_id, 'train_loss')) == 1


def test_mlflow_children_and_replayed_records_nest_under_the_parent(tmp_path, mlflow_uri):
    parent = MLflowLogger('grid', tracking_uri=mlflow_uri, artifact_location=tmp_path / 'art', run_name='grid')
    with parent.child('wd=0.1', params={'wd': 0.1}) as ch:
        learn = make_learner(tmp_path, wd=0.1)
        fit(learn, ch)
    rec = run_record(learn, {'wd': 0.1}, 0, 'done', 1.)
    parent.log_record(rec, name='reused wd=0.1')
    parent.close()
    c = parent.client
    kids = c.search_runs([c.get_experiment_by_name('grid').experiment_id],
                         filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert sorted(k.info.run_name for k in kids) == ['reused wd=0.1', 'wd=0.1']
    assert {k.info.status for k in kids} == {'FINISHED'} and c.get_run(parent.run_id).info.status == 'FINISHED'
    live, = [k for k in kids if k.info.run_name == 'wd=0.1']
    replay, = [k for k in kids if k.info.run_name == 'reused wd=0.1']
    for key in ('train_loss', 'valid_loss', 'accuracy'):
        assert history(c, replay.info.run_id, key) == history(c, live.info.run_id, key)
    assert_series(history(c, replay.info.run_id, 'loss/smooth'), history(c, live.info.run_id, 'loss/smooth'),
                  rel=1e-12)
    assert [v for _, v in history(c, replay.info.run_id, 'lr')] == learn.recorder.lrs
    assert replay.data.params['wd'] == '0.1' and replay.data.params['status'] == 'done'


def test_mlflow_default_store_is_sqlite_in_the_working_folder(tmp_path, monkeypatch, mlflow_db):
    monkeypatch.chdir(tmp_path)
    shutil.copy(mlflow_db, tmp_path / 'mlflow.db')  # tables made: MLflow's migrations would take seconds
    ml = MLflowLogger()
    ml.log_metrics({'x': 1.5}, step=3)
    ml.log_figure(plt.figure(), 'empty')
    ml.close()
    assert list((tmp_path / 'mlruns').rglob('empty.png'))  # the artifacts beside the store
    assert ml.tracking_uri == f'sqlite:///{tmp_path / "mlflow.db"}' and (tmp_path / 'mlflow.db').is_file()
    assert history(ml.client, ml.run_id, 'x') == [(3, 1.5)]
    import mlflow
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set
    assert not is_tracking_uri_set() and mlflow.active_run() is None  # no global state set


# ---- W&B (offline) ----------------------------------------------------------------------------------------------
def wandb_records(path):
    """The records of an offline W&B run file (`run-<id>.wandb`): W&B's header, then LevelDB-log records (32 KiB
    blocks, each record a 7-byte header: crc, length, type) holding protobuf `Record`s. wandb 0.31 has no Python
    reader of its own (the Go core writes and syncs these files)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    assert data[:4] == b':W&B'
    pos, buf, out = 7, b'', []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _, n, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        if pos + 7 + n > len(data):  # a record still being written
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            out.append(pb.Record.FromString(buf))
            buf = b''
    return out


def test_wandb_offline_history_config_and_summary_equal_the_recorder(tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    monkeypatch.delenv('WANDB_API_KEY', raising=False)
    learn = make_learner(tmp_path)
    wb = WandbLogger(dir=tmp_path, params={'data': 'random'}, name='one')
    r = fit(learn, wb)
    files = glob.glob(str(tmp_path / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    assert len(files) == 1
    recs = wandb_records(files[0])
    for _ in range(100):  # W&B's service process writes the file after run.finish() returns: wait for the exit record
        if any(x.WhichOneof('record_type') == 'exit' for x in recs):
            break
        time.sleep(0.1)
        recs = wandb_records(files[0])
    rows = [{i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in x.history.item}
            for x in recs if x.WhichOneof('record_type') == 'history']
    got = {}
    for row in rows:
        for k, v in row.items():
            if k not in ('step', 'epoch') and not k.startswith('_') and isinstance(v, float):
                got.setdefault(k, []).append((row['step'] if 'step' in row else row['epoch'], v))
    for key, series in {**expected_steps(r), **expected_epochs(r)}.items():
        assert got.get(key) == series, key
    assert {k.split('/')[0] for row in rows for k in row if k.endswith('_type')} == {'losses', 'lr_mom'}
    config = {i.key: json.loads(i.value_json) for x in recs if x.WhichOneof('record_type') == 'config'
              for i in x.config.update}
    assert config['epochs'] == 2 and config['data'] == 'random' and config['opt_func'].startswith('AdamW(')
    summary = {i.key or '/'.join(i.nested_key): json.loads(i.value_json) for x in recs
               if x.WhichOneof('record_type') == 'summary' for i in x.summary.update}
    assert summary['final/accuracy'] == r.metrics[-1][0]
    run, = [x.run for x in recs if x.WhichOneof('record_type') == 'run']
    assert run.display_name == 'one' and run.run_group == 'one'
    assert [x.exit.exit_code for x in recs if x.WhichOneof('record_type') == 'exit'] == [0]
    assert os.environ.get('WANDB_MODE') == 'offline'


def test_a_fit_resumed_into_the_same_run_keeps_its_step_numbers_and_writes_the_checkpointed_steps_once(tmp_path):
    from minifast import Checkpoint
    learn = make_learner(tmp_path)
    tb = TensorBoardLogger(tmp_path / 'tb')
    ck = Checkpoint(path=tmp_path / 'ck', every='epoch')
    with pytest.raises(KeyboardInterrupt):  # at epoch 1's second batch; the checkpoint of epoch 0 is on disk
        learn.fit_one_cycle(3, slice(1e-3, 1e-2), callbacks=[tb, ck, Boom(KeyboardInterrupt())])
    shutil.copytree(tmp_path / 'ck', tmp_path / 'ck_at_interrupt')
    learn.fit_one_cycle(3, slice(1e-3, 1e-2), callbacks=[tb, ck], resume=tmp_path / 'ck')
    steps = [s for s, _ in tb_series(tb_reader(tmp_path / 'tb'), 'loss/raw')]
    assert max(steps) == 11 and set(steps) == set(range(12))  # 3 epochs of 4 steps, numbered as one fit
    assert all(steps.count(i) == 1 for i in range(4))  # epoch 0 (before the checkpoint): written once
    epochs = [e for e, _ in tb_series(tb_reader(tmp_path / 'tb'), 'valid_loss')]
    assert sorted(epochs) == [0, 1, 2]
    # a new tracker resuming from that checkpoint writes the whole history into its own run
    tb2 = TensorBoardLogger(tmp_path / 'tb2')
    learn.fit_one_cycle(3, slice(1e-3, 1e-2), callbacks=[tb2], resume=tmp_path / 'ck_at_interrupt')
    assert [s for s, _ in tb_series(tb_reader(tmp_path / 'tb2'), 'loss/raw')] == list(range(12))
