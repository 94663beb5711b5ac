"""How a model was built, recorded on it: an importable factory and its arguments as JSON values, which is what
`learn.export` writes so that `load_learner` can build the model again without pickle."""
import functools
import importlib
import inspect
import json
import math

__all__ = ['recorded', 'record_spec', 'model_spec', 'importable_name', 'json_args', 'is_recorded_factory']

# the attribute a built model carries: {'factory': 'pkg.mod:name', 'args': {...}} or {'reason': why there is none}
_ATTR = 'minifast_spec'
_MARK = '__minifast_factory__'  # set on the functions `recorded` wraps: load_learner trusts them as factories


def importable_name(obj):
    """'package.module:name' for a function or class that importing that module gives back; ValueError saying why
    when there is none (a lambda, a nested function, a class defined in a notebook or script)."""
    mod, qual = getattr(obj, '__module__', None), getattr(obj, '__qualname__', None)
    what = getattr(obj, '__name__', type(obj).__name__)
    if not mod or not qual:
        raise ValueError(f'{what!r} has no module and name to import it by')
    if mod == '__main__':
        raise ValueError(f'{qual} is defined in __main__ (a notebook or a script), which another process cannot '
                         f'import; define it in a .py module on the Python path')
    if '<' in qual or '.' in qual:  # '<lambda>', 'f.<locals>.g', 'Class.method'
        raise ValueError(f'{mod}.{qual} is not a top-level name of its module, so it cannot be imported by name')
    try:
        found = getattr(importlib.import_module(mod), qual, None)
    except ImportError as e:
        raise ValueError(f'{mod}:{qual}: its module cannot be imported ({e})') from e
    if found is not obj:
        raise ValueError(f'{mod}:{qual} does not give back the same object when imported (redefined or wrapped)')
    return f'{mod}:{qual}'


def _json(v, where):
    """`v` as a JSON value (tuples become lists); ValueError naming `where` for anything else."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f'{where} is {v}, which JSON cannot hold')
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_json(x, f'{where}[{i}]') for i, x in enumerate(v)]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: _json(x, f'{where}[{k!r}]') for k, x in v.items()}
    raise ValueError(f'{where} is a {type(v).__name__} ({v!r:.60}), not a JSON value (number, string, bool, None, '
                     f'list, dict)')


def json_args(args, where='args'):
    """A factory's keyword arguments as JSON values, checked (ValueError naming the first that is not one)."""
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ValueError(f'{where} must be a dict of keyword arguments, got {type(args).__name__}')
    out = {k: _json(v, f'{where}[{k!r}]') for k, v in args.items()}
    json.dumps(out, allow_nan=False)  # a last check: what export writes must parse back the same
    return out


def record_spec(model, factory, args=None, reason=None):
    """Record on `model` that `factory(**args)` builds it (factory: 'pkg.mod:name'), or with `reason`, why it
    cannot be rebuilt that way. Returns `model`."""
    spec = {'reason': reason} if reason is not None else {'factory': factory, 'args': args or {}}
    try:
        object.__setattr__(model, _ATTR, spec)  # a plain attribute: not a submodule, parameter or buffer
    except (AttributeError, TypeError):  # an object that takes no attributes: nothing recorded
        pass
    return model


def model_spec(model):
    """(spec, reason): how `model` was built ({'factory': 'pkg.mod:name', 'args': {...}}) and None, or None and
    why nothing usable was recorded."""
    spec = getattr(model, _ATTR, None)
    if spec is None:
        return None, (f'{type(model).__qualname__} was not built by a minifast model function (resnet56, '
                      f'cifar_resnet, create_cnn...), so nothing recorded how to build it')
    if 'reason' in spec:
        return None, spec['reason']
    return {'factory': spec['factory'], 'args': dict(spec['args'])}, None


def is_recorded_factory(obj):
    """Whether `obj` is a model function wrapped by `recorded`."""
    return getattr(obj, _MARK, False) is True


def recorded(fn=None, *, importable=(), fixed=None):
    """Decorator for a function that returns a model: the model records the call (see record_spec), its bound
    arguments (defaults included) as JSON values. `importable`: arguments recorded by their 'pkg.mod:name' (a
    torchvision model function); `fixed`: arguments recorded with a given value (pretrained=False: an export
    carries the weights). An argument with no JSON form leaves the reason recorded instead."""
    if fn is None:
        return functools.partial(recorded, importable=tuple(importable), fixed=dict(fixed or {}))
    sig, fixed = inspect.signature(fn), dict(fixed or {})
    name = f'{fn.__module__}:{fn.__qualname__}'
    odd = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)]

    @functools.wraps(fn)
    def build(*args, **kwargs):
        model = fn(*args, **kwargs)
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:  # fn accepted the call, so this cannot happen; record nothing rather than fail a build
            return record_spec(model, None, reason=f'{name}: its call could not be recorded')
        bound.apply_defaults()
        try:
            if odd:
                raise ValueError(f'{name} takes positional-only arguments ({", ".join(odd)})')
            rec = {}
            for k, v in bound.arguments.items():
                if sig.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
                    rec.update(v)
                elif k in fixed:
                    rec[k] = fixed[k]
                elif k in importable and callable(v):
                    rec[k] = importable_name(v)
                else:
                    rec[k] = v
            spec = json_args(rec, f'{name} argument')
        except ValueError as e:
            return record_spec(model, None, reason=f'{name} was called with an argument that cannot be recorded: {e}')
        return record_spec(model, name, spec)

    setattr(build, _MARK, True)
    build.recorded_importable = tuple(importable)  # load_learner turns these names back into functions
    return build
