"""DataBunch.from_tensors: lengths and batch sizes are checked."""
import pytest
import torch

from minifast import DataBunch


def test_from_tensors_length_mismatch():
    with pytest.raises(ValueError, match=r'x_train has 10 items but y_train has 9'):
        DataBunch.from_tensors(torch.zeros(10, 2), torch.zeros(9))
    with pytest.raises(ValueError, match=r'x_valid and y_valid must be given together'):
        DataBunch.from_tensors(torch.zeros(10, 2), torch.zeros(10), torch.zeros(3, 2))


@pytest.mark.parametrize('kw, msg', [(dict(bs=2.5), r'batch_size must be an integer >= 1, got 2\.5'),
                                     (dict(bs=0), r'batch_size must be an integer >= 1, got 0'),
                                     (dict(val_bs=0), r'batch_size must be an integer >= 1, got 0')])
def test_from_tensors_bad_batch_sizes(kw, msg):
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    with pytest.raises(ValueError, match=msg):
        DataBunch.from_tensors(x, y, x, y, **kw)
