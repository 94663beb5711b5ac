"""The GPU fast path's CPU side: mixed precision (bf16 autocast, fp16 with a gradient scaler), torch.compile,
warm-up, fused optimizers, cudnn.benchmark for the length of a fit, channels_last and device-resident data choices."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minifast import Callback, accuracy
from minifast import Learner as _Learner
from minifast.accel import fused_option, wants_channels_last
from minifast.data import ImageDataBunch
from minifast.determinism import rng_state
from minifast.optim import AdamW, SGD
from conftest import make_data, make_mlp

Learner = partial(_Learner, device='cpu')  # the CPU side, also where a GPU is present


def _loop(model, data, opt, epochs, seed, dtype=None, scaler=None):
    """Hand-written reference: autocast forward and loss, optional GradScaler."""
    torch.manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for xb, yb in data.train_dl:
            with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = F.cross_entropy(model(xb), yb)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()


@pytest.mark.parametrize('flag', ['bf16', 'fp16'])
def test_mixed_precision_on_cpu_equals_hand_written_autocast_loop(flag):
    data = make_data(n_train=96)
    dtype = torch.bfloat16 if flag == 'bf16' else torch.float16
    m1, m2 = make_mlp(), make_mlp()
    learn = Learner(data, m1, silent=True, wd=0.1, **{flag: True})
    torch.manual_seed(3)
    learn.fit(2, 1e-2)
    opt = torch.optim.AdamW(m2.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    scaler = torch.amp.GradScaler('cpu') if flag == 'fp16' else None
    _loop(m2, data, opt, 2, 3, dtype, scaler)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert p.dtype == torch.float32  # master weights stay fp32
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    if flag == 'fp16':
        assert learn.stepper.scaler.get_scale() == scaler.get_scale()


def test_bf16_losses_track_fp32():
    data = make_data(n_train=256, n_valid=64)
    runs = {}
    for bf16 in (False, True):
        learn = Learner(data, make_mlp(), silent=True, bf16=bf16, metrics=[accuracy])
        torch.manual_seed(0)
        learn.fit(2, 1e-2)
        runs[bf16] = learn.recorder
    assert runs[True].train_losses != runs[False].train_losses  # bf16 really ran
    for a, b in zip(runs[True].val_losses, runs[False].val_losses):
        assert abs(a - b) < 3e-2


def test_precision_switches():
    learn = Learner(make_data(), make_mlp(), silent=True)
    assert not learn.bf16 and not learn.fp16 and learn.stepper.scaler is None
    assert learn.to_fp16() is learn and learn.fp16 and not learn.bf16 and learn.stepper.scaler is not None
    assert learn.to_bf16() is learn and learn.bf16 and not learn.fp16 and learn.stepper.scaler is None
    assert learn.to_fp32() is learn and not learn.bf16 and not learn.fp16
    with pytest.raises(ValueError, match='bf16=True or fp16=True, not both'):
        Learner(make_data(), make_mlp(), bf16=True, fp16=True)


def test_fp16_skips_an_overflowing_step_and_lowers_the_scale():
    data = make_data(n_train=32, bs=16)
    learn = Learner(data, make_mlp(), silent=True, fp16=True)
    learn.to_fp16(init_scale=2. ** 120)  # scaled fp32 grads overflow to inf: the scaler must skip, not apply
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1, 1e-2, wd=0)
    assert learn.stepper.scaler.get_scale() < 2. ** 120
    changed = [not torch.equal(a, p) for a, p in zip(before, learn.model.parameters())]
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert not any(changed) or learn.stepper.scaler.get_scale() < 2. ** 119  # a step only once the scale came down


def test_compile_aot_eager_matches_eager_and_keeps_the_plain_model():
    data = make_data(n_train=96, n_valid=32)
    m1, m2 = make_mlp(), make_mlp()
    eager = Learner(data, m1, silent=True, metrics=[accuracy])
    comp = Learner(data, m2, silent=True, metrics=[accuracy], compile={'backend': 'aot_eager'})
    seen = []

    class Spy(Callback):
        def after_pred(self, learn):
            seen.append(learn.fwd if learn.training else learn.fwd_eval)

    for learn in (eager, comp):
        torch.manual_seed(5)
        learn.fit(2, 1e-2, callbacks=[Spy()])
    assert all(m is None for m in seen[:len(seen) // 2])
    assert all(m is not None and m is not comp.model for m in seen[len(seen) // 2:])
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    for a, b in zip(eager.recorder.val_losses, comp.recorder.val_losses):
        assert abs(a - b) < 1e-6
    assert comp.model is m2 and not any('_orig_mod' in k for k in comp.model.state_dict())
    assert comp.fwd is None and comp.fwd_eval is None  # only during a fit
    assert len(comp.compiled) == 1  # one compiled wrapper, reused by the second fit


def test_compile_argument_is_checked():
    with pytest.raises(TypeError, match='compile must be False, True'):
        Learner(make_data(), make_mlp(), compile=3)


def test_warmup_changes_nothing():
    data = make_data(n_train=64, n_valid=20, bs=16)  # 20 % 16: a partial validation batch
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    learn = Learner(data, model, silent=True, compile={'backend': 'aot_eager'})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(11)
    rng = rng_state()
    model[1].eval()  # a frozen BatchNorm in a model in train mode
    model[0].weight.grad = torch.ones_like(model[0].weight)  # gradients already there stay as they were
    assert learn.warmup() is learn
    assert model.training and not model[1].training
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    model[0].weight.grad = None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # weights and BN statistics
    assert all(p.grad is None for p in model.parameters())
    now = rng_state()
    assert torch.equal(now['torch'], rng['torch'])
    assert len(learn.compiled) == 1 and learn.fwd is None


def test_warmup_then_fit_equals_fit():
    data = make_data(n_train=64, n_valid=20)
    a, b = Learner(data, make_mlp(), silent=True), Learner(data, make_mlp(), silent=True)
    torch.manual_seed(2)
    a.fit(1, 1e-2)
    torch.manual_seed(2)
    b.warmup().fit(1, 1e-2)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_fused_adamw_with_one_cycle_equals_the_default_kernel():
    data = make_data(n_train=96)
    runs = []
    for opt_func in (AdamW, partial(AdamW, fused=True)):
        learn = Learner(data, make_mlp(), silent=True, opt_func=opt_func, wd=0.1)
        torch.manual_seed(4)
        learn.fit_one_cycle(2, 1e-2)
        runs.append(learn)
    assert runs[1].opt.defaults['fused']
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_fused_option_choice():
    cpu, cuda = torch.device('cpu'), torch.device('cuda', 0)
    ps = [nn.Parameter(torch.zeros(2))]
    assert fused_option(AdamW, ps, cpu) == {}  # CPU keeps torch's default
    assert fused_option(AdamW, ps, cuda) == {}  # a CPU parameter: not fusable
    if torch.cuda.is_available():
        g = [nn.Parameter(torch.zeros(2, device='cuda'))]
        assert fused_option(AdamW, g, cuda) == {'fused': True}
        assert fused_option(SGD, g, cuda) == {'fused': True}
        assert fused_option(partial(AdamW, foreach=True), g, cuda) == {}
        assert fused_option(partial(AdamW, fused=False), g, cuda) == {}
        assert fused_option(torch.optim.RMSprop, g, cuda) == {}
        assert fused_option(lambda ps, lr: torch.optim.AdamW(ps, lr), g, cuda) == {}


def test_fused_option_leaves_subclasses_alone():
    """fused=True goes to torch's own Adam, AdamW and SGD only: a subclass may not take it (its own __init__), which
    made create_opt fail on CUDA alone. Checked on CPU with a CUDA-looking device and parameter (only .type,
    .is_cuda and .is_floating_point() are read)."""
    from types import SimpleNamespace
    cuda, p = SimpleNamespace(type='cuda'), SimpleNamespace(is_cuda=True, is_floating_point=lambda: True)

    class MyAdam(torch.optim.Adam):
        def __init__(self, params, lr=1e-3):
            super().__init__(params, lr=lr)

    assert fused_option(AdamW, [p], cuda) == fused_option(SGD, [p], cuda) == {'fused': True}
    assert fused_option(torch.optim.Adam, [p], cuda) == {'fused': True}
    assert fused_option(MyAdam, [p], cuda) == fused_option(partial(MyAdam, lr=1e-2), [p], cuda) == {}
    assert fused_option(partial(AdamW, fused=False), [p], cuda) == {}


def test_cudnn_benchmark_is_on_only_during_fit():
    flags = []

    class Spy(Callback):
        def before_batch(self, learn):
            flags.append(torch.backends.cudnn.benchmark)

    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        learn = Learner(make_data(), make_mlp(), silent=True, cudnn_benchmark=True)
        learn.fit(1, callbacks=[Spy()])
        assert flags and all(flags)
        assert torch.backends.cudnn.benchmark is False
        flags.clear()
        Learner(make_data(), make_mlp(), silent=True).fit(1, callbacks=[Spy()])  # auto: CPU leaves it off
        assert flags and not any(flags)
    finally:
        torch.backends.cudnn.benchmark = old


def test_channels_last_default():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    assert wants_channels_last(conv, torch.device('cuda', 0))
    assert not wants_channels_last(conv, torch.device('cpu'))
    assert not wants_channels_last(make_mlp(), torch.device('cuda', 0))
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    data = ImageDataBunch.from_tensors(x, torch.arange(32) % 2, x[:8], torch.arange(8) % 2, bs=8, device='cpu')
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert Learner(data, model, silent=True).channels_last is False  # CPU default
    assert Learner(data, model, silent=True, channels_last=True).channels_last is True


def test_device_data_choice():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(16) % 2
    data = ImageDataBunch.from_tensors(x, y, x[:4], y[:4], bs=4, device='cpu')  # 'auto' on CPU
    assert data.train_ds.x.device.type == 'cpu'
    with pytest.raises(ValueError, match="device_data must be True, False or 'auto', got 'yes'"):
        ImageDataBunch.from_tensors(x, y, x[:4], y[:4], bs=4, device='cpu', device_data='yes')
    if torch.cuda.is_available():
        on = ImageDataBunch.from_tensors(x, y, x[:4], y[:4], bs=4, device='cuda')
        assert on.train_ds.x.is_cuda and on.valid_ds.y.is_cuda
        off = ImageDataBunch.from_tensors(x, y, x[:4], y[:4], bs=4, device='cuda', device_data=False)
        assert not off.train_ds.x.is_cuda and next(iter(off.train_dl))[0].is_cuda


@pytest.mark.slow
def test_compile_inductor_matches_eager():  # the first inductor compile takes ~20 s on 2 CPU cores
    data = make_data(n_train=96, n_valid=32)
    m1, m2 = make_mlp(), make_mlp()
    for m, c in ((m1, False), (m2, True)):
        learn = Learner(data, m, silent=True, compile=c)
        torch.manual_seed(5)
        learn.fit(1, 1e-2)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_fp16_resume_restores_the_loss_scale(tmp_path):
    from minifast import Checkpoint

    class Crash(Callback):
        def after_step(self, learn):
            if learn.train_iter == 7:
                raise RuntimeError('simulated crash')

    def run(path, *extra, resume=None):
        learn = Learner(make_data(n_train=96), make_mlp(), silent=True, path=path, fp16=True)
        learn.to_fp16(init_scale=2. ** 10, growth_interval=3)  # the scale grows during the run: it must be restored
        torch.manual_seed(1)
        learn.fit_one_cycle(3, 1e-2, callbacks=[Checkpoint(every=4), *extra], resume=resume)
        return learn
    ref = run(tmp_path / 'ref')
    with pytest.raises(Exception, match='simulated crash'):
        run(tmp_path / 'b', Crash())
    b = run(tmp_path / 'b', resume=True)
    assert ref.stepper.scaler.get_scale() == b.stepper.scaler.get_scale() > 2. ** 10
    assert ref.recorder.raw_losses == b.recorder.raw_losses
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in ref.model.state_dict().items())


def test_fp16_skipped_steps_do_not_decay_the_weights():
    """SGD with true_wd decays by hand; a step the scaler skips (overflow) must not shrink the weights either."""
    learn = Learner(make_data(n_train=64, bs=16), make_mlp(), silent=True, opt_func=SGD, wd=0.5)
    learn.to_fp16(init_scale=2. ** 125)  # scaled losses overflow fp32: every step of the epoch is skipped
    learn.create_opt()
    assert not learn.stepper.decay.native
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1, 0.1)
    assert learn.stepper.scaler.get_scale() < 2. ** 125
    assert all(torch.equal(a, p) for a, p in zip(before, learn.model.parameters()))
    learn.to_fp16()  # a normal scale: steps happen and the weights decay
    learn.fit(1, 0.1)
    assert not all(torch.equal(a, p) for a, p in zip(before, learn.model.parameters()))


def test_lr_find_leaves_the_loss_scale_as_it_was():
    learn = Learner(make_data(n_train=128), make_mlp(), silent=True, fp16=True)
    learn.fit(1, 1e-2)
    before = learn.stepper.scaler.state_dict()
    learn.lr_find(num_it=20, end_lr=1e8)  # the sweep overflows and lowers the scale
    assert learn.stepper.scaler.state_dict() == before


def test_get_preds_runs_like_validation_under_bf16():
    data = make_data(n_train=64, n_valid=40)
    learn = Learner(data, make_mlp(), silent=True, bf16=True)
    learn.fit(1, 1e-2)
    probs, targs = learn.get_preds()
    nll = float(F.nll_loss(probs.log(), targs))
    with torch.no_grad():
        fp32 = float(F.cross_entropy(learn.model(data.valid_dl.tensors[0]), data.valid_dl.tensors[1]))
    assert abs(nll - learn.validate()[0]) < 1e-4 < abs(fp32 - learn.validate()[0])


@pytest.mark.parametrize('flag', ['bf16', 'fp16'])
def test_predict_runs_under_the_same_autocast_as_get_preds(flag):
    data = make_data(n_train=64, n_valid=40)
    learn = Learner(data, make_mlp(), silent=True, **{flag: True})
    learn.fit(1, 1e-2)
    probs, _ = learn.get_preds()
    for i in range(3):
        assert torch.equal(learn.predict(data.valid_dl.tensors[0][i])[2], probs[i])
