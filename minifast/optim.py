"""Parameter groups: layer groups, slice() and layer-decay LRs, freezing, per-module settings, weight-decay modes."""
import difflib
import inspect
import operator
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from functools import partial

import numpy as np
import torch
from torch import nn

from .accel import fused_option
from .checks import LAYER_DECAY_RULES, check_wd, int_value, real_value

__all__ = ['AdamW', 'SGD', 'param_groups', 'lr_per_group', 'set_hyper', 'get_hyper', 'momentum_key',
           'WeightDecay', 'NO_WD_TYPES', 'LayerGroup', 'split_model', 'split_by_idx', 'module_groups', 'split',
           'check_layer_groups', 'layer_decay_lrs', 'LAYER_DECAY_RULES', 'group_lrs', 'create_opt', 'freeze_to',
           'freeze', 'unfreeze', 'set_training_mode', 'TRAINING_MODES', 'param_summary', 'ParamSummary', 'opt_settings',
           'lacking_settings', 'decay_acts', 'least_acting_wd', 'inert_decay', 'param_name_groups']

AdamW = partial(torch.optim.AdamW, betas=(0.9, 0.99))
AdamW.__doc__ = "torch.optim.AdamW with fastai v1's betas (0.9, 0.99); the default `opt_func`."
SGD = partial(torch.optim.SGD, momentum=0.9)
SGD.__doc__ = 'torch.optim.SGD with momentum 0.9.'

NO_WD_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
               *((nn.RMSNorm,) if hasattr(nn, 'RMSNorm') else ()))  # torch >= 2.4; a norm layer like LayerNorm


def _norm_params(module):
    """The ids of the parameters of normalisation layers (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm)."""
    return {id(p) for m in module.modules() if isinstance(m, NO_WD_TYPES) for p in m.parameters(recurse=False)}


def _no_wd_params(module):
    """The ids of normalisation-layer parameters and of every bias: these skip weight decay when bn_wd=False."""
    biases = {id(m.bias) for m in module.modules()
              if not isinstance(m, NO_WD_TYPES) and isinstance(getattr(m, 'bias', None), nn.Parameter)}
    return _norm_params(module) | biases


def param_groups(layer_groups, bn_wd=True, head_wd=None):
    """Optimizer parameter groups for `layer_groups` (a list of modules), split into decay/no-decay when not bn_wd.

    Each group carries `layer_group` (its index) and `decay` (False: weight decay is never applied to it).
    A parameter shared between layer groups goes to the first one that has it. The settings of a `LayerGroup`
    go into its groups: 'fixed' {lr/wd/mom: value}, 'mult' {lr/wd: factor} (both honoured by `set_hyper`), and any
    other optimizer option (e.g. eps) as is. `head_wd` (None: as the learner's wd) fixes the weight decay of the
    last layer group, the head (seed 000: head_wd=0, the head is not decayed).
    """
    seen, groups, last = set(), [], len(layer_groups) - 1
    for i, lg in enumerate(layer_groups):
        params = [p for p in lg.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        no_wd = set() if bn_wd else _no_wd_params(lg)
        decay = [p for p in params if id(p) not in no_wd]
        keep = [p for p in params if id(p) in no_wd]
        extra = _group_settings(lg.settings) if isinstance(lg, LayerGroup) else {}
        if head_wd is not None and i == last:
            extra = _with_head_wd(extra, head_wd, lg)
        for ps, d in ((decay, True), (keep, False)):
            if ps:
                groups.append({'params': ps, 'layer_group': i, 'decay': d, **extra})
    if not groups:
        raise ValueError('the model has no parameters to optimize')
    return groups


def _with_head_wd(extra, head_wd, lg):
    """The head's param-group settings with its weight decay fixed at `head_wd` (ValueError when its LayerGroup
    already sets wd or wd_mult: two answers for one number)."""
    if 'wd' in extra.get('fixed', {}) or 'wd' in extra.get('mult', {}):
        raise ValueError(f'head_wd={head_wd}: the head\'s layer group {getattr(lg, "name", None)!r} already sets its '
                         f'weight decay (wd or wd_mult); give one of them')
    return {**extra, 'fixed': {**extra.get('fixed', {}), 'wd': float(head_wd)}}


def _rate(v, name):
    """`v` as a float when it is a finite number >= 0 (a learning rate, or another per-group value), else ValueError;
    anything float() takes counts (a 0-d tensor or array too)."""
    return real_value(v, name, None, low=0, coerce=True,
                      message=f'{name} must be a finite number >= 0 (or one per layer group, or a slice), got {v!r}')


def lr_per_group(lr, n, name='lr'):
    """Expand `lr` to one value per layer group: a number, a sequence of n numbers, or fastai's slice(start, end).
    Every value must be a finite number >= 0 (`name` is the argument's name in the error)."""
    if isinstance(lr, slice):
        if not all(v is None or (isinstance(v, (int, float)) and v > 0) for v in (lr.start, lr.stop)) \
                or lr.stop is None or lr.step is not None:  # geometric spacing needs positive ends
            raise ValueError(f'lr={lr}: a slice of learning rates is slice(end) or slice(start, end) with positive '
                             f'numbers (end: the last layer group; start: the first, the groups between spaced '
                             f'geometrically)')
        if lr.start is None:
            return [lr.stop / 10] * (n - 1) + [lr.stop]
        if n == 1:
            return [lr.stop]
        return [float(x) for x in np.geomspace(lr.start, lr.stop, n)]  # plain floats: a checkpoint holds them
    if isinstance(lr, (list, tuple, np.ndarray)):
        if len(lr) != n:
            raise ValueError(f'lr has {len(lr)} values but the learner has {n} layer groups')
        return [_rate(v, name) for v in lr]
    return [_rate(lr, name)] * n


def _group_value(g, name, v):
    """The value `name` takes in param group `g` when the learner sets `v`: a fixed setting wins, else v * mult."""
    fixed = g.get('fixed')
    if fixed and name in fixed:
        return fixed[name]
    mult = g.get('mult')
    return v * mult[name] if mult and name in mult else v


def momentum_key(opt):
    """'betas' for Adam-type optimizers, 'momentum' for SGD-type, None when the optimizer has neither."""
    d = opt.defaults
    return 'betas' if 'betas' in d else 'momentum' if 'momentum' in d else None


def _set_mom(g, key, v):
    """Momentum into a parameter group: beta1 of 'betas' (Adam-type) or 'momentum' (SGD-type)."""
    g[key] = (v, *g[key][1:]) if key == 'betas' else v


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
    Groups with per-module settings (see `module_groups`) hold a 'fixed' value or scale the given one by 'mult'.
    """
    groups = opt.param_groups
    n = max(g['layer_group'] for g in groups) + 1
    vals = values if isinstance(values, (list, tuple, np.ndarray)) else [values] * n
    if len(vals) != n:
        raise ValueError(f'{name} has {len(vals)} values but the learner has {n} layer groups')
    key = momentum_key(opt) if name == 'mom' else name
    for g in groups:
        v = _group_value(g, name, vals[g['layer_group']])
        if name == 'wd':
            g['wd'] = v if g['decay'] else 0.
            if g.get('_native_wd'):
                g['weight_decay'] = g['wd']
        elif name == 'mom':
            if key is None:
                raise ValueError(f'{type(opt).__name__} has no momentum to set')
            _set_mom(g, key, v)
        else:
            g[key] = v


# defaults that are not settings of the training: the per-fit lr and wd (minifast sets them) and how torch computes
# the step (fused is chosen by the device), which do not change what a resumed fit continues
_NOT_SETTINGS = ('lr', 'weight_decay', 'foreach', 'fused', 'capturable', 'differentiable')


def _plain_value(v):
    """`v` as a value torch's weights-only loader reads and == compares: numbers, strings, tuples of them; a
    one-element tensor as its number; a function as its name; anything else as its repr (its type's name when the
    repr holds an address)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        return tuple(_plain_value(x) for x in v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if callable(v):  # its name: a repr would hold its address, different in every process
        return f"{getattr(v, '__module__', None)}.{getattr(v, '__qualname__', type(v).__qualname__)}"
    r = repr(v)
    return type(v).__qualname__ if ' at 0x' in r else r


def lacking_settings(opt):
    """The settings of `opt.defaults` that some param group lacks, sorted: after `opt.load_state_dict`, another
    kind of optimizer's state (torch checks only the groups' sizes; settings newer torch versions added are filled
    in by the optimizer's own loading, so only another kind of optimizer lacks any)."""
    return sorted({k for g in opt.param_groups for k in opt.defaults if k not in g})


def opt_settings(opt):
    """The optimizer's class and construction settings (its `defaults` less lr, weight decay and torch's
    implementation choices), as plain values: what a fit resumed into this optimizer must share."""
    cls = type(opt)
    return {'class': f'{cls.__module__}.{cls.__qualname__}',
            'settings': {k: _plain_value(v) for k, v in opt.defaults.items() if k not in _NOT_SETTINGS}}


def _decouples_natively(opt):
    return isinstance(opt, torch.optim.AdamW) or bool(opt.defaults.get('decoupled_weight_decay', False))


def _tiny(dtype=torch.float32):
    """The largest lr*wd whose decoupled factor 1 - lr*wd rounds to exactly 1 in `dtype`: half the spacing of the
    numbers just below 1 (2**-25 ~ 2.98e-8 in float32; the factor is cast to the weights' type before multiplying)."""
    return torch.finfo(dtype).eps / 4


def decay_acts(lr, wd, dtype=torch.float32):
    """Whether decoupled weight decay (w *= 1 - lr*wd) changes `dtype` weights at `lr` (a number or an array of
    per-step lrs; an array of booleans then): False when 1 - lr*wd rounds to exactly 1, i.e. lr*wd <= 2**-25 in
    float32. Above that the factor is rounded to a multiple of 2**-24, so lr*wd below ~1e-6 is applied coarsely."""
    lr = np.asarray(lr, dtype=float)
    if dtype == torch.float32:  # exactly as torch casts the factor (a Python float) to the weights' type
        return np.float32(1. - lr * wd) < 1
    return lr * wd > _tiny(dtype)


def least_acting_wd(lr, dtype=torch.float32):
    """The weight decay at or below which decoupled decay cannot change `dtype` weights at learning rate `lr`:
    2**-25 / lr in float32 (wd must exceed it)."""
    return _tiny(dtype) / lr


def inert_decay(opt, peak_lrs=None, true_wd=True):
    """A sentence naming wd, the peak lr and the factor when decoupled weight decay can never change the weights of
    a decaying parameter group of `opt`, else None. `peak_lrs`: the highest lr of the fit per layer group (as a
    schedule gives it; a group's fixed lr or lr_mult applies on top), or None for the groups' current lr. It cannot
    when peak lr * wd <= 2**-25 (float32): 1 - lr*wd rounds to 1.0 and every step multiplies by exactly 1. L2 decay
    (true_wd=False) adds wd*w to the gradient instead, which lr does not shrink: not checked."""
    if not true_wd:
        return None
    bad = []
    for i, g in enumerate(opt.param_groups):
        wd, ps = g.get('wd', 0.), g['params']
        lr = g['lr'] if peak_lrs is None else _group_value(g, 'lr', peak_lrs[g['layer_group']])
        if not wd or not ps or not lr > 0:
            continue
        dtype = ps[0].dtype if ps[0].is_floating_point() else torch.float32
        if not decay_acts(lr, wd, dtype):
            bad.append((i, lr, wd, dtype))
    if not bad:
        return None
    i, lr, wd, dtype = bad[0]
    where = f'parameter group(s) {[b[0] for b in bad]}' if len(opt.param_groups) > 1 else 'the weights'
    tiny, kind = _tiny(dtype), str(dtype).replace('torch.', '')
    return (f'weight decay wd={wd:g} cannot change {where}: at the peak lr {lr:.3g} the decoupled factor '
            f'1 - lr*wd = 1 - {lr * wd:.3g} rounds to exactly 1.0 in {kind} (lr*wd must exceed {tiny:.3g}), so this '
            f'fit trains exactly as with wd=0. Use wd > {least_acting_wd(lr, dtype):.2g} (applied in steps of '
            f'{2 * tiny:.2g} per step, so coarsely below ~30x that), or wd=0')


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
    def decay(self, keep=None):
        """`keep`: None, or a boolean device tensor; where False the decoupled decay is not applied (a step that
        a gradient scaler skips), decided on the device without a host read."""
        for g in self.opt.param_groups:
            wd = g['wd']
            if not wd:
                continue
            ps = [p for p in g['params'] if p.grad is not None]
            if not ps:
                continue
            if self.true_wd:
                f = 1. - g['lr'] * wd
                torch._foreach_mul_(ps, f if keep is None else torch.where(keep, f, 1.).to(ps[0].dtype))
            else:
                torch._foreach_add_([p.grad for p in ps], ps, alpha=wd)

    def step(self):
        """Apply the decay (unless native), then step the optimizer."""
        if not self.native:
            self.decay()
        self.opt.step()


# ---- layer groups --------------------------------------------------------------------------------------------
_FIXED = ('lr', 'wd', 'mom')
_MULTS = {'lr_mult': 'lr', 'wd_mult': 'wd'}
# Optimizer options that minifast sets from its own names (set_hyper, WeightDecay); a setting must use those names.
_OURS = {'weight_decay': 'wd', 'betas': 'mom', 'momentum': 'mom'}
_RESERVED = ('params', 'layer_group', 'decay', 'fixed', 'mult', '_native_wd')


def _check_settings(settings, where):
    for k, v in settings.items():
        if k in _OURS:
            raise ValueError(f"{where}: use '{_OURS[k]}' rather than the optimizer's '{k}' (minifast sets '{k}' "
                             f"from '{_OURS[k]}' on every fit and schedule step)")
        if k in _RESERVED:
            raise ValueError(f"{where}: '{k}' is not a setting")
        if (k in _FIXED or k in _MULTS) and not (isinstance(v, (int, float)) and v >= 0):
            raise ValueError(f'{where}: {k} must be a number >= 0, got {v!r}')
    for fixed, mult in (('lr', 'lr_mult'), ('wd', 'wd_mult')):
        if fixed in settings and mult in settings:
            raise ValueError(f'{where}: give {fixed} (a fixed value) or {mult} (a factor on the learner\'s {fixed}), '
                             f'not both')
    return dict(settings)


def _group_settings(settings):
    """A LayerGroup's settings as param-group entries: 'fixed' and 'mult' dicts, other optimizer options as is."""
    out = {k: v for k, v in settings.items() if k not in _FIXED and k not in _MULTS}
    fixed = {k: settings[k] for k in _FIXED if k in settings}
    mult = {name: settings[k] for k, name in _MULTS.items() if k in settings}
    if fixed:
        out['fixed'] = fixed
    if mult:
        out['mult'] = mult
    return out


class LayerGroup(nn.Module):
    """Several of the model's modules trained as one layer group, with optional settings (see `module_groups`).

    It only refers to the model's modules (it is not part of the model and is never called); settings are lr, wd,
    mom (fixed values), lr_mult, wd_mult (factors), or another option of the optimizer such as eps.
    """

    def __init__(self, modules=(), name=None, **settings):
        super().__init__()
        modules = list(modules)
        for m in modules:
            if not isinstance(m, nn.Module):
                raise TypeError(f'layer group {name or ""}: expected modules, got a {type(m).__name__} (a layer group '
                                f'is a module or a list of modules)')
        self.members = nn.ModuleList(modules)
        self.name = name
        self.settings = _check_settings(settings, f'layer group {name!r}' if name else 'LayerGroup')

    def extra_repr(self):
        items = ([f'name={self.name!r}'] if self.name else []) + [f'{k}={v!r}' for k, v in self.settings.items()]
        return ', '.join(items)


class _DirectParams(nn.Module):
    """The parameters a module holds itself, not through children (e.g. a ViT's pos_embed), under their own names
    (so a direct `bias` is still recognised by bn_wd=False)."""

    def __init__(self, owner, owner_name, names=None):
        super().__init__()
        for n, p in owner.named_parameters(recurse=False):
            if names is None or n in names:
                self.register_parameter(n, p)
        self.owner_name = owner_name


def check_layer_groups(model, layer_groups):
    """Raise if a layer group has no parameters, or a parameter of `model` is in no layer group (never trained)."""
    layer_groups = list(layer_groups)
    if not layer_groups:
        raise ValueError('there are no layer groups: give at least one module')
    covered = set()
    for i, lg in enumerate(layer_groups):
        if not isinstance(lg, nn.Module):
            raise TypeError(f'layer group {i} is a {type(lg).__name__}, not a module')
        ps = [id(p) for p in lg.parameters()]
        if not ps:
            raise ValueError(f'layer group {i} ({type(lg).__name__}) has no parameters')
        covered.update(ps)
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        more = f' and {len(missing) - 5} more' if len(missing) > 5 else ''
        raise ValueError(f'{len(missing)} parameters of the model are in no layer group, so they would never be '
                         f'trained: {", ".join(missing[:5])}{more}')


def _own_split(model):
    for attr in ('layer_groups', 'split'):
        own = getattr(model, attr, None)
        if own is None:
            continue
        if isinstance(own, (list, tuple)):
            return list(own)
        if callable(own):
            return own() if inspect.ismethod(own) else own(model)  # a method, or a function stored on the model
    return [model]


def split_model(model, splitter=None):
    """The layer groups of `model`: from `splitter`, else the model's own `layer_groups` or `split`, else [model].

    `splitter` is a function model -> list of layer groups, a list of indices (or child modules) at which to cut an
    nn.Sequential (`split_by_idx`), or a {module name: settings} mapping (`module_groups`). A layer group may be
    a module or a list of modules (which becomes a `LayerGroup`). Every parameter must be in some group.
    """
    if splitter is None:
        groups = _own_split(model)
    elif isinstance(splitter, Mapping):
        groups = module_groups(model, splitter)
    elif isinstance(splitter, (list, tuple)) and all(isinstance(i, (int, np.integer, nn.Module)) for i in splitter):
        groups = split_by_idx(model, *splitter)
    elif callable(splitter):
        groups = splitter(model)
    else:
        raise TypeError(f'splitter must be a function model -> layer groups, a list of split indices or a '
                        f'{{module name: settings}} dict; got a {type(splitter).__name__}')
    if isinstance(groups, nn.Module) or not isinstance(groups, (list, tuple)):
        raise TypeError(f'the splitter returned a {type(groups).__name__}; it must return a list of layer groups')
    for i, g in enumerate(groups):  # else LayerGroup(3) fails as "'int' object is not iterable"
        if not isinstance(g, (nn.Module, list, tuple)):
            raise TypeError(f'layer group {i} is a {type(g).__name__} ({g!r}); a layer group is a module or a list '
                            f'of modules')
    groups = [g if isinstance(g, nn.Module) else LayerGroup(g) for g in groups]
    check_layer_groups(model, groups)
    return groups


def split_by_idx(model, *idxs):
    """Cut an nn.Sequential before each index (or child module): split_by_idx(m, 2, 5) -> [m[:2], m[2:5], m[5:]]."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f'split_by_idx cuts an nn.Sequential; got a {type(model).__name__} (give a splitter function '
                        f'or a {{module name: settings}} dict instead)')
    n, cuts = len(model), []
    for i in idxs:
        if isinstance(i, nn.Module):
            j = next((k for k, m in enumerate(model) if m is i), None)
            if j is None:
                raise ValueError(f'split_by_idx: the {type(i).__name__} given is not a child of the Sequential')
        else:
            j = operator.index(i)
            j = j + n if j < 0 else j
        cuts.append(j)
    if not cuts or cuts != sorted(set(cuts)) or not all(0 < j < n for j in cuts):
        raise ValueError(f'split_by_idx: give strictly increasing cut points between 1 and {n - 1} (the Sequential '
                         f'has {n} children); got {list(idxs)}')
    bounds = [0, *cuts, n]
    # plain nn.Sequentials with the children's own names: model[a:b] calls type(model)(OrderedDict), which a subclass
    # with its own __init__ (create_cnn's BodyHead) does not take
    items = list(model._modules.items())
    return [nn.Sequential(OrderedDict(items[a:b])) for a, b in zip(bounds, bounds[1:])]


def module_groups(model, spec):
    """Layer groups by module name, each with its own settings: {'encoder': dict(lr_mult=0.1), 'head': dict(wd=0.)}.

    A key is a module name from `model.named_modules()` ('backbone', 'backbone.layer4', '0') or a tuple of names; a
    parameter goes to the key naming its module or the closest ancestor, so 'backbone.layer4' may differ from
    'backbone'. Parameters no key reaches form a first group named '(rest)'. Groups follow the order of `spec`, so
    its last key is the head for freeze() and layer decay. Settings: lr, wd, mom are fixed values that fit, the
    schedules and lr_find leave alone (lr=0 holds a module still); lr_mult, wd_mult scale what they set; any other
    key (eps, ...) is passed to the optimizer as that group's option.
    """
    items = list(spec.items()) if isinstance(spec, Mapping) else list(spec)
    named = dict(model.named_modules())
    owner = {}
    for gi, (key, _) in enumerate(items):
        for k in ((key,) if isinstance(key, str) else tuple(key)):
            if k not in named:
                near = difflib.get_close_matches(k, [n for n in named if n], n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ''
                tops = ', '.join(n for n, _ in model.named_children())
                raise ValueError(f"module_groups: the model has no module named '{k}'{hint} (its top-level modules: "
                                 f"{tops})")
            if k in owner:
                raise ValueError(f"module_groups: the module '{k}' is named twice")
            owner[k] = gi
    rest = len(items)

    def group_of(name):  # the group of the closest named ancestor (or the module itself)
        while name not in owner:
            if not name:
                return rest
            name = name.rpartition('.')[0]
        return owner[name]

    members = _members(model, lambda pname: group_of(pname.rpartition('.')[0]), rest + 1)
    groups = [LayerGroup(members[rest], name='(rest)')] if members[rest] else []
    for gi, (key, settings) in enumerate(items):
        name = key if isinstance(key, str) else '+'.join(key)
        if not members[gi]:
            raise ValueError(f"module_groups: '{name}' has no parameters (its modules have none, or longer names "
                             f"in the spec took them all)")
        groups.append(LayerGroup(members[gi], name=name, **(settings or {})))
    return groups


def _members(model, group_of, n):
    """The members of `n` layer groups, given `group_of` (a parameter's full name -> its group's index): each
    largest subtree of `model` whose parameters all go to one group; a module whose subtree goes to several gives its
    own parameters to their groups (as `_DirectParams`) and each child is looked at separately."""
    members = [[] for _ in range(n)]

    def visit(m, prefix):
        ks = {group_of(pn) for pn, _ in m.named_parameters(prefix=prefix)}
        if len(ks) == 1:
            members[ks.pop()].append(m)
        elif ks:
            own = {}
            for pn, _ in m.named_parameters(prefix=prefix, recurse=False):
                own.setdefault(group_of(pn), []).append(pn.rpartition('.')[2])
            for k, names in own.items():
                members[k].append(_DirectParams(m, prefix, names))
            for cname, child in m.named_children():
                visit(child, f'{prefix}.{cname}' if prefix else cname)
    visit(model, '')
    return members


def param_name_groups(model, group_ids, names=None):
    """Layer groups from a {parameter name: group id} mapping (timm's `group_parameters(model, matcher,
    reverse=True)`), in the order of the ids; a parameter missing from it goes to the last group. `names`: one name
    per group (default: none, so summaries list the modules)."""
    ids = sorted(set(group_ids.values()))
    if not ids:
        raise ValueError('param_name_groups: no parameter has a group')
    index = {g: i for i, g in enumerate(ids)}
    members = _members(model, lambda pn: index[group_ids[pn]] if pn in group_ids else len(ids) - 1, len(ids))
    names = [None] * len(ids) if names is None else list(names)
    return [LayerGroup(ms, name=nm) for ms, nm in zip(members, names) if ms]


def split(learn, split_on):
    """fastai's learn.split: set `learn.layer_groups` from anything `split_model` takes (a function, cut indices, a
    {module name: settings} dict); the optimizer is rebuilt for the new groups at the next fit."""
    if isinstance(split_on, (int, np.integer, nn.Module)):
        split_on = [split_on]
    learn.layer_groups = split_model(learn.model, split_on)
    learn.opt = learn.stepper.decay = None
    return learn


# ---- learning rates per group and the optimizer ---------------------------------------------------------------
def layer_decay_lrs(lr, n_groups, decay, rule='timm'):
    """Layer-wise LR decay over `n_groups` layer groups, the last one the head, which is always at `lr`.

    rule='timm' (default): each lower group `decay` times the one above it (group i at lr * decay**(n-1-i)), as
    timm's and BEiT's layer decay; rule='zoobot' (seed 000): the highest body group also at `lr`, each lower body
    group `decay` times the one above it (body group i at lr * decay**(n-2-i)).
    """
    if not decay >= 0:
        raise ValueError(f'layer_decay must be >= 0 (1 gives every group the same lr), got {decay}')
    if rule not in LAYER_DECAY_RULES:
        raise ValueError(f"layer_decay_rule must be one of {LAYER_DECAY_RULES} ('timm': the head counts as the top "
                         f"layer; 'zoobot': the head and the highest body block at the full lr), got {rule!r}")
    top = n_groups - 1 if rule == 'timm' else n_groups - 2  # the group at decay ** 0 (besides the head)
    return [float(lr) * decay ** max(top - i, 0) for i in range(n_groups)]


def group_lrs(learn, lr, name='lr'):
    """One lr per layer group of `learn`: `lr_per_group`, except that `learn.layer_decay`, when set, spreads a
    single number with `layer_decay_lrs` (by `learn.layer_decay_rule`); explicit per-group values (a list) are used
    as given."""
    n = len(learn.layer_groups)
    decay = getattr(learn, 'layer_decay', None)
    if decay is None or isinstance(lr, (list, tuple, np.ndarray)):
        return lr_per_group(lr, n, name)
    if isinstance(lr, slice):
        raise ValueError(f'lr=slice(...) and layer_decay={decay} both spread the lr over the layer groups; give a '
                         f'single number (the head\'s lr), or set learn.layer_decay = None')
    return layer_decay_lrs(_rate(lr, name), n, decay, getattr(learn, 'layer_decay_rule', 'timm'))


def create_opt(learn, lr=3e-3, wd=None):
    """Build `learn.opt` from `learn.opt_func` over `param_groups(learn.layer_groups, learn.bn_wd)`, with lr and wd
    set through `set_hyper`, so layer decay and per-module settings hold from the first step."""
    groups = param_groups(learn.layer_groups, learn.bn_wd, getattr(learn, 'head_wd', None))
    lrs = group_lrs(learn, lr)
    # fused_option: on CUDA, torch's fused Adam/AdamW/SGD kernels unless the user chose otherwise
    opt = learn.opt_func(groups, lr=lrs[-1], **fused_option(learn.opt_func, [p for g in groups for p in g['params']],
                                                            learn.device))
    asked = getattr(learn.opt_func, 'keywords', None) or {}  # set by the user in a partial, not torch's default
    if asked.get('weight_decay'):
        warnings.warn(f"opt_func sets weight_decay={asked['weight_decay']}, which the Learner replaces by its "
                      f"own wd ({learn.wd if wd is None else wd}); pass wd= to the Learner or to fit instead",
                      stacklevel=3)
    for lg in learn.layer_groups:
        bad = [k for k in _group_settings(lg.settings) if k not in ('fixed', 'mult') and k not in opt.defaults] \
            if isinstance(lg, LayerGroup) else []
        if bad:
            raise ValueError(f"layer group {lg.name!r}: {type(opt).__name__} has no option '{bad[0]}' (its options: "
                             f"{', '.join(k for k in opt.defaults if k not in _OURS)}; minifast's: lr, wd, mom, "
                             f"lr_mult, wd_mult)")
    learn.opt, learn.stepper.decay = opt, WeightDecay(opt, learn.true_wd)
    set_hyper(opt, 'lr', lrs)
    set_hyper(opt, 'wd', learn.wd if wd is None else wd)
    key = momentum_key(opt)
    for g in opt.param_groups:  # a fixed momentum holds from the start, not only once a schedule sets 'mom'
        mom = g.get('fixed', {}).get('mom')
        if mom is not None:
            if key is None:
                raise ValueError(f'{type(opt).__name__} has no momentum, so a layer group cannot fix mom')
            _set_mom(g, key, mom)
    return opt


def prepare_opt(learn, lr, wd):
    """The optimizer of a coming fit: built at the first fit, else its groups' lr and wd set (checked first)."""
    check_wd(wd, 'fit')
    if not any(p.requires_grad for p in learn.model.parameters()):
        raise ValueError('fit: every parameter of the model is frozen (requires_grad=False); call '
                         'learn.unfreeze() or learn.freeze_to(n) with n < the number of layer groups '
                         f'({len(learn.layer_groups)})')
    if learn.opt is not None:
        bad = [i for i, g in enumerate(learn.opt.param_groups) if 'layer_group' not in g]
        if bad:
            raise ValueError(f'fit: optimizer parameter group(s) {bad} were not made by the learner (no '
                             f'layer_group); rebuild the optimizer with learn.create_opt() or learn.split(...)')
    if learn.opt is None:
        learn.create_opt(lr, wd)
    else:
        set_hyper(learn.opt, 'lr', group_lrs(learn, lr))
        set_hyper(learn.opt, 'wd', wd)


# ---- freezing --------------------------------------------------------------------------------------------------
TRAINING_MODES = ('head_only', 'full')


def freeze_to(learn, n, train_bn=None):
    """Freeze the layer groups before `n` (requires_grad=False; n < 0 counts from the end) and unfreeze the rest.

    With train_bn (default: learn.train_bn), the normalisation layers of frozen groups (BatchNorm, LayerNorm,
    GroupNorm, InstanceNorm, RMSNorm) keep training. A frozen parameter gets no gradient, so the optimizer skips it:
    no update and no weight decay. Modules stay in train mode, so BatchNorm running statistics keep updating.
    """
    lgs, train_bn = learn.layer_groups, learn.train_bn if train_bn is None else train_bn
    k = len(lgs)
    i = int_value(n)
    if i is None:  # operator.index alone says "'float' object cannot ..."
        raise TypeError(f'freeze_to({n!r}): n must be an int, the index of the first layer group to train')
    n = i
    if not -k <= n <= k:
        raise ValueError(f'freeze_to({n}): the learner has {k} layer groups (give -{k} to {k})')
    frozen, seen = set(range(k)[:n]), set()
    for i, lg in enumerate(lgs):
        norm = _norm_params(lg) if train_bn and i in frozen else set()
        for p in lg.parameters():
            if id(p) in seen:  # a shared parameter belongs to its first group, as in param_groups
                continue
            seen.add(id(p))
            train = i not in frozen or id(p) in norm
            if p.requires_grad != train and learn.opt is not None:
                learn.opt.state.pop(p, None)  # moments from before the change would be stale (fastai v1 rebuilds)
            p.requires_grad_(train)
            if not train:
                p.grad = None  # a stale gradient would still be stepped and decayed
    return learn


def freeze(learn, train_bn=None):
    """Train only the last layer group (the head), and normalisation layers when train_bn (default:
    learn.train_bn): freeze_to(-1)."""
    if len(learn.layer_groups) == 1:
        warnings.warn('freeze(): the learner has a single layer group, so nothing is frozen; split the model into '
                      'layer groups (layer_groups=, a splitter, or split())', stacklevel=2)
    return freeze_to(learn, -1, train_bn)


def unfreeze(learn):
    """Train every layer group: freeze_to(0)."""
    return freeze_to(learn, 0)


def set_training_mode(learn, mode, train_bn=None):
    """Seed 000's training_mode: 'head_only' trains the last layer group (freeze), 'full' trains all (unfreeze)."""
    if mode == 'head_only':
        return freeze(learn, train_bn)
    if mode == 'full':
        return unfreeze(learn)
    raise ValueError(f"training_mode {mode!r}: expected 'head_only' (train the last layer group, as freeze()) or "
                     f"'full' (train every layer group, as unfreeze())")


# ---- summary ---------------------------------------------------------------------------------------------------
class ParamSummary:
    """param_summary's result: prints as a table; `rows` holds one dict per optimizer parameter group."""

    def __init__(self, rows, table):
        self.rows, self.table = rows, table

    def __repr__(self):
        return self.table

    __str__ = __repr__


def _member_names(m, names):
    if id(m) in names:
        return [names[id(m)] or '(model)']
    if isinstance(m, _DirectParams):
        return [f'{m.owner_name}.{n}' if m.owner_name else n for n in m._parameters]
    return [n for c in m.children() for n in _member_names(c, names)]


def _abbrev(names, width=36):
    """'0, 1, 2, 5' -> '0-2, 5'; then cut to `width` characters with a count of what was left out."""
    runs = []
    for name in names:
        head, _, tail = name.rpartition('.')
        last = runs[-1] if runs else None
        if tail.isdigit() and last and last[0] == head and last[2] + 1 == int(tail):
            last[2] = int(tail)
        else:
            runs.append([head, int(tail), int(tail)] if tail.isdigit() else [name, None, None])
    items = [r[0] if r[1] is None else f"{r[0] + '.' if r[0] else ''}{r[1]}" + (f'-{r[2]}' if r[2] > r[1] else '')
             for r in runs]
    out = ', '.join(items)
    if len(out) <= width:
        return out
    kept = []
    for i, it in enumerate(items):
        if len(', '.join(kept + [it])) + 10 > width and kept:
            return ', '.join(kept) + f', … (+{len(items) - i})'
        kept.append(it)
    return ', '.join(kept)


def _fmt(v):
    return '-' if v is None else f'{v:.3g}'


def param_summary(learn):
    """The parameter groups as a table (index, layer group, modules, parameter count, trainable, lr, wd); rows in
    `.rows`. Before the optimizer exists, wd is learn.wd and lr is '-' unless a layer group fixes it."""
    opt = learn.opt
    groups = opt.param_groups if opt is not None else param_groups(learn.layer_groups, learn.bn_wd,
                                                                   getattr(learn, 'head_wd', None))
    names = {id(m): n for n, m in learn.model.named_modules()}
    labels = [str(lg.name) if isinstance(lg, LayerGroup) and lg.name else _abbrev(_member_names(lg, names))
              for lg in learn.layer_groups]
    rows = []
    for i, g in enumerate(groups):
        ps, lg = g['params'], g['layer_group']
        if opt is not None:
            lr, wd = g['lr'], g.get('wd', 0.)
        else:
            lr = g.get('fixed', {}).get('lr')
            wd = _group_value(g, 'wd', learn.wd) if g['decay'] else 0.
        lgm = learn.layer_groups[lg] if lg < len(learn.layer_groups) else None
        extra = [k for k in lgm.settings if k not in _FIXED and k not in _MULTS] if isinstance(lgm, LayerGroup) else []
        settings = ', '.join([f'{k}={v:g}' for k, v in g.get('fixed', {}).items()]
                             + [f'{k}_mult={v:g}' for k, v in g.get('mult', {}).items()]
                             + [f'{k}={g[k]}' for k in extra])
        rows.append({'group': i, 'layer_group': lg, 'modules': labels[lg] if lg < len(labels) else '?',
                     'decay': g['decay'], 'params': sum(p.numel() for p in ps),
                     'trainable': sum(p.numel() for p in ps if p.requires_grad), 'lr': lr, 'wd': wd,
                     'settings': settings})
    cols = [('#', 'group', str), ('layer group', 'layer_group', str), ('modules', 'modules', str),
            ('params', 'params', '{:,}'.format), ('trainable', 'trainable', '{:,}'.format), ('lr', 'lr', _fmt),
            ('wd', 'wd', _fmt), ('wd applies', 'decay', lambda d: 'yes' if d else 'no (norm/bias)')]
    if any(r['settings'] for r in rows):
        cols.append(('settings', 'settings', str))
    cells = [[h for h, _, _ in cols]] + [[f(r[k]) for _, k, f in cols] for r in rows]
    widths = [max(len(c[j]) for c in cells) for j in range(len(cols))]
    right = {'params', 'trainable', 'lr', 'wd'}
    lines = ['  '.join(c.rjust(w) if cols[j][1] in right else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
             .rstrip() for row in cells]
    lines.insert(1, '-' * len(max(lines, key=len)))
    total, train = sum(r['params'] for r in rows), sum(r['trainable'] for r in rows)
    lines.append(f'{total:,} parameters, {train:,} trainable, {total - train:,} frozen'
                 + ('' if opt is not None else ' (no optimizer yet: lr is set by the next fit)'))
    return ParamSummary(rows, '\n'.join(lines))
