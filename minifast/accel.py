"""The GPU fast path's pieces: mixed precision (bf16 autocast; fp16 with a gradient scaler), torch.compile of the
forward, cudnn.benchmark for the length of a fit, channels_last and fused-optimizer choices.

Everything here is decided once per fit (or once per Learner), never per step.
"""
import contextlib
from functools import partial

import torch
from torch import nn

from .checks import check_data
from .state import preserved

__all__ = ['autocast', 'all_finite', 'wants_channels_last', 'fused_option', 'cudnn_benchmark', 'compile_module',
           'sync_batchnorm', 'warmup', 'to_bf16', 'to_fp16', 'to_fp32']

_FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def autocast(learn):
    """The learner's mixed-precision context: torch.autocast in bfloat16 or float16, or disabled (full precision)."""
    return learn.stepper.autocast()


def all_finite(ts):
    """A boolean tensor on the tensors' device: whether every tensor in `ts` (a non-empty list on one device) is
    finite, from one foreach max-abs (nan/inf iff a tensor holds one); no host read."""
    return torch.isfinite(torch.stack(torch._foreach_norm(ts, float('inf')))).all()  # stack promotes dtypes


def wants_channels_last(model, device):
    """The `channels_last=None` default: on for a convolutional model on CUDA (tensor-core kernels want NHWC)."""
    return device.type == 'cuda' and any(isinstance(m, nn.Conv2d) for m in model.modules())


def fused_option(opt_func, params, device):
    """{'fused': True} when `opt_func` builds torch's Adam, AdamW or SGD, every parameter is a float tensor on CUDA
    and the caller chose neither `fused` nor `foreach`; {} otherwise (the optimizer's own default)."""
    asked, f = {}, opt_func
    while isinstance(f, partial):  # the keywords of (nested) partials, the outer ones winning
        asked, f = {**f.keywords, **asked}, f.func
    # torch's own classes only: a subclass may not take `fused` (its own __init__) or may step by its own math
    if device.type != 'cuda' or f not in _FUSABLE:
        return {}
    if 'fused' in asked or 'foreach' in asked or asked.get('differentiable'):
        return {}
    if not all(p.is_cuda and p.is_floating_point() for p in params):
        return {}
    return {'fused': True}


@contextlib.contextmanager
def cudnn_benchmark(learn):
    """cudnn.benchmark on for the fit (CUDA only, and not when the user asked for deterministic cuDNN), then back
    to what it was: the autotuning is a per-process setting, so the fit must not leave it changed."""
    cudnn = torch.backends.cudnn
    old, on = cudnn.benchmark, learn.cudnn_benchmark
    if on is None:
        on = old or (learn.device.type == 'cuda' and not cudnn.deterministic)
    cudnn.benchmark = bool(on)
    try:
        yield
    finally:
        cudnn.benchmark = old


def compile_options(compile):
    """Learner(compile=...) as torch.compile keyword arguments, or None when compiling is off."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, str):
        return {'mode': compile}
    if isinstance(compile, dict):
        return dict(compile)
    raise TypeError(f'Learner: compile must be False, True, a torch.compile mode name or a dict of torch.compile '
                    f'arguments, got {compile!r}')


def compile_module(learn, module):
    """torch.compile(module) with the learner's options, made once per module and kept on the learner; the
    compiled wrapper shares the module's parameters, so `learn.model` (and its state dict) stays the plain model."""
    opts = compile_options(learn.compile)
    if opts is None:
        return module
    cache = learn.compiled
    key = (id(module), tuple(sorted(opts.items(), key=lambda kv: kv[0])).__repr__())
    hit = cache.get(key)
    if hit is None or hit[0] is not module:
        hit = cache[key] = (module, torch.compile(module, **opts))
    return hit[1]


def to_bf16(learn):
    """Mixed precision with bfloat16: forward and loss under torch.autocast (matrix products and convolutions in
    bf16, BatchNorm and the weights in fp32); no loss scaling is needed. Returns the learner."""
    learn.stepper.set_precision('bf16')
    return learn


def to_fp16(learn, init_scale=2. ** 16, growth_interval=2000):
    """Mixed precision with float16: autocast plus a dynamic loss scale (torch.amp.GradScaler); steps whose
    gradients overflow are skipped and the scale lowered. Gradients seen in `after_backward` are scaled.
    Returns the learner."""
    learn.stepper.set_precision('fp16', init_scale, growth_interval)
    return learn


def to_fp32(learn):
    """Back to full precision. Returns the learner."""
    learn.stepper.set_precision('fp32')
    return learn


def sync_batchnorm(model, device):
    """`model` with SyncBatchNorm layers (distributed training on CUDA)."""
    if device.type != 'cuda':
        raise ValueError(f'Learner(sync_bn=True): SyncBatchNorm works on CUDA devices only, and this process '
                         f'trains on {device}; leave sync_bn off (each rank then normalises with its own '
                         f'batch statistics)')
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def warmup(learn):
    """Run one training forward and backward and the validation forwards (a full batch, and the last partial
    batch's size) outside any fit, then put everything back: weights, gradients, BatchNorm statistics, RNG
    states and train/eval mode. With `compile`, this is where torch.compile compiles (minutes for a deep
    model); on CUDA it also autotunes cuDNN. Call it before timing epochs. Returns the learner."""
    check_data(learn.data)
    model = learn.model

    def forward(m, xb, yb):
        with learn.stepper.autocast():
            return learn.loss_func(m(*xb), yb)
    try:
        with preserved(learn, parts=('buffers', 'grads', 'modes', 'rng')), cudnn_benchmark(learn):
            for p in model.parameters():  # the warm-up backward writes fresh gradients; the ones there are put back
                p.grad = None
            learn.fwd = learn.dist.setup(learn)  # under torchrun the fit compiles the DDP wrapper: warm that one
            learn.setup_forward()
            xb, yb = learn.prepare_batch(next(iter(learn.data.train_dl)))
            model.train()
            forward(model if learn.fwd is None else learn.fwd, xb, yb).backward()
            valid = learn.data.valid_dl
            if valid is not None:
                model.eval()
                xb, yb = learn.prepare_batch(next(iter(valid)))
                n, bs = len(getattr(valid, 'dataset', ())), len(yb)
                sizes = [bs] + ([n % bs] if n and n % bs and n > bs else [])
                with torch.no_grad():
                    for k in sizes:
                        forward(model if learn.fwd_eval is None else learn.fwd_eval, tuple(x[:k] for x in xb), yb[:k])
            if learn.device.type == 'cuda':
                torch.cuda.synchronize(learn.device)
    finally:
        learn.fwd = learn.fwd_eval = None
    return learn
