"""Device resolution shared by the Learner and the loaders."""
import torch

__all__ = ['resolve_device']


def resolve_device(device=None):
    """A torch.device with its index: None picks CUDA when available; 'cuda' becomes 'cuda:N' so that comparing it
    with a tensor's device is exact."""
    d = torch.device(device if device is not None else 'cuda' if torch.cuda.is_available() else 'cpu')
    if d.type == 'cuda' and d.index is None:
        d = torch.device('cuda', torch.cuda.current_device())
    return d
