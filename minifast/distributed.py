"""Data-parallel training on torch.distributed, launched by torchrun: the same script, one process per device.

`torchrun --nproc_per_node N train.py` starts N copies of a script; each Learner finds RANK/WORLD_SIZE/LOCAL_RANK,
joins the process group (NCCL on CUDA, gloo on CPU) and trains through `DistributedDataParallel`: every rank draws
the same permutation of the training set and takes its slice of every global batch (`bs` is per process, so a step
sees bs * world items), validation is split into contiguous blocks and its sums reduced across ranks, progress,
logs, snapshots and checkpoints are written by rank 0 only, and lr_find runs on rank 0 and broadcasts its result.
Without torchrun (or with WORLD_SIZE=1) nothing here runs.
"""
import atexit
import contextlib
import datetime
import math
import os
import warnings

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Sampler

from .determinism import rng_state, set_rng_state

__all__ = ['dist_env', 'launched', 'init_distributed', 'is_distributed', 'rank', 'world_size', 'is_main', 'barrier',
           'all_reduce_', 'broadcast_object', 'sync_rng', 'shard_loader', 'ShardSampler', 'Local', 'DDP', 'strategy',
           'local']

_OWNED = False  # True when minifast created the process group (and so destroys it at exit)


def dist_env():
    """(rank, world size, local rank) from the environment torchrun sets; (0, 1, 0) outside torchrun."""
    env = os.environ
    try:
        return int(env.get('RANK', 0)), int(env.get('WORLD_SIZE', 1)), int(env.get('LOCAL_RANK', 0))
    except ValueError as e:
        raise ValueError(f'RANK/WORLD_SIZE/LOCAL_RANK must be integers (torchrun sets them): {e}') from None


def launched():
    """True when this process is one of several that torchrun (or a similar launcher) started, and
    MINIFAST_DISTRIBUTED is not '0'."""
    return dist_env()[1] > 1 and os.environ.get('MINIFAST_DISTRIBUTED', '1') != '0'


def is_distributed():
    """True when a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    """This process's rank in the process group (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size():
    """The number of processes in the process group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    """True on rank 0, and whenever training is not distributed: the process that prints and writes files."""
    return rank() == 0


def _timeout():
    v = os.environ.get('MINIFAST_DIST_TIMEOUT', '30')
    try:
        minutes = float(v)
    except ValueError:
        raise ValueError(f'MINIFAST_DIST_TIMEOUT must be a number of minutes, got {v!r}') from None
    if not minutes > 0:
        raise ValueError(f'MINIFAST_DIST_TIMEOUT must be a positive number of minutes, got {v!r}')
    return datetime.timedelta(minutes=minutes)


def _cleanup():
    global _OWNED
    if _OWNED and dist.is_initialized():
        _OWNED = False
        dist.destroy_process_group()


def init_distributed(distributed=None):
    """Join the process group when launched by torchrun; returns the world size (1: not distributed).

    `distributed=False` (or MINIFAST_DISTRIBUTED=0) keeps this process on its own; True insists on a launch.
    A process group the script initialised itself is used as it is. Otherwise minifast initialises one: NCCL with
    this process's GPU (cuda:LOCAL_RANK, made the current device) when CUDA is available, gloo otherwise, with the
    timeout MINIFAST_DIST_TIMEOUT (minutes, default 30: ranks wait that long for rank 0's lr_find or writes), and
    destroys it when the process exits.
    """
    global _OWNED
    if distributed is False:
        return 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if not launched():
        if distributed:
            raise ValueError(f'Learner(distributed=True): this process was not launched for distributed training '
                             f'(WORLD_SIZE={os.environ.get("WORLD_SIZE", "unset")}); start the script with '
                             f'torchrun --nproc_per_node N')
        return 1
    if not dist.is_available():
        raise RuntimeError('WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process, or set '
                           'MINIFAST_DISTRIBUTED=0')
    _, world, local = dist_env()
    timeout = _timeout()
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise RuntimeError(f'LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPU(s); start at '
                               f'most that many processes per node (--nproc_per_node)')
        torch.cuda.set_device(local)
        dist.init_process_group('nccl', timeout=timeout, device_id=torch.device('cuda', local))
    else:
        dist.init_process_group('gloo', timeout=timeout)
    _OWNED = True
    atexit.register(_cleanup)
    return world


def check_device(device):
    """Under torchrun every process must train on its own GPU: cuda:LOCAL_RANK."""
    local = dist_env()[2]
    if device.type == 'cuda' and device.index != local:
        raise ValueError(f'Learner: device {device} on the process with LOCAL_RANK {local}; under torchrun each '
                         f"process trains on cuda:LOCAL_RANK: pass device=None or device='cuda'")
    return device


def barrier():
    """Wait until every rank gets here (nothing when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce_(t, op='sum'):
    """Reduce tensor `t` in place across ranks with 'sum', 'min' or 'max' (nothing when not distributed)."""
    if is_distributed():
        dist.all_reduce(t, op={'sum': dist.ReduceOp.SUM, 'min': dist.ReduceOp.MIN, 'max': dist.ReduceOp.MAX}[op])
    return t


def broadcast_object(obj, src=0):
    """`obj` as rank `src` has it, on every rank (pickled; nothing happens when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sync_rng():
    """Give every rank rank 0's RNG states (torch, CUDA, numpy, random): they then draw the same permutations."""
    state = broadcast_object(rng_state())
    cuda = state.get('cuda')
    if cuda is not None and torch.cuda.is_available():  # one generator per device: ours is the current one
        state = dict(state, cuda=None)
        torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[torch.cuda.current_device()])
    set_rng_state(state)


class Local:
    """How one process trains: nothing to wrap, shard, reduce or wait for. The learner holds one (`learn.dist`)."""
    world, rank, is_main = 1, 0, True

    def setup(self, learn):
        """The module that runs the training forward of a fit (None: learn.model itself)."""
        return None

    def loader(self, dl, train):
        """`dl`, or this rank's share of it."""
        return dl

    def no_sync(self):
        """The context of a backward whose gradients must not be reduced yet (accumulation)."""
        return contextlib.nullcontext()

    def reduce(self, t, op='sum'):
        """`t` reduced across ranks in place ('sum', 'min' or 'max')."""
        return t

    def barrier(self):
        """Wait until every rank gets here."""

    def sync_rng(self):
        """Give every rank rank 0's RNG states, so they draw the same permutations."""

    def sync_buffers(self, learn):
        """Give every rank rank 0's buffers (BatchNorm statistics)."""

    def drop(self, learn):
        """Forget the wrapper of a fit that stopped on an error."""


class DDP(Local):
    """Data-parallel training under torchrun: `setup` wraps the model in DistributedDataParallel (rebuilt when the
    trainable parameters change), `loader` shards the data, `reduce` all_reduces, `sync_buffers` broadcasts rank 0's
    BatchNorm statistics. `ddp_kwargs` are passed to DistributedDataParallel."""

    def __init__(self, world, ddp_kwargs=None):
        self.world, self.rank, self.ddp_kwargs = world, rank(), dict(ddp_kwargs or {})
        self.is_main, self.wrapper, self._key, self._shards = self.rank == 0, None, None, {}

    def setup(self, learn):
        """The DistributedDataParallel module that runs learn.model's training forward (learn.model stays the plain
        module: its state dict has no 'module.' prefix). Building it copies rank 0's weights and buffers to every
        rank; a kept wrapper gets rank 0's weights broadcast (e.g. a learn.load done on rank 0 only)."""
        from torch.nn.parallel import DistributedDataParallel  # (only under torchrun)
        model = learn.model
        key = (id(model), tuple(p.requires_grad for p in model.parameters()))
        if self.wrapper is not None and self._key == key:
            with torch.no_grad():
                for t in model.state_dict().values():
                    dist.broadcast(t, 0)
            return self.wrapper
        kw = dict(self.ddp_kwargs)  # buffers (BatchNorm statistics) follow rank 0's
        if learn.device.type == 'cuda':
            kw.setdefault('device_ids', [learn.device.index])
            kw.setdefault('output_device', learn.device.index)
        self.wrapper, self._key = DistributedDataParallel(model, **kw), key
        return self.wrapper

    def loader(self, dl, train):
        """This rank's share of `dl` (built once per loader)."""
        key = (id(dl), train)
        got = self._shards.get(key)
        if got is None or got[0] is not dl:
            got = self._shards[key] = (dl, shard_loader(dl, self.rank, self.world, train))
        return got[1]

    def no_sync(self):
        return contextlib.nullcontext() if self.wrapper is None else self.wrapper.no_sync()

    def reduce(self, t, op='sum'):
        return all_reduce_(t, op)

    def barrier(self):
        barrier()

    def sync_rng(self):
        sync_rng()

    def sync_buffers(self, learn):
        """DDP copies rank 0's buffers at the start of each training forward, so after an epoch's last forward each
        rank holds the statistics of its own last batch: without this, the ranks would validate with different
        models. Nothing when `ddp_kwargs` turns DDP's broadcast_buffers off."""
        if not is_distributed() or not self.ddp_kwargs.get('broadcast_buffers', True):
            return
        with torch.no_grad():
            for b in learn.model.buffers():
                dist.broadcast(b, 0)

    def drop(self, learn):
        """Forget the DDP wrapper after a fit that stopped on an error: it may have stopped between a forward and
        its backward, and that wrapper's gradient hooks would then start an all_reduce in the next backward on this
        rank alone (a rank-0 lr_find), which hangs every rank. The next fit builds a new one."""
        ddp, self.wrapper, self._key = self.wrapper, None, None
        if ddp is not None:
            learn.compiled = {k: v for k, v in learn.compiled.items() if v[0] is not ddp}
            reducer = getattr(ddp, 'reducer', None)
            if reducer is not None and hasattr(reducer, '_remove_autograd_hooks'):
                reducer._remove_autograd_hooks()  # do not wait for the wrapper to be collected


def strategy(distributed=None, ddp_kwargs=None):
    """The learner's distribution strategy: `DDP` when this process is one of several launched by torchrun (see
    `init_distributed`), else `Local`."""
    if distributed not in (None, True, False):
        raise ValueError(f'Learner: distributed must be None (automatic under torchrun), True or False, got '
                         f'{distributed!r}')
    if ddp_kwargs is not None and not isinstance(ddp_kwargs, dict):
        raise TypeError(f'Learner: ddp_kwargs must be a dict of DistributedDataParallel arguments, got '
                        f'{type(ddp_kwargs).__name__}')
    world = init_distributed(distributed)
    return Local() if world == 1 else DDP(world, ddp_kwargs)


@contextlib.contextmanager
def local(learn):
    """Train as a single process while in this block (lr_find on rank 0): no DDP wrapper, sharding, reductions
    or RNG sync."""
    old, learn.dist = learn.dist, Local()
    try:
        yield learn
    finally:
        learn.dist = old


# ---- data ---------------------------------------------------------------------------------------------------------
def shard_bounds(n, rank, world):
    """Rank `rank`'s contiguous block [start, stop) of n items split over `world` ranks (ceil(n / world) each, the
    last ones shorter or empty): validation shards cover every item exactly once, without padding."""
    c = math.ceil(n / world)
    return min(n, rank * c), min(n, (rank + 1) * c)


class ShardSampler(Sampler):
    """Indices of one rank's share of a dataset of `n` items, for a torch DataLoader with batch_size=`bs`.

    Training (`train=True`): a permutation of range(n) drawn from torch's global RNG when `shuffle` (the same on
    every rank once their RNGs are synced), cut into global batches of bs * world items (a partial one is dropped),
    of which this rank takes items [rank * bs, (rank + 1) * bs). Evaluation: the contiguous block `shard_bounds`.
    """

    def __init__(self, n, bs, rank, world, train=True, shuffle=True):
        self.n, self.bs, self.rank, self.world, self.train, self.shuffle = n, bs, rank, world, train, shuffle

    def __len__(self):
        if self.train:
            return self.n // (self.bs * self.world) * self.bs
        start, stop = shard_bounds(self.n, self.rank, self.world)
        return stop - start

    def __iter__(self):
        if not self.train:
            return iter(range(*shard_bounds(self.n, self.rank, self.world)))
        g, bs, r = self.bs * self.world, self.bs, self.rank
        perm = torch.randperm(self.n) if self.shuffle else torch.arange(self.n)
        return iter(torch.cat([perm[i * g + r * bs:i * g + (r + 1) * bs] for i in range(self.n // g)]).tolist()
                    if self.n >= g else [])


_warned_drop_last = set()


def shard_loader(dl, rank, world, train):
    """A loader yielding this rank's share of `dl`'s batches (see TensorDataLoader.shard and ShardSampler)."""
    if hasattr(dl, 'shard'):
        if train and not getattr(dl, 'drop_last', True) and id(dl) not in _warned_drop_last:
            _warned_drop_last.add(id(dl))
            if rank == 0:
                warnings.warn('distributed training: the training loader has drop_last=False, but every rank must '
                              'see equal batches, so the last partial global batch of each epoch is dropped')
        return dl.shard(rank, world, train)
    if isinstance(dl, DataLoader):
        ds = dl.dataset
        if isinstance(ds, IterableDataset) or dl.batch_size is None:
            what = 'an iterable dataset' if isinstance(ds, IterableDataset) else 'a batch_sampler'
            raise TypeError(f'distributed training: cannot shard a torch DataLoader over {what}; give it a map-style '
                            f'dataset and batch_size, or shard the data yourself and pass distributed=False')
        shuffle = train and not isinstance(dl.sampler, torch.utils.data.SequentialSampler)
        kw = dict(batch_size=dl.batch_size, num_workers=dl.num_workers, collate_fn=dl.collate_fn,
                  pin_memory=dl.pin_memory, timeout=dl.timeout, worker_init_fn=dl.worker_init_fn,
                  multiprocessing_context=dl.multiprocessing_context, persistent_workers=dl.persistent_workers)
        if dl.num_workers > 0:
            kw['prefetch_factor'] = dl.prefetch_factor
        return DataLoader(ds, sampler=ShardSampler(len(ds), dl.batch_size, rank, world, train, shuffle), **kw)
    raise ValueError(f'distributed training: cannot shard a {type(dl).__name__} across ranks; use a '
                    f'TensorDataLoader (minifast data), a torch DataLoader over a map-style dataset, or pass '
                    f'distributed=False to the Learner and shard the data yourself')
