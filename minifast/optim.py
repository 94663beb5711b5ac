"""Parameter groups, per-group learning rates and the weight-decay modes (true/decoupled vs L2)."""
from functools import partial

import numpy as np
import torch
from torch import nn

__all__ = ['AdamW', 'SGD', 'param_groups', 'lr_per_group', 'set_hyper', 'get_hyper', 'momentum_key',
           'WeightDecay', 'NO_WD_TYPES']

AdamW = partial(torch.optim.AdamW, betas=(0.9, 0.99))
AdamW.__doc__ = "torch.optim.AdamW with fastai v1's betas (0.9, 0.99); the default `opt_func`."
SGD = partial(torch.optim.SGD, momentum=0.9)
SGD.__doc__ = 'torch.optim.SGD with momentum 0.9.'

NO_WD_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _no_wd_params(module):
    """The ids of normalisation-layer parameters and of every bias: these skip weight decay when bn_wd=False."""
    ids = set()
    for m in module.modules():
        if isinstance(m, NO_WD_TYPES):
            ids.update(id(p) for p in m.parameters(recurse=False))
        elif isinstance(getattr(m, 'bias', None), nn.Parameter):
            ids.add(id(m.bias))
    return ids


def param_groups(layer_groups, bn_wd=True):
    """Optimizer parameter groups for `layer_groups` (a list of modules), split into decay/no-decay when not bn_wd.

    Each group carries `layer_group` (its index) and `decay` (False: weight decay is never applied to it).
    A parameter shared between layer groups goes to the first one that has it.
    """
    seen, groups = set(), []
    for i, lg in enumerate(layer_groups):
        params = [p for p in lg.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        no_wd = set() if bn_wd else _no_wd_params(lg)
        decay = [p for p in params if id(p) not in no_wd]
        keep = [p for p in params if id(p) in no_wd]
        for ps, d in ((decay, True), (keep, False)):
            if ps:
                groups.append({'params': ps, 'layer_group': i, 'decay': d})
    if not groups:
        raise ValueError('the model has no parameters to optimize')
    return groups


def lr_per_group(lr, n):
    """Expand `lr` to one value per layer group: a number, a sequence of n numbers, or fastai's slice(start, end)."""
    if isinstance(lr, slice):
        if lr.start is None:
            return [lr.stop / 10] * (n - 1) + [lr.stop]
        if n == 1:
            return [lr.stop]
        return list(np.geomspace(lr.start, lr.stop, n))
    if isinstance(lr, (list, tuple, np.ndarray)):
        if len(lr) != n:
            raise ValueError(f'lr has {len(lr)} values but the learner has {n} layer groups')
        return [float(v) for v in lr]
    return [float(lr)] * n


def momentum_key(opt):
    """'betas' for Adam-type optimizers, 'momentum' for SGD-type, None when the optimizer has neither."""
    d = opt.defaults
    return 'betas' if 'betas' in d else 'momentum' if 'momentum' in d else None


def get_hyper(opt, name):
    """The value of `name` ('lr', 'wd' or 'mom') in each parameter group."""
    if name == 'mom':
        key = momentum_key(opt)
        if key is None:
            return [None] * len(opt.param_groups)
        return [g[key][0] if key == 'betas' else g[key] for g in opt.param_groups]
    return [g[name] for g in opt.param_groups]


def set_hyper(opt, name, values):
    """Set `name` ('lr', 'wd' or 'mom') per layer group: `values` is a number or one value per layer group.

    Groups marked `decay=False` keep a weight decay of 0. For optimizers that apply decoupled decay natively
    (AdamW), the optimizer's own `weight_decay` is kept equal to our `wd`.
    """
    groups = opt.param_groups
    n = max(g['layer_group'] for g in groups) + 1
    vals = values if isinstance(values, (list, tuple, np.ndarray)) else [values] * n
    if len(vals) != n:
        raise ValueError(f'{name} has {len(vals)} values but the learner has {n} layer groups')
    key = momentum_key(opt) if name == 'mom' else name
    for g in groups:
        v = vals[g['layer_group']]
        if name == 'wd':
            g['wd'] = v if g['decay'] else 0.
            if g.get('_native_wd'):
                g['weight_decay'] = g['wd']
        elif name == 'mom':
            if key is None:
                raise ValueError(f'{type(opt).__name__} has no momentum to set')
            g[key] = (v, *g[key][1:]) if key == 'betas' else v
        else:
            g[key] = v


def _decouples_natively(opt):
    return isinstance(opt, torch.optim.AdamW) or bool(opt.defaults.get('decoupled_weight_decay', False))


class WeightDecay:
    """Applies weight decay around `opt.step()`: 'true' (decoupled, p -= lr*wd*p) or L2 (grad += wd*p).

    AdamW (and any optimizer with `decoupled_weight_decay=True`) already decays decoupled in its own kernel; with
    true_wd that native path is used and costs nothing extra. Otherwise the optimizer's own `weight_decay` is held
    at 0 and the decay is applied here with one foreach call per group.
    """

    def __init__(self, opt, true_wd=True):
        self.opt, self.true_wd = opt, true_wd
        self.native = true_wd and _decouples_natively(opt)
        for g in opt.param_groups:
            g['_native_wd'] = self.native
            g['weight_decay'] = g.get('wd', 0.) if self.native else 0.

    @torch.no_grad()
    def _decay(self):
        for g in self.opt.param_groups:
            wd = g['wd']
            if not wd:
                continue
            ps = [p for p in g['params'] if p.grad is not None]
            if not ps:
                continue
            if self.true_wd:
                torch._foreach_mul_(ps, 1. - g['lr'] * wd)
            else:
                torch._foreach_add_([p.grad for p in ps], ps, alpha=wd)

    def step(self):
        """Apply the decay (unless native), then step the optimizer."""
        if not self.native:
            self._decay()
        self.opt.step()
