"""learn.summary(): fastai v1's table of a model's layers from one forward pass, with each layer's group."""
from functools import partial

import torch

__all__ = ['ModelSummary', 'model_summary']


class ModelSummary:
    """model_summary's result: prints (and shows in a notebook) as the table; `rows` has one dict per layer
    (name, type, output_shape, params, trainable_params, trainable, group, calls), `groups` one per layer group."""

    def __init__(self, rows, groups, input_shape, total, trainable, table):
        self.rows, self.groups, self.input_shape, self.table = rows, groups, input_shape, table
        self.total_params, self.trainable_params = total, trainable

    def __repr__(self):
        return self.table

    __str__ = __repr__


def _first_batch(learn):
    """The inputs of the first validation batch (else of the training set in order, unaugmented), cut to one item;
    or, for data without items (load_learner's), a zero image of the data's size. Returns (inputs, what they are)."""
    data = learn.data
    loaders = [('validation', lambda: data.valid_dl), ('training', lambda: data.fix_dl)]
    for name, get in loaders:
        try:
            dl = get()
        except (AttributeError, TypeError):  # a DataBunch-like object without it, a loader fix_dl cannot replay
            continue
        if dl is None:
            continue
        with torch.random.fork_rng(devices=[]):  # reading a batch must not move the seeded RNG of the next fit
            b = next(iter(dl), None)
        if b is not None:
            xb, _ = learn.prepare_batch(b)
            return tuple(x[:1] for x in xb), f'one item of a {name} batch of {_shape(xb[0], 0)}'
    size = getattr(data, 'size', None)
    if size is not None:  # an image bunch with no images still knows its input size
        return (torch.zeros(1, 3, *size, device=learn.device),), "a blank image of the data's size"
    raise ValueError('summary: the data has no batch to run the model on (its loaders are empty)')


def _shape(out, skip=1):
    """An output's shape without the batch dimension (`skip`), as fastai v1 shows it; a list for several."""
    if isinstance(out, torch.Tensor):
        return list(out.shape[skip:])
    if isinstance(out, (tuple, list)):
        return [_shape(o, skip) for o in out]
    return type(out).__name__


def _groups_of(learn):
    """({parameter id: layer group}, {module id: layer group}); a parameter shared by groups is in the first."""
    by_param, by_module = {}, {}
    for gi, lg in enumerate(learn.layer_groups):
        for p in lg.parameters():
            by_param.setdefault(id(p), gi)
        for m in lg.modules():
            by_module.setdefault(id(m), gi)
    return by_param, by_module


def _run(model, xb, layers):
    """Output shape and call count of each of `layers` from one forward of `model` on `xb`, in eval mode without
    gradients; every module's mode is put back and every hook removed, also on an error."""
    seen, handles = {}, []
    modes = [(m, m.training) for m in model.modules()]

    def hook(i):
        def record(mod, inp, out):
            shape, calls = seen.get(i, (_shape(out), 0))
            seen[i] = shape, calls + 1
        return record
    try:
        handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(layers)]
        model.eval()
        with torch.no_grad():
            model(*xb)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes:  # each module's own flag: a frozen BatchNorm may be in eval mode inside a training model
            m.training = t
    return seen


def model_summary(learn):
    """fastai v1's learn.summary(): each layer (every module without children, and any holding parameters itself)
    with its type, output shape (per item), parameter count, whether it trains and its layer group, from one
    forward pass on a batch of the data (eval mode, no gradients: the model is left as it was); then the totals,
    overall and per layer group. Returns a ModelSummary, which prints as the table."""
    model = learn.model
    layers = [(n, m) for n, m in model.named_modules()
              if not next(m.children(), None) or next(m.parameters(recurse=False), None) is not None]
    xb, source = _first_batch(learn)
    seen = _run(model, xb, layers)
    by_param, by_module = _groups_of(learn)
    rows, counted = [], set()
    for i, (name, m) in enumerate(layers):
        ps = [p for p in m.parameters(recurse=False) if id(p) not in counted]  # a tied weight counts once
        counted.update(id(p) for p in ps)
        n, t = sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)
        group = by_param.get(id(ps[0])) if ps else by_module.get(id(m))
        shape, calls = seen.get(i, (None, 0))
        rows.append({'name': name or '(model)', 'type': type(m).__name__, 'output_shape': shape, 'params': n,
                     'trainable_params': t, 'trainable': None if not n else t == n if t in (0, n) else 'partly',
                     'group': group, 'calls': calls})
    params = {id(p): p for p in model.parameters()}.values()
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    groups = []
    for gi, lg in enumerate(learn.layer_groups):
        ps = [p for p in {id(p): p for p in lg.parameters()}.values() if by_param.get(id(p)) == gi]
        groups.append({'group': gi, 'params': sum(p.numel() for p in ps),
                       'trainable_params': sum(p.numel() for p in ps if p.requires_grad)})
    table = _table(learn, rows, groups, [list(x.shape[1:]) for x in xb], source, total, trainable)
    in_shape = list(xb[0].shape[1:]) if len(xb) == 1 else [list(x.shape[1:]) for x in xb]
    return ModelSummary(rows, groups, in_shape, total, trainable, table)


def _table(learn, rows, groups, in_shapes, source, total, trainable):
    def trains(r):
        return '' if r['trainable'] is None else str(r['trainable'])

    def shape(r):
        return 'not run' if r['output_shape'] is None else str(r['output_shape']) + (
            f" (x{r['calls']})" if r['calls'] > 1 else '')
    cols = [('Layer (type)', lambda r: r['type'], False), ('Output Shape', shape, False),
            ('Param #', lambda r: f"{r['params']:,}", True), ('Trainable', trains, False),
            ('Group', lambda r: '-' if r['group'] is None else str(r['group']), True),
            ('Module', lambda r: r['name'], False)]
    cells = [[c[0] for c in cols]] + [[f(r) for _, f, _ in cols] for r in rows]
    widths = [max(len(c[j]) for c in cells) for j in range(len(cols))]
    lines = ['  '.join(c.rjust(w) if cols[j][2] else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in cells]
    bar = '=' * max(len(s) for s in lines)
    shown = in_shapes[0] if len(in_shapes) == 1 else in_shapes
    out = [type(learn.model).__name__, bar, lines[0], bar, *lines[1:], bar,
           f'Input shape: {shown} per item ({source})',
           f'Total params: {total:,}', f'Total trainable params: {trainable:,}',
           f'Total non-trainable params: {total - trainable:,}']
    out += [f"Layer group {g['group']}: {g['params']:,} params, {g['trainable_params']:,} trainable" for g in groups]
    loss = learn.loss_func
    try:
        wd = f'{float(learn.wd):g}'
    except TypeError:  # one per layer group
        wd = [float(v) for v in learn.wd]
    opt = learn.opt_func
    if isinstance(opt, partial):  # AdamW, betas=(0.9, 0.99) rather than functools.partial(<class ...>)
        opt = ', '.join([getattr(opt.func, '__name__', repr(opt.func)), *(f'{k}={v}' for k, v in opt.keywords.items())])
    out += [bar, f"Optimized with {getattr(opt, '__name__', opt)}, wd={wd} "
                 f"({'true weight decay' if learn.true_wd else 'L2 penalty'})",
            f"Loss function: {getattr(loss, '__name__', type(loss).__name__)}"]
    cbs = [type(cb).__name__ for cb in learn.callbacks]
    if cbs:
        out.append(f"Callbacks: {', '.join(cbs)}")
    return '\n'.join(out)
