"""Head building blocks: concat pooling, Flatten, and fastai v1's classifier head `create_head`."""
import numbers

import torch
from torch import nn

from ..checks import int_value

__all__ = ['AdaptiveConcatPool2d', 'Flatten', 'create_head']


class AdaptiveConcatPool2d(nn.Module):
    """Adaptive max pool and adaptive average pool, concatenated on channels (max first): C -> 2C features."""

    def __init__(self, sz=None):
        super().__init__()
        self.output_size = sz or 1
        self.ap = nn.AdaptiveAvgPool2d(self.output_size)
        self.mp = nn.AdaptiveMaxPool2d(self.output_size)

    def forward(self, x):
        # max before avg: a head trained on this order (seed 004, fastai v1) reads its features in this order
        return torch.cat([self.mp(x), self.ap(x)], 1)


class Flatten(nn.Module):
    """Flatten to (batch, features), or to one dimension when `full`."""

    def __init__(self, full=False):
        super().__init__()
        self.full = full

    def forward(self, x):
        # flatten/reshape rather than view: a channels_last activation is not viewable
        return x.reshape(-1) if self.full else x.flatten(1)

    def extra_repr(self):
        return 'full=True' if self.full else ''


def check_size(v, what):
    """`v` as an int when it is a positive integer (a layer size, a number of classes), else a ValueError naming it."""
    n = int_value(v)  # also numpy ints and integer 0-d tensors (y.max() + 1)
    if n is None or n < 1:
        raise ValueError(f'{what} must be a positive integer, got {v!r}')
    return n


def _as_ps(ps, n_lin):
    """Dropout probabilities, one per Linear layer of the head; one float p gives p/2 for all but the last."""
    ps = ps.tolist() if hasattr(ps, 'tolist') else ps  # a numpy array or tensor of probabilities (or a 0-d one)
    if isinstance(ps, bool) or not (isinstance(ps, numbers.Real) or isinstance(ps, (list, tuple)) and ps and
                                    all(isinstance(p, numbers.Real) and not isinstance(p, bool) for p in ps)):
        raise ValueError(f'create_head: ps must be a dropout probability or a list of them, got {ps!r}')
    if isinstance(ps, numbers.Real):
        ps = [ps / 2] * (n_lin - 1) + [ps]
    ps = [float(p) for p in ps]
    if len(ps) == 1:
        ps = [ps[0] / 2] * (n_lin - 1) + ps
    if len(ps) != n_lin:
        raise ValueError(f'create_head: ps has {len(ps)} dropout probabilities but the head has {n_lin} Linear layers '
                         f'(give one float, or one value per Linear layer: len(lin_ftrs) + 1)')
    bad = [p for p in ps if not 0 <= p < 1]
    if bad:
        raise ValueError(f'create_head: dropout probabilities must be in [0, 1), got {bad}')
    return ps


def create_head(nf, nc, lin_ftrs=None, ps=0.5, concat_pool=True, bn_final=False, pool=True):
    """fastai v1's classifier head: pool -> Flatten -> [BatchNorm1d, Dropout, Linear, ReLU] per hidden layer -> out.

    `nf` is the number of features after pooling (twice the body's channels with concat_pool), `nc` the number of
    classes, `lin_ftrs` the hidden sizes (default [512]). `ps` is one dropout probability p (then p/2 before every
    Linear but the last, which gets p) or one per Linear layer; a zero probability adds no Dropout layer. `bn_final`
    appends a BatchNorm1d on the outputs. pool=False leaves out the pooling layer, for a body whose output is
    already pooled features (batch, nf) (a vision transformer's); concat_pool then does not apply.
    """
    lin_ftrs = lin_ftrs.tolist() if hasattr(lin_ftrs, 'tolist') else lin_ftrs
    if lin_ftrs is not None and not isinstance(lin_ftrs, (list, tuple)):
        raise ValueError(f'create_head: lin_ftrs must be a list of hidden layer sizes, got {lin_ftrs!r}')
    sizes = [check_size(nf, 'create_head: nf')] + \
        [check_size(n, 'create_head: each of lin_ftrs') for n in ([512] if lin_ftrs is None else lin_ftrs)] + \
        [check_size(nc, 'create_head: nc (the number of classes)')]
    ps = _as_ps(ps, len(sizes) - 1)
    layers = ([AdaptiveConcatPool2d() if concat_pool else nn.AdaptiveAvgPool2d(1)] if pool else []) + [Flatten()]
    for i, (n_in, n_out, p) in enumerate(zip(sizes[:-1], sizes[1:], ps)):
        layers.append(nn.BatchNorm1d(n_in))
        if p:
            layers.append(nn.Dropout(p))
        layers.append(nn.Linear(n_in, n_out))
        if i < len(ps) - 1:
            layers.append(nn.ReLU(inplace=True))
    if bn_final:
        layers.append(nn.BatchNorm1d(sizes[-1], momentum=0.01))
    return nn.Sequential(*layers)
