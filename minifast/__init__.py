"""minifast: a fastai-v1-style training framework on PyTorch: one loop, callbacks, Smith's methods."""
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .callbacks.control import (EarlyStopping, EarlyStoppingCallback, ReduceLROnPlateau, ReduceLROnPlateauCallback,
                                SaveModelCallback)
from .callbacks.gradients import GradientAccumulation, GradientClipping
from .callbacks.logging import CSVLogger
from .callbacks.lr_finder import LRFinder, LRFindResult
from .callbacks.progress import ProgressCallback, ShowGraph
from .callbacks.recorder import Recorder
from .callbacks.schedule import ParamScheduler
from .callbacks.snapshots import WeightSnapshots
from .callbacks.tracking import Checkpoint, DivergenceGuard
from .checkpoint import CorruptCheckpointError, UnsafeCheckpointError
from .data import (AffineWarp, BatchTransform, DataBunch, Dihedral, FlipLR, FlipUD, ImageDataBunch, ImageList, Lighting,
                   RandomCropPad, TensorDataLoader, cifar10, cifar100, cifar_stats, cifar_transforms, get_transforms,
                   imagenet_stats, load_cifar, synthetic_cifar, synthetic_classification, synthetic_images,
                   write_cifar, write_image_folder)
from .grid import GridResult, diagnose, grid_search, read_log
from .lock import FolderLockedError
from .landscape import (InterpolationResult, SurfaceResult, average_weights, evaluate_weights,
                        filter_normalized_direction, interpolate_losses, loss_surface, plot_interpolation,
                        plot_surface, recompute_bn)
from .determinism import set_seed
from .resume import resumable
from .core import (EVENTS, CallbackException, Callback, CancelBatchException, CancelEpochException, CancelException,
                   CancelFitException, CancelTrainException, CancelValidateException, DivergenceError)
from .learner import Learner
from .metrics import accuracy, error_rate, top_k_accuracy
from .models import (AdaptiveConcatPool2d, Flatten, cifar_resnet, create_cnn, create_head, from_seed_state_dict,
                     resnet56, to_seed_state_dict)
from .optim import SGD, AdamW, LayerGroup, layer_decay_lrs, module_groups, split_by_idx, split_model
from .schedules import (GeneralSchedule, Phase, PhaseSchedule, TrainingPhase, annealing_cos, annealing_exp,
                        annealing_linear, annealing_no, one_cycle_schedule)

__version__ = '0.1.0'

__all__ = [
    # the library
    'Learner', 'Callback', 'EVENTS', 'CancelException', 'CancelBatchException', 'CancelTrainException',
    'CancelValidateException', 'CancelEpochException', 'CancelFitException', 'CallbackException', 'Recorder',
    'ProgressCallback', 'ShowGraph', 'CSVLogger', 'DataBunch', 'TensorDataLoader', 'synthetic_classification',
    'ImageList', 'ImageDataBunch', 'cifar_stats', 'imagenet_stats', 'get_transforms', 'cifar_transforms',
    'BatchTransform',
    'FlipLR', 'FlipUD', 'Dihedral', 'RandomCropPad', 'AffineWarp', 'Lighting', 'cifar10', 'cifar100', 'synthetic_cifar',
    'load_cifar', 'write_cifar', 'synthetic_images', 'write_image_folder', 'accuracy',
    'top_k_accuracy', 'error_rate', 'AdamW', 'SGD', 'LayerGroup', 'layer_decay_lrs', 'module_groups', 'split_by_idx',
    'split_model', 'AdaptiveConcatPool2d', 'Flatten', 'create_head', 'resnet56', 'cifar_resnet', 'create_cnn',
    'from_seed_state_dict', 'to_seed_state_dict', 'WeightSnapshots', 'interpolate_losses', 'plot_interpolation',
    'InterpolationResult', 'recompute_bn', 'loss_surface', 'plot_surface', 'SurfaceResult', 'average_weights',
    'evaluate_weights', 'filter_normalized_direction', 'ParamScheduler', 'LRFinder', 'LRFindResult', 'PhaseSchedule',
    'Phase', 'TrainingPhase', 'GeneralSchedule', 'annealing_cos', 'annealing_exp', 'annealing_linear', 'annealing_no',
    'one_cycle_schedule', 'grid_search', 'GridResult', 'diagnose', 'read_log', 'Checkpoint', 'DivergenceGuard',
    'DivergenceError', 'UnsafeCheckpointError', 'CorruptCheckpointError', 'FolderLockedError', 'set_seed',
    'resumable', 'EarlyStopping', 'ReduceLROnPlateau', 'SaveModelCallback', 'GradientClipping', 'GradientAccumulation',
    'EarlyStoppingCallback',
    'ReduceLROnPlateauCallback',
    # what a fastai v1 notebook expects to have after `from fastai.vision import *`
    'np', 'torch', 'nn', 'F', 'plt', 'partial', 'Path',
]
