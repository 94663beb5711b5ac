"""The restructured pieces, each against a reference: README's worked example (a user callback replacing the
built-in gradient clipping) against a hand-written loop, the policies bound on Learner, the per-pass loop state,
the snapshot primitive, the stepper and the local distribution strategy."""
import inspect
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from minifast import Callback, Learner as _Learner, policies
from minifast.core import CancelBatchException, CancelException, Hooks
from minifast.distributed import Local
from minifast.learner import LoopState
from minifast.optim import SGD
from minifast.state import PARTS, Snapshot, preserved
from minifast.stepper import Stepper
from conftest import make_data, make_mlp, reference_fit

Learner = partial(_Learner, device='cpu', silent=True)


class ClipValue(Callback):
    """Clip every gradient element to [-value, value] before each step (README's example)."""

    def __init__(self, value):
        self.value = value

    def after_backward(self, learn):
        learn.stepper.unscale(learn.opt)  # fp16: true gradients (nothing to do in other precisions)
        torch.nn.utils.clip_grad_value_(learn.model.parameters(), self.value)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_a_user_clipping_callback_replaces_the_built_in_one_and_equals_a_hand_written_loop(precision):
    data, value = make_data(n_train=96), 1e-3  # below most gradient elements: every step is clipped
    learn = Learner(data, make_mlp(), opt_func=SGD, wd=0., fp16=precision == 'fp16')
    torch.manual_seed(3)
    learn.fit(2, 1e-1, callbacks=[ClipValue(value)])
    m = make_mlp()
    opt = torch.optim.SGD(m.parameters(), lr=1e-1, momentum=0.9)
    if precision == 'fp32':
        reference_fit(m, data, opt, 2, 3, before_step=lambda: torch.nn.utils.clip_grad_value_(m.parameters(), value))
    else:
        scaler = torch.amp.GradScaler('cpu')
        torch.manual_seed(3)
        for _ in range(2):
            for xb, yb in data.train_dl:
                with torch.autocast('cpu', dtype=torch.float16):
                    loss = F.cross_entropy(m(xb), yb)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_value_(m.parameters(), value)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
        assert learn.stepper.scaler.get_scale() == scaler.get_scale()
    for p, q in zip(_params(learn.model), _params(m)):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    unclipped = Learner(data, make_mlp(), opt_func=SGD, wd=0.)
    torch.manual_seed(3)
    unclipped.fit(2, 1e-1)
    assert max((p - q).abs().max().item() for p, q in zip(_params(unclipped.model), _params(m))) > 1e-4


def test_policies_are_bound_on_the_learner_with_the_shared_arguments_documented_once():
    names = ['fit_one_cycle', 'fit_sgdr', 'fit_clr', 'fit_step', 'fit_exp', 'fit_warmup_cosine', 'fit_flat_cos',
             'fit_fc', 'fit_phases', 'lr_find']
    for name in names:
        assert getattr(_Learner, name) is getattr(policies, name)
    for name in names[:-1]:
        doc, params = getattr(policies, name).__doc__, inspect.signature(getattr(policies, name)).parameters
        assert doc.count(policies.FIT_ARGS.strip()) == 1, name
        assert {'wd', 'callbacks', 'resume', 'clip'} <= set(params), name


def test_fit_flat_cos_takes_the_clear_name_and_the_old_ones():
    data = make_data()
    runs = []
    for call in (lambda l: l.fit_flat_cos(2, 1e-2, final_div=100.), lambda l: l.fit_fc(2, 1e-2, div_final=100.),
                 lambda l: l.fit_fc(2, 1e-2, 0.75, 100.)):
        learn = Learner(data, make_mlp())
        torch.manual_seed(0)
        call(learn)
        runs.append(learn)
    lrs = [r.recorder.lrs for r in runs]
    default = Learner(data, make_mlp())
    default.fit_flat_cos(2, 1e-2)  # final_div 1e5: anneals further than 100
    assert lrs[0] == lrs[1] == lrs[2] and default.recorder.lrs[-1] < lrs[0][-1] < lrs[0][0]
    with pytest.raises(TypeError, match='give final_div or its older name div_final, not both'):
        Learner(data, make_mlp()).fit_flat_cos(1, final_div=10., div_final=10.)


def test_validate_inside_a_fit_swaps_the_loop_state_and_puts_the_fits_back():
    seen = {}

    class Probe(Callback):
        def after_batch(self, learn):
            if learn.training and learn.iter == 1 and 'outer' not in seen:
                outer = learn.state
                seen['outer'] = (outer, learn.xb, learn.loss, learn.iter, learn.hooks)
                seen['valid'] = learn.validate()
                seen['after'] = (learn.state, learn.xb, learn.loss, learn.iter, learn.hooks)

    learn = Learner(make_data(), make_mlp(), callbacks=[Probe()])
    learn.fit(1, 1e-2)
    assert all(a is b for a, b in zip(seen['outer'], seen['after']))
    assert len(seen['valid']) == 1 and math.isfinite(seen['valid'][0])
    assert learn.hooks is None and isinstance(learn.state, LoopState)
    assert set(LoopState.__slots__) >= {'xb', 'yb', 'pred', 'loss', 'iter', 'n_iter', 'dl', 'training', 'hooks'}


@pytest.mark.parametrize('part', PARTS)
def test_each_snapshot_part_is_put_back_and_only_it(part):
    learn = Learner(make_data(), make_mlp(), opt_func=SGD, fp16=True)
    learn.fit(1, 1e-2)  # an optimizer with momentum state, a scaler with a scale
    model = learn.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    snap = Snapshot.take(learn, parts=(part,))
    if part == 'rng':
        want = torch.rand(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.)
            p.grad = torch.ones_like(p)
            p.requires_grad_(False)
    model.eval()
    state = learn.opt.state_dict()
    learn.opt.param_groups[0]['lr'] = 123.
    learn.stepper.scaler.update(1.)
    learn.stepper.n_acc = 7
    snap.restore()
    restored = {
        'weights': all(torch.equal(v, before[k]) for k, v in model.state_dict().items()),
        'buffers': True,  # an MLP has no buffers: nothing to change
        'grads': all(p.grad is None or not torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters()),
        'modes': model.training,
        'trainable': all(p.requires_grad for p in model.parameters()),
        'opt': learn.opt.param_groups[0]['lr'] != 123.,
        'scaler': learn.stepper.scaler.get_scale() != 1.,
        'stepper': learn.stepper.n_acc == 1,
        'rng': torch.equal(torch.rand(3), want) if part == 'rng' else True,
    }
    assert restored[part]
    others = [k for k, v in restored.items() if v and k not in (part, 'buffers', 'rng')]
    assert others == [], f'{part} also restored {others}'
    del state


def test_preserved_restores_on_an_error_and_discard_keeps_the_changes():
    learn = Learner(make_data(), make_mlp())
    w = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(RuntimeError, match='boom'):
        with preserved(learn, parts=('weights',)):
            with torch.no_grad():
                learn.model[0].weight.add_(1.)
            raise RuntimeError('boom')
    assert all(torch.equal(p, q) for p, q in zip(learn.model.parameters(), w))
    with preserved(learn, parts=('weights',)) as snap:
        with torch.no_grad():
            learn.model[0].weight.add_(1.)
        snap.discard()
    assert not torch.equal(learn.model[0].weight, w[0])
    with pytest.raises(ValueError, match=r"unknown parts \['weight'\]"):
        Snapshot.take(learn, parts=('weight',))


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


def test_local_strategy_changes_nothing():
    local, dl, t = Local(), object(), torch.ones(3)
    assert (local.world, local.rank, local.is_main) == (1, 0, True)
    assert local.loader(dl, True) is dl and local.reduce(t) is t and local.setup(None) is None
    with local.no_sync():
        pass
    assert Learner(make_data(), make_mlp()).dist.world == 1


def test_every_cancel_has_one_base_and_a_hook_table_reports_the_pending_cancel():
    from minifast import (CancelBatchException, CancelEpochException, CancelFitException, CancelTrainException,
                          CancelValidateException)
    for c in (CancelBatchException, CancelEpochException, CancelFitException, CancelTrainException,
              CancelValidateException):
        assert issubclass(c, CancelException)
    pending = []

    class A(Callback):
        order = 1

        def after_batch(self, learn):
            raise CancelBatchException()

    class B(Callback):
        order = 2

        def after_batch(self, learn):
            pending.append(hooks.pending_cancel)

    hooks = Hooks([B(), A()])
    assert [n for n, _ in hooks.table['after_batch']] == ['A.after_batch', 'B.after_batch']
    with pytest.raises(CancelBatchException):
        hooks(None, 'after_batch')
    assert isinstance(pending[0], CancelBatchException) and hooks.pending_cancel is None
