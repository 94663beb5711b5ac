"""The model zoo: seed 004's CIFAR ResNets, fastai v1's head and `create_cnn` for torchvision and timm backbones."""
from .cifar import (CIFAR_DEPTHS, BasicBlock, CifarResNet, cifar_resnet, from_seed_state_dict, resnet56,
                    to_seed_state_dict)
from .cnn import BodyHead, TimmBodyHead, create_cnn, cut_body
from .factory import model_spec, record_spec, recorded
from .layers import AdaptiveConcatPool2d, Flatten, create_head

__all__ = ['AdaptiveConcatPool2d', 'Flatten', 'create_head', 'BasicBlock', 'CifarResNet', 'cifar_resnet', 'resnet56',
           'CIFAR_DEPTHS', 'from_seed_state_dict', 'to_seed_state_dict', 'BodyHead', 'create_cnn', 'cut_body',
           'recorded', 'record_spec', 'model_spec', 'TimmBodyHead']
