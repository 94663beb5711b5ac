"""Atomic saving and safe loading of state files."""
import os
import tempfile
from pathlib import Path

import torch

__all__ = ['atomic_save', 'load_state', 'check_state_dict']


def atomic_save(obj, file):
    """torch.save `obj` to `file` through a temporary file in the same folder and os.replace.

    A write that fails (disk full, interrupt) leaves any previous file intact and no partial file behind.
    """
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{file.name}.', suffix='.tmp', dir=file.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return file


def load_state(file, device=None):
    """Load a file written by `atomic_save` (or a plain state dict) with torch's weights-only unpickler."""
    file = Path(file)
    if not file.exists():
        near = sorted(p.name for p in file.parent.glob('*.pth')) if file.parent.exists() else []
        raise FileNotFoundError(f"no such file: {file}" + (f" (files there: {', '.join(near)})" if near else ''))
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f'{file} could not be loaded as a minifast/torch state file: {e}') from e


def check_state_dict(model, sd, file, strict=True):
    """Raise, naming `file` and the mismatched keys/shapes, unless `sd` loads into `model` cleanly."""
    if not isinstance(sd, dict):
        raise ValueError(f'{file} holds a {type(sd).__name__}, not a state dict')
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f'{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}'
              for k, v in own.items() if k in sd and hasattr(sd[k], 'shape') and sd[k].shape != v.shape]
    problems = []
    if strict and missing:
        problems.append(f'missing keys {missing[:5]}' + (f' and {len(missing) - 5} more' if len(missing) > 5 else ''))
    if strict and unexpected:
        problems.append(f'unexpected keys {unexpected[:5]}' + (f' and {len(unexpected) - 5} more'
                                                                 if len(unexpected) > 5 else ''))
    if shapes:
        problems.append('shape mismatch ' + '; '.join(shapes[:5]))
    if problems:
        raise ValueError(f'{file} does not match the model ({type(model).__name__}): ' + '; '.join(problems)
                         + '. The model was left unchanged.')
