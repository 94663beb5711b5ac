"""`load_learner`: a Learner built again from a folder written by `learn.export`, for inference, with no pickle.

(It lives apart from minifast.export because it imports the Learner, and learner.py binds `export` from there.)
"""
from pathlib import Path

from .export import export_folder, read_export
from .learner import Learner

__all__ = ['load_learner']


def load_learner(path='.', file='export', test=None, device='cpu', trust=()):
    """fastai v1's load_learner: the Learner that `learn.export(file)` saved in path/file (an absolute `file` is
    used as it is), on `device`, with no training data: it predicts (`predict`, `get_preds(dl=...)`) exactly as the
    exported learner did, and cannot be trained (fit says how to get a learner that can).

    The export is checked before anything in it is used, and refused with an error naming the file: a weights file
    whose size, sha256 or checksum differs from what was written (CorruptExportError), a manifest that is not valid
    JSON or lacks fields, weights whose keys or shapes do not fit the model, or a model factory or loss outside the
    modules minifast trusts (minifast, torchvision.models, torch.nn) and the module prefixes in `trust`
    (UnsafeExportError): such a module is never imported. Weights are read with torch's weights-only loader.

    `test` (a folder, an ImageList or a list of image files, as fastai v1's `test=`) becomes the data's test set:
    `learn.get_preds(DatasetType.Test)` then predicts it.
    """
    folder = export_folder(path, file)
    model, data, loss_func, manifest = read_export(folder, device=device, trust=trust)
    precision = manifest.get('precision')
    learn = Learner(data, model, loss_func=loss_func, path=Path(path) if file is not None and not
                    Path(file).is_absolute() else folder.parent, device=device, bf16=precision == 'bf16',
                    fp16=precision == 'fp16')
    learn.exported = manifest  # what the export recorded (factory, data spec, versions), for reference
    if test is not None:
        learn.data.add_test(test)
    return learn
