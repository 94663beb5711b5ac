"""The Stepper (minifast/stepper.py): precision, accumulation and the optimizer step; the loop's steps against a
hand-written loop (fp16, clipping and accumulation are tested in test_gradients.py and test_fastpath.py)."""
from functools import partial

import torch

from minifast import Learner as _Learner
from minifast.optim import SGD
from minifast.stepper import Stepper
from conftest import make_data, make_mlp, reference_fit

Learner = partial(_Learner, device='cpu', silent=True)


def test_stepper_without_accumulation_steps_as_a_hand_written_loop_does():
    data = make_data()
    learn = Learner(data, make_mlp(), opt_func=SGD, wd=0.)
    torch.manual_seed(1)
    learn.fit(1, 1e-2)
    m = make_mlp()
    reference_fit(m, data, torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9), 1, 1)
    for p, q in zip(learn.model.parameters(), m.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    st = Stepper(torch.device('cpu'))
    assert (st.amp, st.scaler, st.n_acc, st.stepping) == (False, None, 1, True)
    st.set_precision('fp16')
    assert st.amp and st.fp16 and isinstance(st.scaler, torch.amp.GradScaler)
    st.set_precision('bf16')
    assert st.bf16 and st.scaler is None and st.state_dict() is None
