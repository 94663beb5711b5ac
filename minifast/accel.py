"""The GPU fast path's pieces: mixed precision (bf16 autocast; fp16 with a gradient scaler), torch.compile of the
forward, cudnn.benchmark for the length of a fit, channels_last and fused-optimizer choices.

Everything here is decided once per fit (or once per Learner), never per step.
"""
import contextlib
from functools import partial

import torch
from torch import nn

__all__ = ['autocast', 'all_finite', 'wants_channels_last', 'fused_option', 'cudnn_benchmark', 'compile_module']

_FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def autocast(learn):
    """The learner's mixed-precision context: torch.autocast in bfloat16 or float16, or disabled (full precision).
    (The training loop spells the same choice out inline, to keep its per-step cost down.)"""
    return torch.autocast(learn.device.type, dtype=torch.bfloat16 if learn.bf16 else torch.float16,
                          enabled=learn.bf16 or learn.fp16)


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
    cache = learn.__dict__.setdefault('_compiled', {})
    key = (id(module), tuple(sorted(opts.items(), key=lambda kv: kv[0])).__repr__())
    hit = cache.get(key)
    if hit is None or hit[0] is not module:
        hit = cache[key] = (module, torch.compile(module, **opts))
    return hit[1]
