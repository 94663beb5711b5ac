"""Gradient clipping and gradient accumulation, each against a hand-written torch loop: clip= on fit methods and the
GradientClipping callback (also under fp16 with a GradScaler on CPU), GradientAccumulation (4 batches of 16 equal one
of 64 for a model without BatchNorm; a final partial group steps), with schedules, lr_find, the Recorder,
DivergenceGuard and an exact resume from a checkpoint."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minifast
from minifast import (Callback, DataBunch, DivergenceError, GradientAccumulation, GradientClipping, Learner as _Learner,
                      set_seed)
from minifast.callbacks.tracking import Checkpoint
from minifast.resume import list_checkpoints
from minifast.optim import SGD
from conftest import make_data, make_mlp, reference_fit

Learner = partial(_Learner, device='cpu', silent=True)
CLIP = 0.05  # well below the gradient norms of these runs: every step is clipped


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_close(a, b, tol=1e-6):
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=tol, rtol=0)


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a, b))


class GradNorms(Callback):
    """The total gradient norm seen in after_backward, after the learner's other after_backward hooks."""
    order = 100

    def before_fit(self, learn):
        self.norms = []

    def after_backward(self, learn):
        g = [p.grad for p in learn.model.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g])).item())


def _torch_adamw(model, lr, wd):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=wd)


def _clip_loop(model, data, opt, epochs, seed, clip, sched=None, scaler=None, decay=None):
    """Hand-written loop: backward, (unscale,) clip_grad_norm_, (decoupled decay by hand,) step."""
    torch.manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for xb, yb in data.train_dl:
            with torch.autocast('cpu', dtype=torch.float16, enabled=scaler is not None):
                loss = F.cross_entropy(model(xb), yb)
            if scaler is None:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                if decay is not None:
                    decay(None)
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                if decay is not None:
                    ok = all(torch.isfinite(p.grad).all() for p in model.parameters())
                    decay(ok)
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
            if sched is not None:
                sched.step()


# ---- clipping --------------------------------------------------------------------------------------------------
def test_clip_on_fit_equals_hand_written_clip_grad_norm_loop():
    data = make_data(n_train=96)
    runs = {}
    for clip in (None, CLIP):
        learn = Learner(data, make_mlp(), wd=0.1, callbacks=[GradNorms()])
        torch.manual_seed(3)
        learn.fit(2, 1e-2, clip=clip)
        runs[clip] = learn
    m = make_mlp()
    _clip_loop(m, data, _torch_adamw(m, 1e-2, 0.1), 2, 3, CLIP)
    _assert_close(_params(runs[CLIP].model), _params(m))
    assert _max_diff(_params(runs[None].model), _params(m)) > 1e-4  # the clipping changed the run
    assert min(runs[None].callbacks[0].norms) > 2 * CLIP
    assert max(runs[CLIP].callbacks[0].norms) <= CLIP * (1 + 1e-5)
    assert not any(isinstance(cb, GradientClipping) for cb in runs[CLIP].callbacks)  # for that call only


def test_gradient_clipping_callback_with_fit_one_cycle_equals_torch_one_cycle():
    data = make_data(n_train=96)
    learn = Learner(data, make_mlp(), wd=0.1, callback_fns=[partial(GradientClipping, clip=CLIP)])
    torch.manual_seed(3)
    learn.fit_one_cycle(2, 1e-2)
    m = make_mlp()
    opt = _torch_adamw(m, 1e-2, 0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=12, pct_start=0.3, div_factor=25.,
                                                final_div_factor=1e4, base_momentum=0.85, max_momentum=0.95)
    _clip_loop(m, data, opt, 2, 3, CLIP, sched=sched)
    _assert_close(_params(learn.model), _params(m))
    # clip= on fit_one_cycle (the method and the function) is the same run
    learn2 = Learner(data, make_mlp(), wd=0.1)
    torch.manual_seed(3)
    learn2.fit_one_cycle(2, 1e-2, clip=CLIP)
    _assert_close(_params(learn2.model), _params(m), tol=0)


@pytest.mark.parametrize('opt', ['adamw', 'sgd'])
def test_clip_under_fp16_unscales_once_and_equals_hand_written_scaler_loop(opt):
    """AdamW decays natively (the scaler unscales in its step); SGD with true_wd decays by hand, so the learner
    unscales before the decay: after GradientClipping unscaled, it must not unscale again."""
    data = make_data(n_train=96)
    kw = {} if opt == 'adamw' else {'opt_func': SGD}
    learn = Learner(data, make_mlp(), wd=0.1, fp16=True, **kw)
    torch.manual_seed(3)
    learn.fit(2, 1e-2, clip=CLIP)
    m = make_mlp()
    scaler = torch.amp.GradScaler('cpu')
    if opt == 'adamw':
        ref_opt, decay = _torch_adamw(m, 1e-2, 0.1), None
    else:
        ref_opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)

        def decay(ok):
            with torch.no_grad():
                for p in m.parameters():
                    p.mul_(1 - 1e-2 * 0.1 if ok else 1.)
    _clip_loop(m, data, ref_opt, 2, 3, CLIP, scaler=scaler, decay=decay)
    _assert_close(_params(learn.model), _params(m))
    assert learn.stepper.scaler.get_scale() == scaler.get_scale() and not learn.stepper.unscaled


def test_clip_arguments():
    for bad in (0, -1., float('inf'), 'x', True):
        with pytest.raises(ValueError, match='clip must be a positive'):
            GradientClipping(clip=bad)
    learn = Learner(make_data(), make_mlp())
    with pytest.raises(ValueError, match='clip must be a positive'):
        learn.fit(1, clip=0)


# ---- accumulation --------------------------------------------------------------------------------------------
def _acc_run(bs, n_step=None, method='fit', n_train=256, clip=None, **kw):
    data = make_data(n_train=n_train, n_valid=32, bs=bs)
    cbs = [GradientAccumulation(n_step=n_step)] if n_step else []
    learn = Learner(data, make_mlp(), callbacks=cbs, metrics=[minifast.accuracy])
    torch.manual_seed(5)
    getattr(learn, method)(2, 1e-2, clip=clip, **kw)
    return learn


def _same_record(a, b):
    ra, rb = a.recorder, b.recorder
    assert ra.group_lrs == rb.group_lrs and ra.group_moms == rb.group_moms
    assert ra.nb_batches == rb.nb_batches and ra.bs == rb.bs
    assert len(ra.raw_losses) == len(rb.raw_losses) == a.train_iter == b.train_iter
    torch.testing.assert_close(torch.tensor(ra.raw_losses), torch.tensor(rb.raw_losses), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(ra.val_losses), torch.tensor(rb.val_losses), atol=1e-6, rtol=0)


@pytest.mark.parametrize('method', ['fit', 'fit_one_cycle'])
def test_accumulating_4_batches_of_16_equals_one_batch_of_64(method):
    big, acc = _acc_run(64, method=method), _acc_run(16, 4, method=method)
    _assert_close(_params(acc.model), _params(big.model))
    _same_record(big, acc)
    assert acc.train_iter == 8 and acc.recorder.nb_batches == [4, 4] and acc.recorder.bs == [64] * 8
    if method == 'fit_one_cycle':  # the schedule is laid out over optimizer steps: that of the bs-64 run
        assert len(set(acc.recorder.lrs)) == 8
    small = _acc_run(16, method=method)  # the same batches without accumulation: a different run
    assert _max_diff(_params(small.model), _params(big.model)) > 1e-4


def test_accumulation_with_clip_equals_clipped_batch_of_64():
    big, acc = _acc_run(64, method='fit_one_cycle', clip=CLIP), _acc_run(16, 4, method='fit_one_cycle', clip=CLIP)
    _assert_close(_params(acc.model), _params(big.model))
    _same_record(big, acc)
    unclipped = _acc_run(16, 4, method='fit_one_cycle')
    assert _max_diff(_params(unclipped.model), _params(big.model)) > 1e-4


def test_final_partial_group_steps_as_the_mean_of_its_batches():
    """80 items in batches of 16 with n_step=4: a step of 4 batches and one of the last batch, each epoch."""
    data = make_data(n_train=80, bs=16)
    learn = Learner(data, make_mlp(), wd=0.1, callbacks=[GradientAccumulation(n_step=4)])
    torch.manual_seed(3)
    learn.fit(2, 1e-2)
    m = make_mlp()
    opt = _torch_adamw(m, 1e-2, 0.1)
    torch.manual_seed(3)
    losses = []
    for _ in range(2):
        batches = list(data.train_dl)
        for i, (xb, yb) in enumerate(batches):
            k = min(4, len(batches) - i // 4 * 4)
            loss = F.cross_entropy(m(xb), yb)
            (loss / k).backward()
            losses.append(loss.item())
            if (i + 1) % 4 == 0 or i == len(batches) - 1:
                opt.step()
                opt.zero_grad()
    _assert_close(_params(learn.model), _params(m))
    r = learn.recorder
    assert learn.train_iter == 4 and r.nb_batches == [2, 2] and r.bs == [64, 16, 64, 16]
    want = [sum(losses[0:4]) / 4, losses[4], sum(losses[5:9]) / 4, losses[9]]
    torch.testing.assert_close(torch.tensor(r.raw_losses), torch.tensor(want), atol=1e-6, rtol=0)
    assert learn.stepping and learn.stepper.acc_loss is None  # left as outside accumulation


def test_events_per_batch_and_per_step():
    class Count(Callback):
        def before_fit(self, learn):
            self.n = {e: 0 for e in ('before_batch', 'after_loss', 'after_backward', 'after_step', 'after_batch')}
            self.stepping, self.steps = [], []

        def before_batch(self, learn):
            self.n['before_batch'] += learn.training

        def after_loss(self, learn):
            self.n['after_loss'] += learn.training

        def after_backward(self, learn):
            self.n['after_backward'] += 1

        def after_step(self, learn):
            self.n['after_step'] += 1

        def after_batch(self, learn):
            if learn.training:
                self.n['after_batch'] += 1
                self.stepping.append(learn.stepping)
                self.steps.append(learn.train_iter)
    c = Count()
    learn = Learner(make_data(n_train=80, bs=16), make_mlp(), callbacks=[c, GradientAccumulation(n_step=4)])
    learn.fit(1)
    assert c.n == {'before_batch': 5, 'after_loss': 5, 'after_backward': 2, 'after_step': 2, 'after_batch': 5}
    assert c.stepping == [False, False, False, True, True] and c.steps == [0, 0, 0, 0, 1]


def test_schedule_lengths_count_optimizer_steps():
    """Every fit_* policy lays its schedule over ceil(batches / n_step) steps per epoch, from fit's callbacks= or
    learn.callbacks, and the resume signature records the accumulation."""
    data = make_data(n_train=96, bs=16)  # 6 batches: 2 steps of 4 + 2
    for where in ('callbacks', 'learner'):
        acc = GradientAccumulation(n_step=4)
        learn = Learner(data, make_mlp(), callbacks=[acc] if where == 'learner' else None)
        extra = [acc] if where == 'callbacks' else None
        assert learn.steps_per_epoch(extra) == 2 and learn.batches_per_epoch() == 6
        learn.fit_warmup_cosine(3, 1e-2, warmup_epochs=1, callbacks=extra)
        lrs = learn.recorder.lrs
        assert len(lrs) == 6 and lrs[2] == max(lrs)  # the warm-up lasts one epoch: 2 steps
        learn.fit_sgdr(2, 1, 1e-2, cycle_mult=1, callbacks=extra)
        lrs = learn.recorder.lrs
        assert len(lrs) == 4 and lrs[0] == lrs[2] == 1e-2 and lrs[1] < 1e-2
    assert learn.steps_per_epoch() == 2
    learn.remove_cb(acc)
    assert learn.steps_per_epoch() == 6


def test_lr_find_with_accumulation_steps_every_n_step_batches():
    runs = {}
    for bs, n_step in ((64, None), (16, 4)):
        data = make_data(n_train=256, bs=bs)
        learn = Learner(data, make_mlp(), callbacks=[GradientAccumulation(n_step=n_step)] if n_step else [])
        seen = []
        learn.data.train_dl.after_batch = lambda b: (seen.append(len(b[1])), b)[1]
        w = _params(learn.model)
        torch.manual_seed(0)
        res = learn.lr_find(num_it=10)
        runs[n_step] = (res, len(seen))
        _assert_close(_params(learn.model), w, tol=0)  # restored
        assert learn.callbacks[0:1] == ([] if n_step is None else [learn.callbacks[0]])
    (big, nb), (acc, na) = runs[None], runs[4]
    assert len(acc.lrs) == 10 and acc.lrs == big.lrs
    assert nb == 10 and na == 40  # each sweep step took 4 batches of 16
    torch.testing.assert_close(torch.tensor(acc.losses), torch.tensor(big.losses), atol=1e-6, rtol=0)


def test_divergence_step_counts_optimizer_steps():
    class NanAt(Callback):
        order = -20  # before the DivergenceGuard's check

        def after_loss(self, learn):
            if learn.training and learn.epoch == 1 and learn.iter == 5:
                learn.loss = learn.loss * float('nan')
    learn = Learner(make_data(n_train=128, bs=16), make_mlp(), callbacks=[NanAt(), GradientAccumulation(n_step=4)])
    with pytest.raises(DivergenceError) as e:
        learn.fit(2)
    assert (e.value.epoch, e.value.batch, e.value.step) == (1, 5, 3)  # 2 steps per epoch: the 2nd of epoch 1
    assert learn.recorder.bs == [64, 64, 64] and len(learn.recorder.raw_losses) == 3


def test_accumulation_arguments():
    for bad in (0, -2, 1.5, True, None):
        with pytest.raises(ValueError, match='n_step must be a positive integer'):
            GradientAccumulation(n_step=bad)
    learn = Learner(make_data(), make_mlp(), callbacks=[GradientAccumulation(n_step=2)])
    with pytest.raises(ValueError, match='2 GradientAccumulation'):
        learn.fit(1, callbacks=[GradientAccumulation(n_step=3)])

    class NoLen:
        def __init__(self, dl):
            self.dl = dl

        def __iter__(self):
            return iter(self.dl)
    data = make_data()
    learn = Learner(DataBunch(NoLen(data.train_dl), data.valid_dl), make_mlp(),
                    callbacks=[GradientAccumulation(n_step=2)])
    with pytest.raises(Exception, match='needs a training DataLoader with a length'):
        learn.fit(1)
    n1 = Learner(make_data(), make_mlp(), callbacks=[GradientAccumulation(n_step=1)])  # n_step=1: plain steps
    n1.fit(1)
    assert n1.train_iter == 3


# ---- resume ----------------------------------------------------------------------------------------------------
def _resume_learner(path, ckpt_every=1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 8, generator=g)
    y = x[:, :3].argmax(1)
    data = DataBunch.from_tensors(x[:96], y[:96], x[96:], y[96:], bs=16)  # 6 batches: steps of 4 and 2 batches
    data.train_dl.after_batch = lambda b: (b[0] + 0.1 * torch.randn_like(b[0]), b[1])
    set_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    return Learner(data, model, path=path, metrics=[minifast.accuracy],
                   callbacks=[GradientAccumulation(n_step=4), Checkpoint(every=ckpt_every, keep_last=None)])


class Crash(Callback):
    def __init__(self, epoch, batch):
        self.at = (epoch, batch)

    def after_loss(self, learn):
        if learn.training and (learn.epoch, learn.iter) == self.at:
            raise RuntimeError('simulated crash')


class CtrlC(Callback):
    """A Ctrl-C arriving during a batch (as minifast defers it: a flag the loop reads at the batch's end)."""
    def __init__(self, epoch, batch):
        self.at = (epoch, batch)

    def before_batch(self, learn):
        if learn.training and (learn.epoch, learn.iter) == self.at:
            learn.ctrl_c.requested = True


def _resume_run(path, extra=(), resume=None):
    learn = _resume_learner(path)
    set_seed(1)
    learn.fit_one_cycle(3, 1e-2, clip=0.5, callbacks=list(extra), resume=resume)
    return learn


def _outcome(learn):
    r = learn.recorder
    return (learn.model.state_dict(), learn.opt.state_dict()['state'], r.group_lrs, r.raw_losses, r.bs, r.val_losses,
            r.nb_batches, learn.train_iter)


def _identical(a, b):
    (ma, oa, *ra), (mb, ob, *rb) = a, b
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i] if isinstance(oa[i][k], torch.Tensor))
    assert ra == rb


@pytest.fixture(scope='module')
def resume_reference(tmp_path_factory):
    path = tmp_path_factory.mktemp('ref')
    learn = _resume_run(path)
    names = [f.name.split('_', 2)[2] for f in list_checkpoints(path / 'checkpoints')]
    return _outcome(learn), names


def test_checkpoints_land_after_optimizer_steps(resume_reference):
    out, names = resume_reference
    # every=1 step: after each step, i.e. after batches 4 and 6 of each epoch (the last one rewritten as finished)
    assert names == [f'epoch{s // 2}_step{s + 1}.pth' for s in range(6)]
    assert out[-1] == 6 and out[-2] == [2, 2, 2]


@pytest.mark.parametrize('epoch,batch', [(0, 2), (1, 3), (1, 4), (2, 5)])
def test_crash_mid_group_then_resume_is_bit_identical(tmp_path, resume_reference, epoch, batch):
    with pytest.raises(RuntimeError, match='simulated crash'):
        _resume_run(tmp_path, [Crash(epoch, batch)])
    files = list_checkpoints(tmp_path / 'checkpoints')
    if not files:  # crashed inside the first step: resume starts over
        assert (epoch, batch) == (0, 2)
        with pytest.warns(UserWarning, match='no checkpoint'):
            _identical(resume_reference[0], _outcome(_resume_run(tmp_path, resume='checkpoints')))
        return
    pos = torch.load(files[-1], weights_only=True)['position']
    # only where a step ended: after batch 4 or 6 of an epoch, never inside a group
    want = {(1, 3): (0, 6, 2), (1, 4): (1, 4, 3), (2, 5): (2, 4, 5)}[epoch, batch]
    assert (pos['where'], pos['epoch'], pos['batch'], pos['train_iter']) == ('batch', *want)
    _identical(resume_reference[0], _outcome(_resume_run(tmp_path, resume='checkpoints')))


def test_ctrl_c_mid_group_waits_for_the_step_then_resumes_bit_identical(tmp_path, resume_reference):
    with pytest.raises(KeyboardInterrupt):
        _resume_run(tmp_path, [CtrlC(1, 1)])
    last = list_checkpoints(tmp_path / 'checkpoints')[-1]
    pos = torch.load(last, weights_only=True)['position']
    assert (pos['where'], pos['epoch'], pos['batch'], pos['train_iter']) == ('boundary', 1, 4, 3)
    _identical(resume_reference[0], _outcome(_resume_run(tmp_path, resume='checkpoints')))


def test_resume_refuses_another_accumulation(tmp_path):
    with pytest.raises(RuntimeError):
        _resume_run(tmp_path, [Crash(1, 2)])
    learn = _resume_learner(tmp_path)
    learn.callbacks[0].n_step = 3  # 6 batches: still 2 steps per epoch, but not the same steps
    with pytest.raises(ValueError, match='accumulating gradients over 4 batch'):
        learn.fit_one_cycle(3, 1e-2, clip=0.5, resume='checkpoints')


# ---- cancels and failures inside a group (review of issue 9) ------------------------------------------------------
class _GradLog(Callback):
    order = 100

    def before_fit(self, learn):
        self.seen = []

    def after_backward(self, learn):
        self.seen.append((learn.epoch, learn.iter, learn.model[0].weight.grad.clone(), float(learn.loss),
                          learn.stepper.step_bs))


class _CancelAt(Callback):
    def __init__(self, at, exc=minifast.CancelBatchException, event='after_loss'):
        self.at, self.exc = at, exc
        setattr(self, event, self._maybe)

    def _maybe(self, learn):
        if learn.training and (learn.epoch, learn.iter) in self.at:
            raise self.exc()


def _acc_log(*cbs, epochs=1):
    data = make_data(n_train=96, bs=16)  # 6 batches: groups (0, 1), (2, 3), (4, 5) with n_step=2
    learn = Learner(data, make_mlp(), silent=True, opt_func=SGD)
    log = _GradLog()
    torch.manual_seed(0)
    learn.fit(epochs, 0., callbacks=[GradientAccumulation(n_step=2), log, *cbs])  # lr 0: the weights never move
    return log.seen


def test_a_cancelled_stepping_batch_drops_its_groups_gradients():
    ref = {(e, i): g for e, i, g, _, _ in _acc_log()}
    seen = _acc_log(_CancelAt({(0, 1)}))  # the first group's stepping batch: no step, and batch 0's gradient is gone
    assert [(e, i) for e, i, *_ in seen] == [(0, 3), (0, 5)]
    for e, i, g, _, _ in seen:
        assert torch.equal(g, ref[(e, i)])


def test_a_group_whose_first_batch_is_cancelled_does_not_reuse_the_previous_groups_losses():
    class BatchLoss(Callback):
        def after_loss(self, learn):
            if learn.training:
                self.losses = {**getattr(self, 'losses', {}), learn.iter: float(learn.loss)}
    bl = BatchLoss()
    seen = _acc_log(_CancelAt({(0, 2)}, event='before_batch'), bl)  # the second group has only batch 3
    (_, _, _, loss3, bs3), = [s for s in seen if s[1] == 3]
    assert bs3 == 16 and loss3 == pytest.approx(bl.losses[3], abs=1e-7)


def test_cancel_train_inside_a_group_leaves_no_gradient_for_the_next_epoch():
    class Check(Callback):
        def before_epoch(self, learn):
            self.grads = getattr(self, 'grads', []) + [learn.model[0].weight.grad]
    check = Check()
    _acc_log(_CancelAt({(0, 2)}, minifast.CancelTrainException, event='after_batch'), check, epochs=2)
    assert check.grads == [None, None]


@pytest.mark.parametrize('exc', [minifast.CancelBatchException, minifast.CancelTrainException])
def test_fp16_clip_then_cancel_in_after_backward_does_not_apply_scaled_gradients(exc):
    class CancelAfterClip(Callback):
        order = 100  # after GradientClipping has unscaled

        def after_backward(self, learn):
            if learn.train_iter == 1 and learn.epoch == 0:
                raise exc()
    runs = []
    for extra in ([], [CancelAfterClip()]):
        learn = Learner(make_data(n_train=64, bs=16), make_mlp(), silent=True, opt_func=SGD, wd=0, fp16=True)
        before = [p.detach().clone() for p in learn.model.parameters()]
        torch.manual_seed(0)
        learn.fit(2, 1e-3, clip=1e6, callbacks=extra)
        runs.append(sum(float((p.detach() - b).abs().sum()) for p, b in zip(learn.model.parameters(), before)))
    assert runs[1] < 2 * runs[0]  # a few steps fewer; with the scaled gradients applied it was ~1e4 times larger


def test_fp16_clip_then_cancel_fit_leaves_the_scaler_ready_for_the_next_fit():
    class StopAfterClip(Callback):
        order = 100

        def after_backward(self, learn):
            raise minifast.CancelFitException()
    learn = Learner(make_data(n_train=64, bs=16), make_mlp(), silent=True, fp16=True)
    learn.fit(1, 1e-3, clip=1.0, callbacks=[StopAfterClip()])
    assert not learn.stepper.unscaled
    learn.fit(1, 1e-3, clip=1.0)  # unscale_ would raise if the scaler still had this optimizer unscaled
    assert learn.train_iter == 4


def test_clipping_covers_layers_unfrozen_during_the_fit():
    class Unfreeze(Callback):
        def before_epoch(self, learn):
            if learn.epoch == 1:
                learn.unfreeze()

    class Norm(Callback):
        order = 100

        def after_backward(self, learn):
            self.last = float(torch.norm(torch.stack([p.grad.norm() for p in learn.model.parameters()
                                                      if p.grad is not None])))
    data = make_data(n_train=64, bs=16)
    learn = Learner(data, make_mlp(), silent=True, splitter=lambda m: [m[0], m[2]])
    learn.freeze()
    norm = Norm()
    learn.fit(2, 1e-2, clip=0.01, callbacks=[Unfreeze(), norm])
    assert norm.last <= 0.01 + 1e-6


def test_validate_from_a_callback_keeps_the_fits_callbacks_for_checkpoints(tmp_path):
    class ValidateMidEpoch(Callback):
        def after_batch(self, learn):
            if learn.training and learn.iter == 1:
                learn.validate()
    learn = Learner(make_data(n_train=64), make_mlp(), silent=True, path=tmp_path)
    es = minifast.EarlyStopping(monitor='valid_loss', patience=5)
    learn.fit_one_cycle(2, 1e-2, callbacks=[es, ValidateMidEpoch(), Checkpoint(every=3)])
    state = torch.load(list_checkpoints(tmp_path / 'checkpoints')[0], weights_only=False)
    assert 'EarlyStopping' in state['callbacks'] and state['signature']['schedules']


def test_resume_with_a_callback_that_refuses_its_settings_leaves_the_model_as_it_was(tmp_path):
    class Crash(Callback):
        def before_epoch(self, learn):
            if learn.epoch == 1:
                raise RuntimeError('crash')
    learn = Learner(make_data(n_train=64), make_mlp(), silent=True, path=tmp_path)
    with pytest.raises(minifast.CallbackException, match='crash'):
        learn.fit(2, 1e-2, callbacks=[Checkpoint(every='epoch'), Crash()])
    other = Learner(make_data(n_train=64), make_mlp(seed=5), silent=True, path=tmp_path)
    other.create_opt()
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(minifast.CallbackException, match="monitor 'valid_los' is not recorded"):
        other.fit(2, 1e-2, callbacks=[Checkpoint(every='epoch'), minifast.EarlyStopping(monitor='valid_los')],
                  resume=tmp_path / 'checkpoints')
    assert all(torch.equal(v, other.model.state_dict()[k]) for k, v in before.items())

    def broken():
        raise RuntimeError('compile failed')
    other.setup_forward = broken  # a failure between loading the checkpoint and before_fit
    with pytest.raises(RuntimeError, match='compile failed'):
        other.fit(2, 1e-2, callbacks=[Checkpoint(every='epoch')], resume=tmp_path / 'checkpoints')
    assert all(torch.equal(v, other.model.state_dict()[k]) for k, v in before.items())
    assert len(other.opt.state) == 0


def test_a_group_with_a_cancelled_batch_steps_with_the_mean_of_the_others():
    data = make_data(n_train=96, bs=16)
    learn = Learner(data, make_mlp(), silent=True, opt_func=SGD)
    log = _GradLog()
    torch.manual_seed(0)
    learn.fit(1, 0., callbacks=[log])  # the same data order without accumulation: each batch's own gradient
    own = {i: g for _, i, g, _, _ in log.seen}
    seen = {i: g for _, i, g, _, _ in _acc_log(_CancelAt({(0, 2)}, event='before_batch'))}
    torch.testing.assert_close(seen[3], own[3], atol=1e-7, rtol=0)  # batch 3 alone, not half of it
    torch.testing.assert_close(seen[1], (own[0] + own[1]) / 2, atol=1e-7, rtol=0)


class ClipValue(Callback):
    """Clip every gradient element to [-value, value] before each step (README's example)."""

    def __init__(self, value):
        self.value = value

    def after_backward(self, learn):
        learn.stepper.unscale(learn.opt)  # fp16: true gradients (nothing to do in other precisions)
        torch.nn.utils.clip_grad_value_(learn.model.parameters(), self.value)

@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_a_user_clipping_callback_replaces_the_built_in_one_and_equals_a_hand_written_loop(precision):
    data, value = make_data(n_train=96), 1e-3  # below most gradient elements: every step is clipped
    learn = Learner(data, make_mlp(), opt_func=SGD, wd=0., fp16=precision == 'fp16')
    torch.manual_seed(3)
    learn.fit(2, 1e-1, callbacks=[ClipValue(value)])
    m = make_mlp()
    opt = torch.optim.SGD(m.parameters(), lr=1e-1, momentum=0.9)
    if precision == 'fp32':
        reference_fit(m, data, opt, 2, 3, before_step=lambda: torch.nn.utils.clip_grad_value_(m.parameters(), value))
    else:
        scaler = torch.amp.GradScaler('cpu')
        torch.manual_seed(3)
        for _ in range(2):
            for xb, yb in data.train_dl:
                with torch.autocast('cpu', dtype=torch.float16):
                    loss = F.cross_entropy(m(xb), yb)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_value_(m.parameters(), value)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
        assert learn.stepper.scaler.get_scale() == scaler.get_scale()
    for p, q in zip(_params(learn.model), _params(m)):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    unclipped = Learner(data, make_mlp(), opt_func=SGD, wd=0.)
    torch.manual_seed(3)
    unclipped.fit(2, 1e-1)
    assert max((p - q).abs().max().item() for p, q in zip(_params(unclipped.model), _params(m))) > 1e-4
