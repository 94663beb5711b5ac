"""minifast: a fastai-v1-style training framework on PyTorch: one loop, callbacks, Smith's methods."""
import importlib as _importlib
import pkgutil as _pkgutil
from functools import partial
from pathlib import Path

# Where each public name is defined. The package's top level imports none of these modules: `__getattr__` imports the
# one that defines a name when the name is first used (PEP 562), so `import minifast` and the `minifast` command's
# --help do not pay for torch and matplotlib (about 3 s). tests/test_structure.py reads this table as the package's
# imports (cycles, private names) and checks that each module defines the names listed for it.
_SUBMODULES = {
    'callbacks.averaging': ('EMA', 'SWA'),
    'callbacks.control': ('EarlyStopping', 'EarlyStoppingCallback', 'ReduceLROnPlateau', 'ReduceLROnPlateauCallback',
                          'SaveModelCallback'),
    'callbacks.gradients': ('GradientAccumulation', 'GradientClipping'),
    'callbacks.logging': ('CSVLogger',),
    'callbacks.mixup': ('CutMix', 'MixUp'),
    'callbacks.lr_finder': ('LRFinder', 'LRFindResult'),
    'callbacks.progress': ('ProgressCallback', 'ShowGraph'),
    'callbacks.recorder': ('Recorder',),
    'callbacks.schedule': ('ParamScheduler',),
    'callbacks.snapshots': ('WeightSnapshots',),
    'callbacks.tracking': ('Checkpoint', 'DivergenceGuard'),
    'callbacks.trackers': ('MLflowLogger', 'TensorBoardLogger', 'Tracker', 'WandbLogger'),
    'crossval': ('CVResult', 'cross_validate', 'kfold_data', 'kfold_indices'),
    'search': ('Choice', 'IntRange', 'LogUniform', 'SearchResult', 'Uniform', 'search'),
    'checkpoint': ('CorruptCheckpointError', 'UnsafeCheckpointError'),
    'data': ('AffineWarp', 'BatchTransform', 'DataBunch', 'DatasetType', 'Dihedral', 'FlipLR', 'FlipUD',
             'ImageDataBunch', 'ImageList', 'Lighting', 'RandomCropPad', 'TensorDataLoader', 'cifar10', 'cifar100',
             'cifar_stats', 'cifar_transforms', 'get_transforms', 'imagenet_stats', 'load_cifar', 'synthetic_cifar',
             'synthetic_classification', 'synthetic_images', 'write_cifar', 'write_image_folder'),
    'export': ('CorruptExportError', 'ExportError', 'UnsafeExportError'),
    'exported': ('load_learner',),
    'data.augment': ('ZoomCrop',),
    'interpret': ('ClassificationInterpretation',),
    'tta': ('tta_views',),
    'grid': ('GridResult', 'diagnose', 'grid_search', 'read_log'),
    'lock': ('FolderLockedError',),
    'losses': ('LabelSmoothingCrossEntropy',),
    'landscape': ('InterpolationResult', 'SurfaceResult', 'average_weights', 'evaluate_weights',
                  'filter_normalized_direction', 'interpolate_losses', 'loss_surface', 'plot_interpolation',
                  'plot_surface', 'recompute_bn'),
    'determinism': ('set_seed',),
    'resume': ('resumable',),
    'core': ('EVENTS', 'CallbackException', 'Callback', 'CancelBatchException', 'CancelEpochException',
             'CancelException', 'CancelFitException', 'CancelTrainException', 'CancelValidateException',
             'DivergenceError'),
    'learner': ('Learner',),
    'data.items': ('Image', 'open_image'),
    'metrics': ('accuracy', 'error_rate', 'top_k_accuracy'),
    'models': ('AdaptiveConcatPool2d', 'Flatten', 'cifar_resnet', 'create_cnn', 'create_head', 'from_seed_state_dict',
               'resnet56', 'to_seed_state_dict'),
    'optim': ('SGD', 'AdamW', 'LayerGroup', 'layer_decay_lrs', 'module_groups', 'split_by_idx', 'split_model'),
    'data.images': ('get_image_files',),
    'summary': ('ModelSummary', 'model_summary'),
    'vision': ('cnn_learner',),
    'schedules': ('GeneralSchedule', 'Phase', 'PhaseSchedule', 'TrainingPhase', 'annealing_cos', 'annealing_exp',
                  'annealing_linear', 'annealing_no', 'one_cycle_schedule'),
}
# the modules a fastai v1 notebook expects as names after `from fastai.vision import *` (partial and Path are above)
_EXTERNAL = {'np': 'numpy', 'torch': 'torch', 'nn': 'torch.nn', 'F': 'torch.nn.functional', 'plt': 'matplotlib.pyplot'}
_WHERE = {name: mod for mod, names in _SUBMODULES.items() for name in names}

__version__ = '0.1.0'

__all__ = [
    # the library
    'Learner', 'Callback', 'EVENTS', 'CancelException', 'CancelBatchException', 'CancelTrainException',
    'CancelValidateException', 'CancelEpochException', 'CancelFitException', 'CallbackException', 'Recorder',
    'ProgressCallback', 'ShowGraph', 'CSVLogger', 'DataBunch', 'DatasetType', 'TensorDataLoader',
    'synthetic_classification',
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
    'EarlyStoppingCallback', 'ReduceLROnPlateauCallback', 'Image', 'open_image', 'load_learner', 'ExportError',
    'UnsafeExportError', 'CorruptExportError', 'cnn_learner', 'model_summary', 'ModelSummary', 'get_image_files',
    'ClassificationInterpretation', 'ZoomCrop', 'tta_views', 'MixUp', 'CutMix', 'LabelSmoothingCrossEntropy', 'EMA',
    'SWA', 'Tracker', 'TensorBoardLogger', 'MLflowLogger', 'WandbLogger', 'search', 'SearchResult', 'LogUniform',
    'Uniform', 'IntRange', 'Choice', 'cross_validate', 'CVResult', 'kfold_indices', 'kfold_data',
    # what a fastai v1 notebook expects to have after `from fastai.vision import *`
    'np', 'torch', 'nn', 'F', 'plt', 'partial', 'Path',
]


def __getattr__(name):
    """A public name (imported from its module on first use, then kept), or a submodule of the package (PEP 562)."""
    if name in _WHERE:
        value = getattr(_importlib.import_module(f'{__name__}.{_WHERE[name]}'), name)
    elif name in _EXTERNAL:
        value = _importlib.import_module(_EXTERNAL[name])
    else:
        try:  # `minifast.grid` without importing it first worked while this file imported everything: keep it
            return _importlib.import_module(f'{__name__}.{name}')
        except ModuleNotFoundError as e:
            if e.name != f'{__name__}.{name}':  # a module the submodule imports is missing: that is the error
                raise
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    globals()[name] = value
    return value


def __dir__():
    """Every public name and submodule, imported yet or not."""
    return sorted({*globals(), *__all__, *(m.name for m in _pkgutil.iter_modules(__path__))})
