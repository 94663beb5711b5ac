"""CIFAR ResNets of seed 004 (He et al. 2016, section 4.2) with the seed's concat-pool head.

Architecture: a 3x3 stride-1 convolution to 16 channels (no bias) + BatchNorm + ReLU; three stages of n BasicBlocks
with 16, 32 and 64 channels (the first block of stages 2 and 3 has stride 2); a 1x1 convolution + BatchNorm shortcut
wherever a block changes the shape; then AdaptiveConcatPool2d -> Flatten -> BatchNorm1d(128) -> Dropout(0.25) ->
Linear(128, 128) -> ReLU -> BatchNorm1d(128) -> Dropout(0.5) -> Linear(128, c). depth = 6n + 2: resnet56 has n = 9
and 885,044 parameters at 100 classes.

Key mapping to the seed's `Resnet()`: the identity. The modules have the seed's names and order (conv1, bn1,
layer1..layer3 of BasicBlocks with conv1, bn1, conv2, bn2 and, where the shape changes, shortcut.0 (conv) and
shortcut.1 (BatchNorm); head.0..head.8 as the seed's nn.Sequential: head.2 and head.6 are the BatchNorm1d layers,
head.4 and head.8 the Linear layers), so a state dict saved from the seed's model loads with strict=True and gives the
same outputs. `from_seed_state_dict` / `to_seed_state_dict` exist so code that converts says so, and accept what a
seed notebook may have saved: a fastai v1 `learn.save` file's {'model': ..., 'opt': ...} dict and DataParallel's
'module.' prefix.
"""
from collections import OrderedDict

import torch.nn.functional as F
from torch import nn

from .factory import record_spec, recorded
from .layers import check_size, create_head

__all__ = ['BasicBlock', 'CifarResNet', 'cifar_resnet', 'resnet56', 'CIFAR_DEPTHS', 'from_seed_state_dict',
           'to_seed_state_dict']

CIFAR_DEPTHS = (20, 32, 44, 56, 110)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; a 1x1 conv-BN shortcut when stride or channels change."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        # None rather than nn.Identity keeps the seed's state-dict keys and module list (no 'shortcut' when unused)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """Seed 004's `Resnet(num_blocks, num_classes)`: a 16/32/64-channel CIFAR ResNet with a concat-pool head."""

    def __init__(self, num_blocks=(9, 9, 9), num_classes=100):
        super().__init__()
        if not isinstance(num_blocks, (list, tuple)) or len(num_blocks) != 3:
            raise ValueError(f'CifarResNet: num_blocks must be three positive block counts (one per stage), '
                             f'got {num_blocks!r}')
        num_blocks = [check_size(n, 'CifarResNet: each of num_blocks') for n in num_blocks]
        num_classes = check_size(num_classes, 'CifarResNet: num_classes')
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, num_blocks[0], stride=1)
        self.layer2 = self._stage(16, 32, num_blocks[1], stride=2)
        self.layer3 = self._stage(32, 64, num_blocks[2], stride=2)
        self.head = create_head(2 * 64, num_classes, lin_ftrs=[128], ps=0.5)  # dropouts 0.25, 0.5 as the seed
        record_spec(self, f'{__name__}:CifarResNet', {'num_blocks': num_blocks, 'num_classes': num_classes})

    @staticmethod
    def _stage(c_in, c_out, n, stride):
        return nn.Sequential(BasicBlock(c_in, c_out, stride), *[BasicBlock(c_out, c_out) for _ in range(n - 1)])

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.head(self.layer3(self.layer2(self.layer1(out))))

    def layer_groups(self):
        """Stem + stage 1, stage 2, stage 3, head: the Learner's layer groups (discriminative LRs, freeze)."""
        return [[self.conv1, self.bn1, self.layer1], self.layer2, self.layer3, self.head]


@recorded
def cifar_resnet(depth, num_classes=100):
    """The CIFAR ResNet of `depth` = 6n + 2 (He et al.'s 20, 32, 44, 56, 110, or any other such as 8 and 14 for quick
    runs): n BasicBlocks per stage."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f'cifar_resnet: depth {depth!r} is not 6n + 2 with n >= 1 blocks per stage (e.g. '
                         f'{", ".join(map(str, CIFAR_DEPTHS))}, or 8, 14 for small models)')
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes)


@recorded
def resnet56(num_classes=100):
    """Seed 004's ResNet-56 (9 blocks per stage, concat-pool head): 885,044 parameters at 100 classes."""
    return cifar_resnet(56, num_classes)


def _model_dict(sd, where):
    if isinstance(sd, dict) and 'model' in sd and isinstance(sd['model'], dict):
        sd = sd['model']  # a fastai v1 learn.save(..., with_opt=True) file
    if not isinstance(sd, dict):
        raise TypeError(f'{where}: expected a state dict (a mapping of names to tensors), got a {type(sd).__name__}')
    if sd and all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}  # saved from nn.DataParallel
    return sd


def from_seed_state_dict(sd):
    """Seed 004 `Resnet()` state dict -> `CifarResNet` state dict: the identity on keys (see the module docstring)."""
    return OrderedDict(_model_dict(sd, 'from_seed_state_dict'))


def to_seed_state_dict(sd):
    """`CifarResNet` state dict -> seed 004 `Resnet()` state dict: the identity on keys (see the module docstring)."""
    return OrderedDict(_model_dict(sd, 'to_seed_state_dict'))
