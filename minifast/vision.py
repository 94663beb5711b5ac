"""fastai v1's `cnn_learner`: a Learner for a torchvision or timm backbone with a new head, in layer groups, frozen
when pretrained.

    learn = cnn_learner(data, torchvision.models.resnet18, metrics=error_rate)   # pretrained: the head trains
"""
from torch import nn

from .learner import Learner
from .models.cnn import BodyHead, TimmBodyHead, create_cnn, init_head

__all__ = ['cnn_learner']


def cnn_learner(data, base_arch, cut=None, pretrained=True, lin_ftrs=None, ps=0.5, custom_head=None, split_on=None,
                bn_final=False, init=nn.init.kaiming_normal_, concat_pool=True, head_dropout=None, arch_kwargs=None,
                timm_groups='coarse', **learner_kwargs):
    """A Learner on `data` for `base_arch`'s body (cut as `create_cnn` cuts it) and a head for `data.c` classes.

    Args:
        base_arch: a torchvision model function (e.g. torchvision.models.resnet18) or one taking `weights=`; or a
            timm model name ('resnet18', 'convnext_atto') or instance (layer groups: timm's group_matcher, then
            the head).
        pretrained: True: the default weights (torchvision's, loaded from $TORCH_HOME/hub/checkpoints when the file
            is there, else torchvision downloads it once; timm's only from the local cache, never downloaded); a
            path: that file's state dict of the whole backbone model; False: random weights. A pretrained body is
            frozen (learn.freeze()), as fastai v1 does.
        cut, lin_ftrs, ps, bn_final, concat_pool, head_dropout, arch_kwargs, timm_groups: as `create_cnn` and
            `create_head`.
        custom_head: a module used as the head instead (it gets `init` too).
        split_on: the layer groups, as `learn.split` takes them; default: the body in two and the head.
        init: the head's weight initialisation (fastai v1's default: kaiming normal; None leaves it).
        learner_kwargs: the Learner's (metrics=..., loss_func=..., opt_func=..., layer_decay=...,
            layer_decay_rule=..., head_wd=...); path defaults to the data's folder.
    """
    nc = getattr(data, 'c', None)
    if not nc:
        raise ValueError(f'cnn_learner: data.c (the number of classes) is {nc!r}; give data with classes (an '
                         f'ImageDataBunch, or a DataBunch made with classes=)')
    if custom_head is not None and not isinstance(custom_head, nn.Module):
        raise TypeError(f'cnn_learner: custom_head must be an nn.Module, got a {type(custom_head).__name__}')
    model = create_cnn(base_arch, nc, pretrained=pretrained, cut=cut, lin_ftrs=lin_ftrs, ps=ps,
                       concat_pool=concat_pool, bn_final=bn_final, head_dropout=head_dropout, arch_kwargs=arch_kwargs,
                       timm_groups=timm_groups)
    if custom_head is not None:
        # a new module (not the one create_cnn returned with its own head): nothing recorded about that one applies
        model = TimmBodyHead(model[0], custom_head, model.coarse) if isinstance(model, TimmBodyHead) else \
            BodyHead(model[0], custom_head, model.split_at)
    if init is not None and (custom_head is not None or init is not nn.init.kaiming_normal_):
        init_head(model[1], init)  # create_cnn's head already has fastai v1's default initialisation
    learner_kwargs.setdefault('path', None)  # fastai v1: models are saved under the data's folder
    learn = Learner(data, model, **learner_kwargs)
    if split_on is not None:
        learn.split(split_on)
    if pretrained:
        learn.freeze()
    return learn
