"""fastai v1's `create_cnn`: a torchvision backbone's body, cut before its pooling, followed by `create_head`."""
from collections import OrderedDict

import torch
from torch import nn

from ..checks import int_value
from ..optim import NO_WD_TYPES
from .factory import recorded
from .layers import check_size, create_head

__all__ = ['BodyHead', 'create_cnn', 'cut_body', 'init_head']

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
               split_at=None):
    """A torchvision backbone's body (cut before its pooling) and a new `create_head` for `nc` classes.

    Args:
        arch: a torchvision model function such as `torchvision.models.resnet18`.
        nc: the number of classes.
        pretrained: True loads torchvision's default weights (`weights='DEFAULT'`: from torch's hub cache,
            $TORCH_HOME/hub/checkpoints, else downloaded once); a file path loads that state dict of the whole
            torchvision model (strict: every key and shape must fit), read with torch's weights-only loader.
        cut: where to cut the backbone: an index into its children, or a function model -> body; default: before the
            last child holding a pooling layer (-2 for torchvision ResNets).
        lin_ftrs, ps, concat_pool, bn_final: as `create_head`; the head's input size is inferred from the body.
        split_at: the body child where the second layer group starts; default: layer3 for ResNets (fastai v1's
            split), else the middle child.

    Returns a `BodyHead` (model[0] the body, model[1] the head) with three layer groups: two for the body, the head.
    """
    if not callable(arch) or isinstance(arch, nn.Module):
        raise TypeError(f'create_cnn: arch must be a model function such as torchvision.models.resnet18, '
                        f'got {arch!r}')
    name = getattr(arch, '__name__', repr(arch))
    nc = check_size(nc, 'create_cnn: nc (the number of classes)')  # before a download or building the backbone
    if isinstance(pretrained, str) or hasattr(pretrained, '__fspath__'):  # a local weights file
        model = _load_weights(arch(weights=None), str(pretrained), name)
    elif pretrained:
        try:
            model = arch(weights='DEFAULT')
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
        model = arch(weights=None)
    if not isinstance(model, nn.Module):
        raise TypeError(f'create_cnn: arch {name} returned a {type(model).__name__}, not an nn.Module')
    body = cut_body(model, cut)
    nf = _body_channels(body) * (2 if concat_pool else 1)
    head = create_head(nf, nc, lin_ftrs=lin_ftrs, ps=ps, concat_pool=concat_pool, bn_final=bn_final)
    init_head(head)
    return BodyHead(body, head, _default_split(body) if split_at is None else split_at)


def _load_weights(model, file, name):
    """`model` with the state dict in `file` loaded (strict), read with torch's weights-only loader; every key and
    shape that does not fit is named."""
    try:
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
