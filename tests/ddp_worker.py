"""The script tests/test_distributed.py runs under torchrun (2 CPU processes, gloo), and the experiment it compares
with one process: `python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT`.

Each rank writes OUT/rank{r}.pt (torch.save of what `experiment` returns) and trains in OUT/rank{r}/, so the test can
see which ranks wrote files. Not collected by pytest (no test_ prefix).
"""
import contextlib
import io
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest's data and model
from conftest import make_data, make_mlp  # noqa: E402

from minifast import CSVLogger, Checkpoint, Learner, accuracy, set_seed  # noqa: E402

N_TRAIN, N_VALID, VAL_BS, EPOCHS, LR = 640, 50, 16, 2, 1e-2


def experiment(path, bs):
    """lr_find, then fit_one_cycle(2) with a CSVLogger and a Checkpoint, on 640 training items (10 global steps per
    epoch at 64 items a step) and 50 validation items (uneven validation shards); returns what the test compares."""
    set_seed(0)
    data = make_data(n_train=N_TRAIN, n_valid=N_VALID, bs=bs, val_bs=VAL_BS)
    learn = Learner(data, make_mlp(), metrics=[accuracy], callback_fns=[CSVLogger], callbacks=[Checkpoint(path='ck')],
                    path=path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = learn.lr_find(num_it=10)
        sweep = (list(learn.recorder.lrs), list(learn.recorder.losses))  # every rank's Recorder holds the sweep
        learn.fit_one_cycle(EPOCHS, LR)
        valid = learn.validate()
    r = learn.recorder
    return {'world': learn.dist.world, 'wrapped': getattr(learn.dist, 'wrapper', None) is not None,
            'fwd_after_fit': learn.fwd,
            'state': {k: v.clone() for k, v in learn.model.state_dict().items()},
            'lrs': r.lrs, 'moms': r.moms, 'raw': r.raw_losses, 'smooth': r.losses, 'bs': r.bs,
            'train_losses': r.train_losses, 'val_losses': r.val_losses, 'metrics': r.metrics,
            'nb_batches': r.nb_batches, 'validate': valid, 'stdout': out.getvalue(),
            'lr_find': {'lrs': res.lrs, 'losses': res.losses, 'valley': res.valley, 'steep': res.steep,
                        'minimum': res.minimum}, 'sweep': sweep}


def torch_loader_fit(bs):
    """Two fits of one epoch from a torch DataLoader (sharded with ShardSampler): the steps and the final weights."""
    set_seed(1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 3, (200,), generator=g)
    dl = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True)
    vdl = DataLoader(TensorDataset(x[:21], y[:21]), batch_size=8)
    from minifast import DataBunch
    learn = Learner(DataBunch(dl, vdl), make_mlp(), metrics=[accuracy], silent=True)
    learn.fit(1, 1e-2)
    if int(os.environ['RANK']) == 1:  # as after a learn.load on one rank: the next fit starts from rank 0's weights
        with torch.no_grad():
            for p in learn.model.parameters():
                p.add_(1.)
    learn.fit(1, 1e-2)  # the cached DDP wrapper
    return {'steps': learn.train_iter, 'state': learn.model.state_dict(), 'validate': learn.validate(),
            'single_validate': _plain_validate(learn, vdl)}


def resume_fit(out, rank):
    """fit_one_cycle(2) checkpointed every 5 steps, and the same fit resumed (on every rank) from rank 0's checkpoint
    in the middle of epoch 0: the final weights of both."""
    def run(path, resume=None):
        set_seed(2)
        data = make_data(n_train=N_TRAIN, n_valid=N_VALID, bs=32, val_bs=VAL_BS)
        learn = Learner(data, make_mlp(), metrics=[accuracy], silent=True, path=path,
                        callbacks=[Checkpoint(path='ck', every=5, keep_last=None)])
        learn.fit_one_cycle(EPOCHS, LR, resume=resume)
        return {k: v.clone() for k, v in learn.model.state_dict().items()}
    full = run(out / f'resume{rank}')
    file = out / 'resume0' / 'ck' / 'ckpt_00000_epoch0_step5.pth'  # rank 0 wrote it; every rank reads it
    return {'full': full, 'resumed': run(out / f'resumed{rank}', resume=file), 'file': file.name}


def diverged_then_lr_find():
    """A fit stopped by a non-finite loss (after the DDP forward, before its backward), then lr_find and a fit."""
    from minifast import Callback, DivergenceError

    class NanAt(Callback):
        on = True

        def after_pred(self, learn):
            if self.on and learn.training and learn.train_iter == 3:
                learn.pred = learn.pred * float('nan')
    set_seed(3)
    nan = NanAt()
    learn = Learner(make_data(n_train=256, bs=32), make_mlp(), silent=True, callbacks=[nan])
    error = None
    try:
        learn.fit(1, 1e-2)
    except DivergenceError as e:
        error = type(e).__name__
    wrapped_after = getattr(learn.dist, 'wrapper', None) is not None
    nan.on = False
    with contextlib.redirect_stdout(io.StringIO()):
        res = learn.lr_find(num_it=5)
    learn.fit(1, 1e-2)
    return {'error': error, 'wrapped_after': wrapped_after, 'lr_find_steps': len(res.lrs), 'valley': res.valley,
            'fit_steps': learn.train_iter}


def accumulate_fit(bs):
    """fit_one_cycle(2) with GradientAccumulation(n_step=2) and clip: the weights, the steps, and how many gradient
    all_reduces DDP made (one per step: the batches that do not step run under no_sync)."""
    from minifast import Callback, GradientAccumulation

    class CountReduces(Callback):
        n = 0

        def before_fit(self, learn):
            if getattr(learn.dist, 'wrapper', None) is not None:
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                def hook(state, bucket):
                    self.n += 1
                    return allreduce_hook(state, bucket)
                learn.dist.wrapper.register_comm_hook(None, hook)
    set_seed(4)
    count = CountReduces()
    data = make_data(n_train=N_TRAIN, n_valid=N_VALID, bs=bs, val_bs=VAL_BS)
    learn = Learner(data, make_mlp(), silent=True, callbacks=[GradientAccumulation(n_step=2), count])
    learn.fit_one_cycle(EPOCHS, LR, clip=0.05)
    r = learn.recorder
    return {'state': {k: v.clone() for k, v in learn.model.state_dict().items()}, 'steps': learn.train_iter,
            'reduces': count.n, 'lrs': r.lrs, 'raw': r.raw_losses, 'bs': r.bs}


def control_fit(path, bs):
    """EarlyStopping, ReduceLROnPlateau and SaveModelCallback in one fit with a learning rate high enough for the
    validation loss to stall: their decisions, the lrs per step and the final (best) weights."""
    from minifast import EarlyStopping, ReduceLROnPlateau, SaveModelCallback
    set_seed(4)
    data = make_data(n_train=N_TRAIN, n_valid=N_VALID, bs=bs, val_bs=VAL_BS)
    es, rp = EarlyStopping(monitor='valid_loss', patience=1), ReduceLROnPlateau(patience=0, factor=0.5, min_lr=1e-4)
    sm = SaveModelCallback(monitor='accuracy')
    learn = Learner(data, make_mlp(), metrics=[accuracy], silent=True, path=path, callbacks=[es, rp, sm])
    learn.fit(8, 0.3)
    return {'stopped': es.stopped_epoch, 'reductions': rp.reductions, 'best_epoch': sm.best_epoch,
            'epochs': len(learn.recorder.val_losses), 'lrs': learn.recorder.lrs,
            'state': {k: v.clone() for k, v in learn.model.state_dict().items()}}


def batchnorm_fit():
    """One epoch of a BatchNorm model: its state, validate() and get_preds() on each rank, and the validation loss of
    this rank's model over the whole set computed by hand."""
    import torch.nn.functional as F
    from torch import nn
    set_seed(5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    data = make_data(n_train=256, n_valid=N_VALID, bs=32, val_bs=VAL_BS)
    learn = Learner(data, model, silent=True)
    learn.fit(1, 1e-2)
    model.eval()
    with torch.no_grad():
        x, y = data.valid_dl.tensors
        by_hand = F.cross_entropy(model(x), y).item()
    return {'state': {k: v.clone() for k, v in model.state_dict().items()}, 'val_loss': learn.recorder.val_losses[0],
            'validate': learn.validate(), 'preds': learn.get_preds()[0], 'by_hand': by_hand}


def torchmetrics_fit():
    """One epoch with torchmetrics' micro accuracy and macro F1 next to minifast's accuracy: what this rank reports,
    and the model's outputs over the whole validation set (for the F1 by hand)."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
    set_seed(6)
    data = make_data(n_train=256, n_valid=N_VALID, bs=32, val_bs=VAL_BS)
    metrics = [accuracy, MulticlassAccuracy(num_classes=3, average='micro'),
               MulticlassF1Score(num_classes=3, average='macro')]
    learn = Learner(data, make_mlp(), metrics=metrics, silent=True)
    learn.fit(1, 1e-2)
    x, y = data.valid_dl.tensors
    learn.model.eval()
    with torch.no_grad():
        out = learn.model(x)
    return {'metrics': learn.recorder.metrics, 'validate': learn.validate(), 'out': out, 'y': y}


def _plain_validate(learn, dl):
    """The validation loss of the whole set in this process, without any sharding."""
    import torch.nn.functional as F
    with torch.no_grad():
        return float(sum(F.cross_entropy(learn.model(xb), yb, reduction='sum') for xb, yb in dl) / len(dl.dataset))


def main(out):
    out = Path(out)
    rank = int(os.environ['RANK'])
    result = experiment(out / f'rank{rank}', bs=32)
    result['torch_loader'] = torch_loader_fit(bs=16)
    result['resume'] = resume_fit(out, rank)
    result['diverged'] = diverged_then_lr_find()
    result['control'] = control_fit(out / 'control', bs=32)  # one folder, as on one machine or a shared disk
    result['accumulate'] = accumulate_fit(bs=32)
    result['batchnorm'] = batchnorm_fit()
    result['torchmetrics'] = torchmetrics_fit()
    try:
        Learner(make_data(), make_mlp(), sync_bn=True)
        result['sync_bn_error'] = None
    except ValueError as e:
        result['sync_bn_error'] = str(e)
    torch.save(result, out / f'rank{rank}.pt')


if __name__ == '__main__':
    main(sys.argv[1])
