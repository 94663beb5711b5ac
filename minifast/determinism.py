"""Seeds and random-number-generator states: set_seed, deterministic mode, and RNG states that checkpoints carry."""
import os
import random
import warnings

import numpy as np
import torch

__all__ = ['set_seed', 'rng_state', 'set_rng_state']


def set_seed(seed, deterministic=False):
    """Seed Python's `random`, numpy's global RNG and torch (CPU and every CUDA device).

    Two runs after the same `set_seed` give identical losses on CPU. On a GPU some kernels (cuDNN convolution
    algorithms picked by benchmark, atomics in scatter/index_add backward) differ from run to run; with
    `deterministic=True` torch is put in its deterministic mode: `torch.use_deterministic_algorithms(True)`,
    cudnn.deterministic on and cudnn.benchmark off, and CUBLAS_WORKSPACE_CONFIG=:4096:8 (set before the first cuBLAS
    call: call set_seed at the top of the script or notebook). That costs speed, and an operation without a
    deterministic implementation then raises an error naming it. `deterministic=False` leaves those settings alone.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ValueError(f'set_seed: seed must be an integer in [0, 2**32), got {seed!r}')
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too (lazily when CUDA is not initialised yet)
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return seed


def rng_state():
    """The global RNG states (torch CPU, CUDA when initialised, numpy, random) as tensors and plain Python values,
    so that a file holding them loads with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        'random': random.getstate(),
    }


def set_rng_state(state):
    """Restore states from `rng_state()`."""
    torch.set_rng_state(state['torch'])
    cuda = state.get('cuda')
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            warnings.warn(f'the saved RNG state has {len(cuda)} CUDA device(s) but this machine has '
                          f'{torch.cuda.device_count()}: the CUDA RNG states were not restored')
        else:
            torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    r = state['random']
    random.setstate((r[0], tuple(r[1]), r[2]))
