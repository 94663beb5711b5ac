"""fastai v1's `create_cnn`: a torchvision backbone's body, cut before its pooling, followed by `create_head`; or a
timm backbone (a model name or instance) cut at its feature layer, in layer groups from timm's own grouping."""
import difflib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..checks import int_value
from ..optim import NO_WD_TYPES, param_name_groups
from .factory import recorded
from .layers import check_size, create_head

__all__ = ['BodyHead', 'TimmBodyHead', 'create_cnn', 'cut_body', 'init_head', 'is_timm_arch']

# building arguments that load or fetch weights (torchvision's, timm's): refused in arch_kwargs
_WEIGHT_KWARGS = ('weights', 'weights_backbone', 'pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay',
                  'checkpoint_path', 'cache_dir')
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


class BodyHead(nn.Sequential):
    """nn.Sequential(body, head) whose layer groups are the body cut in two at `split_at` and the head."""

    def __init__(self, body, head, split_at):
        super().__init__(body, head)
        i = int_value(split_at)
        if i is None or not 0 < i < len(body):
            raise ValueError(f'BodyHead: split_at must cut the body in two (an int from 1 to {len(body) - 1}), got '
                             f'{split_at!r}')
        self.split_at = i

    def layer_groups(self):
        """Body before `split_at`, body from `split_at`, head."""
        body, head = self[0], self[1]
        return [body[:self.split_at], body[self.split_at:], head]


def cut_body(model, cut=None):
    """The body of `model` as an nn.Sequential: its children before `cut` (an int), or `cut(model)` (a callable).

    By default it cuts before the last child that is a pooling layer (-2 for torchvision ResNets: avgpool, fc), or
    before the last child (the classifier) when none is; a body that is one nn.Sequential (VGG's or DenseNet's
    `features`) is used as itself, so it can be split into layer groups.
    """
    if callable(cut):
        body = cut(model)
        if not isinstance(body, nn.Sequential) or len(body) < 2:
            raise TypeError(f'create_cnn: cut={getattr(cut, "__name__", cut)} returned a {type(body).__name__}; it '
                            f'must return an nn.Sequential of at least 2 modules (the layer groups split it)')
        return body
    children = list(model.children())
    if cut is None:
        pools = [i for i, c in enumerate(children) if isinstance(c, _POOLS)]
        cut = pools[-1] if pools else -1
    n = len(children)
    # cut >= n would keep the classifier in the body and fail later on a shape mismatch that names nothing
    i = int_value(cut)
    if i is None or not -n <= i < n:
        raise ValueError(f'create_cnn: cut must be an index into the {n} children of {type(model).__name__} '
                         f'({-n} to {n - 1}) or a function model -> body, got {cut!r}')
    # named: the body keeps the backbone's child names (layer3, ...), so `learn.split({'0.layer3': ...})` reads them
    body = nn.Sequential(OrderedDict(list(model.named_children())[:cut]))
    if len(body) == 1 and isinstance(body[0], nn.Sequential):
        body = body[0]
    if len(body) < 2:
        raise ValueError(f'create_cnn: cut={cut} leaves {len(body)} of the {len(children)} children of '
                         f'{type(model).__name__} as the body; at least 2 are needed')
    return body


@torch.no_grad()
def _body_channels(body):
    was_training = body.training
    body.eval()
    try:
        for size in (64, 224):  # 64 is cheap; some backbones need larger inputs
            try:
                return body(torch.zeros(1, 3, size, size)).shape[1]
            except RuntimeError:
                if size == 224:
                    raise
    finally:
        body.train(was_training)


def _default_split(body):
    """fastai v1's split of a torchvision ResNet body (before layer3), else the middle child."""
    stages = [i for i, c in enumerate(body) if isinstance(c, nn.Sequential) and len(c) and
              type(c[0]).__name__ in ('BasicBlock', 'Bottleneck')]
    return stages[2] if len(stages) == 4 else len(body) // 2


def init_head(head, init=nn.init.kaiming_normal_):
    """fastai v1's head initialisation (apply_init): `init` (kaiming normal) on the weights of every layer but
    normalisation layers, zero biases."""
    for m in head.modules():
        if isinstance(m, NO_WD_TYPES):
            continue
        if isinstance(getattr(m, 'weight', None), nn.Parameter) and m.weight.ndim >= 2:
            init(m.weight)
            if isinstance(getattr(m, 'bias', None), nn.Parameter):
                nn.init.zeros_(m.bias)


@recorded(importable=('arch',), fixed={'pretrained': False})  # what learn.export writes
def create_cnn(arch, nc, pretrained=False, cut=None, lin_ftrs=None, ps=0.5, concat_pool=True, bn_final=False,
               split_at=None, head_dropout=None, arch_kwargs=None, timm_groups='coarse'):
    """A backbone's body (a torchvision model cut before its pooling, or a timm model) and a new `create_head`.

    Args:
        arch: a torchvision model function such as `torchvision.models.resnet18`; or a timm model name
            ('resnet18', 'convnext_atto', 'vit_tiny_patch16_224'; with timm installed: `minifast[timm]`) or a timm
            model instance, which becomes the body (its classifier removed).
        nc: the number of classes.
        pretrained: True loads the default weights: torchvision's (`weights='DEFAULT'`: from torch's hub cache,
            $TORCH_HOME/hub/checkpoints, else downloaded once), or for a timm name its file in the Hugging Face or
            torch hub cache only (timm weights are never downloaded); a file path (.pth, .bin or .safetensors) loads
            that state dict of the whole backbone model (strict: every key and shape must fit), weights-only.
        cut: where to cut a torchvision backbone: an index into its children, or a function model -> body; default:
            before the last child holding a pooling layer (-2 for torchvision ResNets).
        lin_ftrs, ps, concat_pool, bn_final: as `create_head`; the head's input size is inferred from the body.
        split_at: the torchvision body child where the second layer group starts; default: layer3 for ResNets
            (fastai v1's split), else the middle child.
        head_dropout: seed 000's head dropout probability: the dropout before the head's output layer (`ps` as one
            number: hidden layers get half); None: `ps` as given.
        arch_kwargs: keyword arguments for building the backbone (timm.create_model's, e.g. img_size=64,
            drop_path_rate=0.1; or the torchvision function's).
        timm_groups: 'coarse' (timm's stem and stages) or 'fine' (per block, as timm's layer decay groups them).

    Returns a `BodyHead` (model[0] the body, model[1] the head) with three layer groups: two for the body, the head;
    for a timm backbone a `TimmBodyHead`, whose layer groups are timm's groups of the body (stem first), then the head.
    """
    ps = _head_ps(ps, head_dropout)
    if arch_kwargs is not None and not isinstance(arch_kwargs, dict):
        raise TypeError(f'create_cnn: arch_kwargs must be a dict of keyword arguments for the backbone, got '
                        f'{arch_kwargs!r:.80}')
    fetch = [k for k in (arch_kwargs or {}) if k in _WEIGHT_KWARGS]
    if fetch:  # weights come only through pretrained=, so an export's manifest cannot name a file or a download
        raise ValueError(f'create_cnn: arch_kwargs may not hold {", ".join(fetch)}; give the weights as '
                         f"pretrained='path/to/file' (or pretrained=True for the cached default weights)")
    if is_timm_arch(arch):
        return _timm_cnn(arch, nc, pretrained, cut, split_at, dict(arch_kwargs or {}), timm_groups,
                         dict(lin_ftrs=lin_ftrs, ps=ps, concat_pool=concat_pool, bn_final=bn_final))
    if not callable(arch) or isinstance(arch, nn.Module):
        raise TypeError(f'create_cnn: arch must be a model function such as torchvision.models.resnet18, a timm '
                        f'model name or a timm model instance, got {arch!r:.80}')
    name, kw = getattr(arch, '__name__', repr(arch)), dict(arch_kwargs or {})
    nc = check_size(nc, 'create_cnn: nc (the number of classes)')  # before a download or building the backbone
    if isinstance(pretrained, str) or hasattr(pretrained, '__fspath__'):  # a local weights file
        model = _load_weights(arch(weights=None, **kw), str(pretrained), name)
    elif pretrained:
        try:
            model = arch(weights='DEFAULT', **kw)
        except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError
            try:  # the file torchvision looks for, to say exactly what to copy where
                from torchvision.models import get_model_weights  # torchvision: only needed for its own archs
                url = get_model_weights(arch).DEFAULT.url
            except Exception:  # not a torchvision builder: no file name to give
                url = None
            what = f'{url.rsplit("/", 1)[-1]} (from {url})' if url else 'the weights file'
            raise RuntimeError(f'create_cnn({name}, pretrained=True): could not get the pretrained weights ({e}). '
                               f'Without a network, copy {what} into {torch.hub.get_dir()}/checkpoints (torchvision '
                               f"loads it from there), pass pretrained='path/to/weights.pth', or use "
                               f'pretrained=False') from e
    else:
        model = arch(weights=None, **kw)
    if not isinstance(model, nn.Module):
        raise TypeError(f'create_cnn: arch {name} returned a {type(model).__name__}, not an nn.Module')
    body = cut_body(model, cut)
    nf = _body_channels(body) * (2 if concat_pool else 1)
    head = create_head(nf, nc, lin_ftrs=lin_ftrs, ps=ps, concat_pool=concat_pool, bn_final=bn_final)
    init_head(head)
    return BodyHead(body, head, _default_split(body) if split_at is None else split_at)


def _head_ps(ps, head_dropout):
    """create_head's ps from seed 000's head_dropout (the probability before the output layer) when it is given."""
    if head_dropout is None:
        return ps
    if not (isinstance(ps, (int, float)) and ps == 0.5):  # ps at its default: head_dropout replaces it
        raise ValueError(f'create_cnn: give head_dropout={head_dropout!r} or ps={ps!r}, not both (head_dropout is '
                         f'ps as one number)')
    if isinstance(head_dropout, bool) or not isinstance(head_dropout, (int, float)) or not 0 <= head_dropout < 1:
        raise ValueError(f'create_cnn: head_dropout must be a dropout probability in [0, 1), got {head_dropout!r}')
    return float(head_dropout)


def _load_weights(model, file, name):
    """`model` with the state dict in `file` loaded (strict), read with torch's weights-only loader (or safetensors'
    for a .safetensors file); every key and shape that does not fit is named."""
    try:
        if file.endswith('.safetensors'):
            from safetensors.torch import load_file  # safetensors: installed with timm, needed only for such files
            state = load_file(file)
        else:
            state = torch.load(file, map_location='cpu', weights_only=True)  # tensors only: nothing in it runs
    except FileNotFoundError:
        raise FileNotFoundError(f'create_cnn({name}, pretrained={file!r}): no such weights file') from None
    except Exception as e:  # weights-only unpickling refuses code; a truncated file fails to unzip
        raise ValueError(f'create_cnn({name}, pretrained={file!r}): not a readable state dict ({e})') from e
    if not isinstance(model, nn.Module):
        raise TypeError(f'create_cnn: arch {name} returned a {type(model).__name__}, not an nn.Module')
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f'create_cnn({name}, pretrained={file!r}): the file holds a {type(state).__name__}, not a '
                         f'state dict (names -> tensors) of the {name} model')
    own = model.state_dict()
    bad = ([f'missing {k}' for k in own if k not in state] + [f'unexpected {k}' for k in state if k not in own]
           + [f'{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in {name}' for k, v in own.items()
              if k in state and state[k].shape != v.shape])
    if bad:
        raise ValueError(f'create_cnn({name}, pretrained={file!r}): the weights do not fit {name} ({len(bad)} '
                         f'problem(s)): ' + '; '.join(bad[:6]) + (' ...' if len(bad) > 6 else ''))
    model.load_state_dict(state)
    return model


# ---- timm backbones --------------------------------------------------------------------------------------------
def is_timm_arch(arch):
    """Whether create_cnn takes `arch` as a timm backbone: a model name (a string) or a model with timm's
    `group_matcher` and `reset_classifier`."""
    return isinstance(arch, str) or (isinstance(arch, nn.Module) and callable(getattr(arch, 'group_matcher', None))
                                     and callable(getattr(arch, 'reset_classifier', None)))


def _import_timm(what):
    try:
        import timm  # an optional extra: imported only when a timm backbone is asked for
    except ImportError:
        raise ImportError(f'create_cnn({what!r}): a timm backbone needs timm; pip install timm (or minifast[timm])') \
            from None
    return timm


class TimmBodyHead(nn.Sequential):
    """nn.Sequential(body, head) on a timm model (the body, its classifier removed): its layer groups are timm's own
    grouping of the body (`group_matcher`, stem first), then the head."""

    def __init__(self, body, head, coarse=True):
        super().__init__(body, head)
        self.coarse = bool(coarse)

    def layer_groups(self):
        """timm's groups of the body (coarse: stem and stages; fine: per block), then the head."""
        from timm.models import group_parameters  # timm: an optional extra, and this model was built with it
        body = self[0]
        ids = group_parameters(body, body.group_matcher(coarse=self.coarse), reverse=True)
        return [*param_name_groups(body, ids), self[1]]


def _timm_weights_file(model, name):
    """The cached file of the timm model's default weights (Hugging Face hub cache, else torch's hub cache); an error
    saying what to put where when there is none (nothing is downloaded)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    hub, url, tried = cfg.get('hf_hub_id'), cfg.get('url'), []
    if hub:
        from huggingface_hub import try_to_load_from_cache  # installed with timm; reads the cache, no network
        for fname in ('model.safetensors', 'pytorch_model.bin'):
            found = try_to_load_from_cache(hub, fname)
            if isinstance(found, str):
                return found
            tried.append(f'{fname} of the Hugging Face repo {hub}')
    if url:
        f = Path(torch.hub.get_dir()) / 'checkpoints' / url.rsplit('/', 1)[-1]
        if f.is_file():
            return str(f)
        tried.append(str(f))
    raise FileNotFoundError(f"create_cnn({name!r}, pretrained=True): timm's weights for {name} are not on this "
                            f"machine (looked for: {'; '.join(tried) or 'no weights are named by timm'}), and minifast "
                            f"downloads none. Pass pretrained='path/to/weights' (.safetensors, .pth or .bin: the state "
                            f'dict of the whole timm model), or pretrained=False')


def _timm_model(arch, pretrained, kwargs):
    """The timm model `arch` names (built without weights, then `pretrained` loaded from a local file) or is."""
    if isinstance(arch, nn.Module):
        if pretrained not in (False, None):
            raise ValueError(f'create_cnn: arch is a {type(arch).__name__} instance, which has its own weights; '
                             f'pretrained={pretrained!r} applies to a timm model name')
        if kwargs:
            raise ValueError(f'create_cnn: arch_kwargs={kwargs} build a timm model from a name; arch is an instance')
        return arch
    timm = _import_timm(arch)
    if not timm.is_model(arch):  # also refuses 'hf-hub:...' and 'local-dir:...', which would read configs elsewhere
        near = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f' (did you mean {", ".join(near)}?)' if near else ''
        raise ValueError(f'create_cnn: {arch!r} is not a timm model name{hint}; see timm.list_models()')
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if isinstance(pretrained, str) or hasattr(pretrained, '__fspath__'):
        model = _load_weights(model, str(pretrained), arch)
    elif pretrained:
        model = _load_weights(model, _timm_weights_file(model, arch), arch)
    return model


def _timm_cnn(arch, nc, pretrained, cut, split_at, kwargs, groups, head_args):
    """create_cnn on a timm backbone: the model with its classifier removed, then minifast's head."""
    what = arch if isinstance(arch, str) else type(arch).__name__
    if cut is not None or split_at is not None:
        raise ValueError(f'create_cnn({what!r}): a timm backbone is cut at its feature layer and split by timm\'s '
                         f'group_matcher; cut= and split_at= apply to torchvision backbones (use timm_groups=)')
    if groups not in ('coarse', 'fine'):
        raise ValueError(f"create_cnn({what!r}): timm_groups must be 'coarse' (stem, stages) or 'fine' (per block), "
                         f'got {groups!r}')
    nc = check_size(nc, 'create_cnn: nc (the number of classes)')
    model = _timm_model(arch, pretrained, kwargs)
    # fastai's rule: a model with a pooled feature map (pool_size) keeps it unpooled for minifast's (concat) pooling;
    # others (vision transformers) keep timm's own pooling and get a head without one
    feature_map = bool((getattr(model, 'pretrained_cfg', None) or {}).get('pool_size'))
    if feature_map:
        model.reset_classifier(0, '')
    else:
        model.reset_classifier(0)
    nf = getattr(model, 'head_hidden_size', None) or model.num_features
    nf = nf * (2 if feature_map and head_args['concat_pool'] else 1)
    head = create_head(nf, nc, pool=feature_map, **head_args)
    init_head(head)
    return TimmBodyHead(model, head, coarse=groups == 'coarse')
