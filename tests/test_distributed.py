"""Data-parallel training under torchrun: one launch of 2 CPU processes (gloo) compared with one process at the
global batch size, plus the shard arithmetic and the reductions without processes."""
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from minifast import Learner, TensorDataLoader
from minifast.distributed import Local, ShardSampler, launched, shard_bounds, shard_loader
from minifast.metrics import batch_means

from conftest import make_data, make_mlp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOL = 1e-5


# ---- the launch ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def ddp(tmp_path_factory):
    """Run tests/ddp_worker.py on 2 processes once for the whole module; (rank 0's result, rank 1's, the folder)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip('torch.distributed with gloo is not available')
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                                                          'MASTER_PORT', 'MINIFAST_DISTRIBUTED')}
    env.update(OMP_NUM_THREADS='1', MPLBACKEND='Agg', CUDA_VISIBLE_DEVICES='', MINIFAST_DIST_TIMEOUT='1',
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get('PYTHONPATH')])]))
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp('ddp')  # a fresh folder: the worker resumes from what it finds
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
               str(HERE / 'ddp_worker.py'), str(out)]
        try:
            p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b'')[-4000:]
            pytest.fail(f'torchrun did not finish in {e.timeout}s; stderr tail:\n'
                        f'{tail.decode(errors="replace") if isinstance(tail, bytes) else tail}')
        # once in many runs (2026-12-04, not reproduced in 6 more) a gloo rank aborted in C++ with this and nothing
        # from Python; that one case gets a second launch, named in a warning, and everything else fails at once
        if p.returncode == 0 or attempt == 2 or 'terminate called without an active exception' not in p.stderr:
            break
        warnings.warn(f'torchrun: a rank aborted in C++ (terminate called without an active exception); launched '
                      f'again. stderr tail:\n{p.stderr[-1500:]}')
    if p.returncode != 0:
        pytest.fail(f'torchrun exited with {p.returncode}; stderr tail:\n{p.stderr[-6000:]}\nstdout tail:\n'
                    f'{p.stdout[-2000:]}')
    r0, r1 = (torch.load(out / f'rank{r}.pt', weights_only=False) for r in (0, 1))
    return r0, r1, out, p


@pytest.fixture(scope='module')
def single(tmp_path_factory):
    """The same experiment in this process with the global batch size (2 x 32)."""
    from ddp_worker import experiment
    return experiment(tmp_path_factory.mktemp('single'), bs=64)


def _close(a, b, what):
    assert len(a) == len(b), f'{what}: {len(a)} vs {len(b)} values'
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= TOL, f'{what}[{i}]: {x} vs {y}'


def test_ddp_trains_data_parallel(ddp):
    r0, r1, _, _ = ddp
    for r in (r0, r1):
        assert r['world'] == 2 and r['wrapped'] and r['fwd_after_fit'] is None
        assert r['nb_batches'] == [10, 10]  # 640 items, 2 x 32 a step: global steps
        assert r['bs'] == [64] * 20  # the Recorder records the global batch


def test_ddp_matches_single_process_bs64(ddp, single):
    r0, r1, _, _ = ddp
    assert single['world'] == 1 and not single['wrapped']
    for k, v in single['state'].items():
        assert torch.equal(r0['state'][k], r1['state'][k]), f'{k}: the ranks differ'
        diff = (r0['state'][k] - v).abs().max().item()
        assert diff <= TOL, f'{k}: 2 processes x 32 and 1 process x 64 differ by {diff}'
    for r in (r0, r1):
        assert r['lrs'] == pytest.approx(single['lrs'], abs=1e-12, rel=0) and len(r['lrs']) == 20
        assert r['moms'] == pytest.approx(single['moms'], abs=1e-12, rel=0)
        _close(r['raw'], single['raw'], 'per-step losses')
        _close(r['smooth'], single['smooth'], 'smoothed losses')
        _close(r['train_losses'], single['train_losses'], 'train_losses')
        _close(r['val_losses'], single['val_losses'], 'val_losses')
        _close([m[0] for m in r['metrics']], [m[0] for m in single['metrics']], 'accuracy')
        _close(r['validate'], single['validate'], 'validate()')


def test_ddp_rank0_only_outputs(ddp, single):
    r0, r1, out, p = ddp
    rows = (out / 'rank0' / 'history.csv').read_text().splitlines()
    assert rows[0].startswith('epoch,train_loss,valid_loss,accuracy') and len(rows) == 3
    assert sorted(f.name for f in (out / 'rank0' / 'ck').iterdir()) == ['ckpt_00000_epoch0_step10.pth',
                                                                       'ckpt_00001_epoch1_step20.pth']
    assert not (out / 'rank1').exists(), f'rank 1 wrote {sorted(map(str, (out / "rank1").rglob("*")))}'
    assert r1['stdout'] == ''
    rows = lambda text: [line for line in text.splitlines() if line.startswith(('epoch', '0 ', '1 '))]  # noqa: E731
    table = rows(r0['stdout'])
    # lr_find's sweep prints nothing outside a notebook or terminal, as in one process; then the fit's header and
    # its two rows
    assert len(table) == len(rows(single['stdout'])) == 3
    assert table[0].split()[:4] == ['epoch', 'train_loss', 'valid_loss', 'accuracy']
    # rank 0's table shows the global values, those of one process
    assert float(table[1].split()[1]) == pytest.approx(single['train_losses'][0], abs=2e-6)
    assert float(table[2].split()[2]) == pytest.approx(single['val_losses'][1], abs=2e-6)
    ck = torch.load(out / 'rank0' / 'ck' / 'ckpt_00001_epoch1_step20.pth', weights_only=True)
    assert ck['signature']['world_size'] == 2 and ck['signature']['steps_per_epoch'] == 10


def test_ddp_lr_find_broadcast(ddp):
    r0, r1, _, _ = ddp
    assert r0['lr_find'] == r1['lr_find']  # suggestions and all (a 10-step sweep may show no clear descent)
    assert len(r0['lr_find']['lrs']) == 10
    assert r0['sweep'] == r1['sweep'] == (r0['lr_find']['lrs'], r0['lr_find']['losses'])


def test_ddp_torch_dataloader_and_sync_bn(ddp):
    r0, r1, _, _ = ddp
    a, b = r0['torch_loader'], r1['torch_loader']
    assert a['steps'] == b['steps'] == 200 // 32  # the second fit's steps
    for k in a['state']:
        assert torch.equal(a['state'][k], b['state'][k]), k
    assert a['validate'] == b['validate']
    assert a['validate'][0] == pytest.approx(a['single_validate'], abs=TOL)
    assert 'SyncBatchNorm works on CUDA devices only' in r0['sync_bn_error']


def test_ddp_batchnorm_statistics_are_rank_0s_after_training(ddp):
    """Each rank's last training forward updates its own BatchNorm running statistics: they must be rank 0's again
    before validation, so every rank validates, predicts and ends the fit with the model rank 0 saves."""
    a, b = ddp[0]['batchnorm'], ddp[1]['batchnorm']
    for k in a['state']:
        assert torch.equal(a['state'][k], b['state'][k]), f'{k}: the ranks differ after the fit'
    assert torch.equal(a['preds'], b['preds'])
    for r in (a, b):
        assert r['val_loss'] == pytest.approx(r['by_hand'], abs=TOL)  # the epoch's validation used rank 0's model
        assert r['validate'][0] == pytest.approx(r['by_hand'], abs=TOL)


def test_ddp_resume_mid_epoch(ddp):
    r0, r1, out, _ = ddp
    for r in (r0['resume'], r1['resume']):
        for k, v in r['full'].items():
            assert torch.equal(r['resumed'][k], v), f'{k}: the resumed run differs'
            assert torch.equal(r0['resume']['full'][k], v)
    assert not (out / 'resume1').exists() and not (out / 'resumed1').exists()
    assert (out / 'resumed0' / 'ck').is_dir()


# ---- without processes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('world', [2, 3])
def test_shard_union_equals_global_batch(world):
    n, bs = 50, 4
    x = torch.arange(n)
    torch.manual_seed(3)
    glob = list(TensorDataLoader(x, x * 10, batch_size=bs * world, shuffle=True, drop_last=True))
    after = torch.get_rng_state()
    shards = []
    for r in range(world):
        torch.manual_seed(3)
        dl = TensorDataLoader(x, x * 10, batch_size=bs, shuffle=True).shard(r, world)
        shards.append(list(dl))
        assert len(dl) == len(glob) == n // (bs * world)
        assert torch.equal(torch.get_rng_state(), after)  # the RNG moved as one process's would
    for i, (gx, gy) in enumerate(glob):
        assert torch.equal(torch.cat([s[i][0] for s in shards]), gx)
        assert torch.equal(torch.cat([s[i][1] for s in shards]), gy)
        assert all(len(s[i][0]) == bs for s in shards)


@pytest.mark.parametrize('n,world,bs', [(50, 2, 16), (7, 3, 2), (4, 3, 4), (1, 2, 3), (0, 2, 2)])
def test_valid_shards_cover_once(n, world, bs):
    x = torch.arange(n)
    seen = []
    for r in range(world):
        dl = TensorDataLoader(x, x, batch_size=bs).shard(r, world, train=False)
        batches = [b[0] for b in dl]
        assert len(batches) == len(dl) and all(0 < len(b) <= bs for b in batches)
        seen += torch.cat(batches).tolist() if batches else []
        lo, hi = shard_bounds(n, r, world)
        assert hi - lo <= math.ceil(n / world)
    assert seen == list(range(n))


def test_shard_sampler_matches_tensor_shard():
    n, bs, world = 45, 4, 2
    torch.manual_seed(0)
    perm = torch.randperm(n)
    for r in range(world):
        torch.manual_seed(0)
        got = list(ShardSampler(n, bs, r, world))
        want = torch.cat([perm[i * 8 + r * 4:i * 8 + r * 4 + 4] for i in range(n // 8)]).tolist()
        assert got == want and len(ShardSampler(n, bs, r, world)) == len(want)
    evals = [list(ShardSampler(n, bs, r, world, train=False)) for r in range(world)]
    assert evals[0] + evals[1] == list(range(n))
    ds = TensorDataset(torch.arange(n))
    shard = shard_loader(DataLoader(ds, batch_size=bs, shuffle=True), 1, world, True)
    assert isinstance(shard.sampler, ShardSampler) and len(shard) == n // 8 and shard.batch_size == bs
    with pytest.raises(ValueError, match='cannot shard a list'):
        shard_loader([1, 2], 0, 2, True)


def test_reduce_vals_arithmetic_and_empty_rank():
    learn = Learner(make_data(), make_mlp(), silent=True)
    vals = [(16, (torch.tensor(1.0), torch.tensor(0.5))), (4, (torch.tensor(2.0), torch.tensor(1.0)))]
    want = batch_means(vals, 2, learn.device)  # one process
    one_rank = lambda t, op: t  # noqa: E731  (the distributed arithmetic, on a single rank)
    got = batch_means(vals, 2, learn.device, reduce=one_rank)
    assert got == pytest.approx(want, abs=1e-7) and got == pytest.approx([1.2, 0.6])
    empty = batch_means([], 2, learn.device, reduce=one_rank)
    assert all(math.isnan(v) for v in empty) and len(empty) == 2


def test_resume_refuses_another_world_size():
    from minifast.resume import _sig_mismatch
    sig = {'n_epoch': 2, 'steps_per_epoch': 10, 'schedules': [], 'args': {}, 'world_size': 2}
    assert 'written by 2 process(es) and this run has 1' in _sig_mismatch(sig, dict(sig, world_size=1))
    assert 'nproc_per_node 2' in _sig_mismatch(sig, dict(sig, world_size=1))
    old = {k: v for k, v in sig.items() if k != 'world_size'}  # checkpoints from before: one process
    assert _sig_mismatch(old, dict(sig, world_size=1)) is None


def test_single_process_paths_and_refusals(monkeypatch, tmp_path):
    learn = Learner(make_data(), make_mlp(), silent=True)
    assert learn.dist.world == 1 and learn.is_main and learn.fwd is None
    assert learn.dist.loader(learn.data.train_dl, True) is learn.data.train_dl
    with pytest.raises(ValueError, match='not launched for distributed training'):
        Learner(make_data(), make_mlp(), distributed=True)
    with pytest.raises(ValueError, match='distributed must be None'):
        Learner(make_data(), make_mlp(), distributed='yes')
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert launched()
    from minifast import grid_search
    from minifast.smith import run
    with pytest.raises(SystemExit, match='smith runs as one process'):
        run(SimpleNamespace(out=str(tmp_path)))
    with pytest.raises(RuntimeError, match='grid_search runs as one process'):
        grid_search(lambda: learn, {'wd': [0.]})
    monkeypatch.setenv('MINIFAST_DISTRIBUTED', '0')
    assert not launched()
    assert Learner(make_data(), make_mlp(), silent=True).dist.world == 1  # opted out: a plain process


def test_ddp_gradient_accumulation_skips_reduces_and_equals_one_process(ddp):
    """2 ranks x 32 items x 2 accumulated batches equal one process accumulating 2 batches of 64 (clipped, one
    cycle); DDP reduces the gradients once per step, not once per batch."""
    from ddp_worker import accumulate_fit
    one = accumulate_fit(bs=64)
    for r in ddp[:2]:
        acc = r['accumulate']
        assert acc['steps'] == one['steps'] == 2 * 5  # 640 items: 10 batches of 64 per epoch, 5 steps
        assert acc['reduces'] == acc['steps']  # a single gradient bucket for this small model
        assert acc['lrs'] == one['lrs'] and acc['bs'] == one['bs'] == [128] * 10
        _close(acc['raw'], one['raw'], 'per-step losses')
        for k, v in one['state'].items():
            torch.testing.assert_close(acc['state'][k], v, atol=TOL, rtol=0)


def test_ddp_lr_find_after_a_diverged_fit(ddp):
    """A fit that stops between the DDP forward and its backward (a non-finite loss) must not leave gradient hooks
    that make rank 0's lone lr_find start an all_reduce (every rank would hang)."""
    r0, r1, _, _ = ddp
    for r in (r0, r1):
        assert r['diverged']['error'] == 'DivergenceError' and r['diverged']['wrapped_after'] is False
        assert r['diverged']['lr_find_steps'] == 5 and r['diverged']['fit_steps'] == 4
    assert r0['diverged']['valley'] == r1['diverged']['valley']


def test_ddp_control_callbacks_decide_as_one_process(ddp, tmp_path):
    """EarlyStopping, ReduceLROnPlateau and SaveModelCallback decide from values reduced across ranks: both ranks make
    the decisions of one process at the global batch size, and only rank 0 writes the best model."""
    from ddp_worker import control_fit
    r0, r1, out, _ = ddp
    one = control_fit(tmp_path, bs=64)
    assert one['reductions'] and one['epochs'] < 8  # the run exercises a drop and an early stop
    for r in (r0['control'], r1['control']):
        assert (r['stopped'], r['best_epoch'], r['epochs']) == (one['stopped'], one['best_epoch'], one['epochs'])
        assert [e for e, _ in r['reductions']] == [e for e, _ in one['reductions']]
        _close(r['lrs'], one['lrs'], 'lrs')
        for k, v in one['state'].items():
            assert torch.allclose(r['state'][k], v, atol=TOL, rtol=0), k
    assert (out / 'control' / 'models' / 'bestmodel.pth').exists()  # written by rank 0, loaded by both


def test_local_strategy_changes_nothing():
    local, dl, t = Local(), object(), torch.ones(3)
    assert (local.world, local.rank, local.is_main) == (1, 0, True)
    assert local.loader(dl, True) is dl and local.reduce(t) is t and local.setup(None) is None
    with local.no_sync():
        pass
    assert Learner(make_data(), make_mlp()).dist.world == 1


def test_ddp_torchmetrics_synced_by_torchmetrics_not_averaged(ddp):
    """torchmetrics gathers its states across the ranks in compute(): every rank reports the macro F1 of the whole
    validation set (by hand), not the mean of the ranks' own F1s (which minifast's reduction would give)."""
    pytest.importorskip('torchmetrics')
    r0, r1 = ddp[0]['torchmetrics'], ddp[1]['torchmetrics']
    assert r0['metrics'] == r1['metrics'] and r0['validate'] == r1['validate']
    out, y = r0['out'], r0['y']
    assert torch.equal(out, r1['out'])

    def f1(o, t):
        p = o.argmax(1)
        per = [2 * ((p == c) & (t == c)).sum().item() / max(1, (p == c).sum().item() + (t == c).sum().item())
               for c in range(3)]
        return sum(per) / 3
    whole = f1(out, y)
    shards = [shard_bounds(len(y), r, 2) for r in range(2)]
    assert abs(whole - sum(f1(out[a:b], y[a:b]) for a, b in shards) / 2) > 1e-3  # averaging would show
    for vals in (r0['metrics'][-1], r0['validate'][1:]):
        own, acc, macro = vals
        assert acc == pytest.approx(own, abs=1e-6)  # micro accuracy: the same as minifast's over every rank
        assert macro == pytest.approx(whole, abs=1e-6)
