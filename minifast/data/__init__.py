"""Data: DataBunch and in-memory loaders, the ImageList chain, batched augmentation, datasets."""
from .augment import (AffineWarp, BatchTransform, Dihedral, FlipLR, FlipUD, Lighting, RandomCropPad, cifar_transforms,
                      get_transforms)
from .core import DataBunch, DatasetType, TensorDataLoader
from .datasets import (cifar10, cifar100, load_cifar, synthetic_cifar, synthetic_images, write_cifar,
                       write_image_folder)
from .images import ImageDataBunch, ImageList, cifar_stats, imagenet_stats
from .synthetic import synthetic_classification

__all__ = ['DataBunch', 'DatasetType', 'TensorDataLoader', 'synthetic_classification', 'ImageList', 'ImageDataBunch',
           'cifar_stats', 'imagenet_stats', 'get_transforms', 'cifar_transforms', 'BatchTransform', 'FlipLR',
           'FlipUD', 'Dihedral', 'RandomCropPad', 'AffineWarp', 'Lighting', 'cifar10', 'cifar100', 'synthetic_cifar',
           'load_cifar', 'write_cifar', 'synthetic_images', 'write_image_folder']
