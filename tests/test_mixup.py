"""MixUp, CutMix and learn.mixup(): the mixing and the mixed loss against hand computations, fits against a
hand-written loop, validation untouched, resume exactness, errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minifast import Callback, CallbackException, CutMix, DataBunch, Learner, MixUp, accuracy
from minifast.callbacks.mixup import MixHandler
from conftest import make_data, make_mlp
from helpers import assert_same_weights
from resume_run import Interrupt, assert_identical, outcome, run


class Capture(Callback):
    """Records the RNG state and inputs before the mixer (order -30) or the mixed inputs, loss and prediction
    after it (order -5), for each training batch."""

    def __init__(self, order):
        self.order, self.rows = order, []

    def before_batch(self, learn):
        if learn.training:
            self.rows.append({'rng': torch.get_rng_state(), 'xb': learn.xb, 'yb': learn.yb})

    def after_loss(self, learn):
        if learn.training:
            self.rows[-1].update(loss=learn.loss.detach(), pred=learn.pred.detach())


def _captured_fit(learn, mixer, epochs=1):
    pre, post = Capture(-30), Capture(-5)
    torch.manual_seed(3)
    learn.fit(epochs, 1e-2, callbacks=[pre, mixer, post])
    return pre.rows, post.rows


def _hand_mixup(rng, x, alpha, per_sample=True):
    torch.set_rng_state(rng)
    perm = torch.randperm(x.shape[0])
    lam = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha)).sample((x.shape[0],) if per_sample
                                                                                     else ())
    lam = torch.max(lam, 1 - lam)
    lx = lam.view(-1, *[1] * (x.ndim - 1)) if per_sample else lam
    return perm, lam, lx * x + (1 - lx) * x[perm]


def test_mixup_mixes_each_training_batch_and_its_loss_as_by_hand():
    learn = Learner(make_data(), make_mlp(), silent=True)
    pre, post = _captured_fit(learn, MixUp(alpha=0.4))
    assert len(pre) == len(post) == 3
    for a, b in zip(pre, post):
        x, y = a['xb'][0], a['yb']
        perm, lam, mixed = _hand_mixup(a['rng'], x, 0.4)
        assert not torch.equal(perm, torch.arange(len(perm))) and (lam < 1).all() and (lam >= 0.5).all()
        torch.testing.assert_close(b['xb'][0], mixed, rtol=0, atol=1e-7)
        assert torch.equal(b['yb'], y)  # the targets stay the batch's own
        pred = b['pred']
        hand = (lam * F.cross_entropy(pred, y, reduction='none')
                + (1 - lam) * F.cross_entropy(pred, y[perm], reduction='none')).mean()
        torch.testing.assert_close(b['loss'], hand, rtol=0, atol=1e-6)
        assert not torch.allclose(b['loss'], F.cross_entropy(pred, y))


def test_mixup_with_one_lambda_per_batch_and_a_loss_without_reduction():
    calls = []

    def my_loss(pred, targ):  # takes no reduction=: per-sample mixing cannot split it by item
        calls.append(1)
        return F.cross_entropy(pred, targ) * 2

    learn = Learner(make_data(), make_mlp(), loss_func=my_loss, silent=True)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(CallbackException, match=r"MixUp: .*my_loss takes no reduction=.*per_sample=False"):
        learn.fit(1, 1e-2, callbacks=[MixUp()])
    assert not calls and all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())  # untouched
    pre, post = _captured_fit(learn, MixUp(alpha=0.4, per_sample=False))
    for a, b in zip(pre, post):
        x, y = a['xb'][0], a['yb']
        perm, lam, mixed = _hand_mixup(a['rng'], x, 0.4, per_sample=False)
        assert lam.ndim == 0
        torch.testing.assert_close(b['xb'][0], mixed, rtol=0, atol=1e-7)
        hand = lam * my_loss(b['pred'], y) + (1 - lam) * my_loss(b['pred'], y[perm])
        torch.testing.assert_close(b['loss'], hand, rtol=0, atol=1e-6)


def _image_data(n=32, bs=8, size=(6, 10)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 8, 2, *size, generator=g)
    y = torch.randint(0, 3, (n + 8,), generator=g)
    return DataBunch.from_tensors(x[:n], y[:n], x[n:], y[n:], bs=bs)


def _conv_model(n_in=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(n_in, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def test_cutmix_pastes_a_box_and_corrects_lambda_by_its_area():
    learn = Learner(_image_data(), _conv_model(), silent=True)
    pre, post = _captured_fit(learn, CutMix(alpha=1.))
    assert len(pre) == 4
    partial_boxes = 0
    for a, b in zip(pre, post):
        x, y = a['xb'][0], a['yb']
        torch.set_rng_state(a['rng'])
        perm = torch.randperm(x.shape[0])
        lam = float(torch.distributions.Beta(torch.tensor(1.), torch.tensor(1.)).sample(()))
        H, W = x.shape[2:]
        cut_h, cy = round(H * math.sqrt(1 - lam)), int(torch.randint(0, H, ()))
        cut_w, cx = round(W * math.sqrt(1 - lam)), int(torch.randint(0, W, ()))
        y1, y2 = min(max(cy - cut_h // 2, 0), H), min(max(cy + cut_h // 2, 0), H)
        x1, x2 = min(max(cx - cut_w // 2, 0), W), min(max(cx + cut_w // 2, 0), W)
        expected = x.clone()
        expected[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
        assert torch.equal(b['xb'][0], expected)
        lam_box = 1 - (y2 - y1) * (x2 - x1) / (H * W)
        partial_boxes += 0 < lam_box < 1
        pred = b['pred']
        hand = lam_box * F.cross_entropy(pred, y) + (1 - lam_box) * F.cross_entropy(pred, y[perm])
        torch.testing.assert_close(b['loss'], hand, rtol=0, atol=1e-6)
    assert partial_boxes >= 2  # the seed gives real boxes, not only empty or full ones


def test_cutmix_on_one_dimensional_signals_cuts_a_segment():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 40, generator=g), torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3))
    learn = Learner(DataBunch.from_tensors(x[:16], y[:16], x[16:], y[16:], bs=8), model, silent=True)
    pre, post = _captured_fit(learn, CutMix(alpha=1.))
    for a, b in zip(pre, post):
        x, mixed = a['xb'][0], b['xb'][0]
        torch.set_rng_state(a['rng'])
        perm = torch.randperm(x.shape[0])
        lam = float(torch.distributions.Beta(torch.tensor(1.), torch.tensor(1.)).sample(()))
        side, c = round(40 * (1 - lam)), int(torch.randint(0, 40, ()))
        lo, hi = min(max(c - side // 2, 0), 40), min(max(c + side // 2, 0), 40)
        expected = x.clone()
        expected[..., lo:hi] = x[perm][..., lo:hi]
        assert torch.equal(mixed, expected)


def _hand_mixup_loop(model, data, opt, epochs, seed, alpha):
    torch.manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for xb, yb in data.train_dl:
            perm = torch.randperm(xb.shape[0])
            lam = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha)).sample((xb.shape[0],))
            lam = torch.max(lam, 1 - lam)
            x = lam[:, None] * xb + (1 - lam[:, None]) * xb[perm]
            out = model(x)
            loss = (lam * F.cross_entropy(out, yb, reduction='none')
                    + (1 - lam) * F.cross_entropy(out, yb[perm], reduction='none')).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()


def test_fit_with_mixup_equals_a_hand_written_mixup_loop():
    data = make_data(n_train=96)
    m1, m2 = make_mlp(), make_mlp()
    learn = Learner(data, m1, wd=0.1, silent=True).mixup(alpha=0.4)
    torch.manual_seed(1)
    learn.fit(3, 1e-2)
    _hand_mixup_loop(m2, data, torch.optim.AdamW(m2.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1), 3,
                     1, 0.4)
    assert_same_weights(m1, m2, atol=1e-6)
    m3 = make_mlp()  # and the mixing mattered: a plain fit ends elsewhere
    learn3 = Learner(data, m3, wd=0.1, silent=True)
    torch.manual_seed(1)
    learn3.fit(3, 1e-2)
    assert not torch.allclose(m1[0].weight, m3[0].weight, atol=1e-3)


def test_mixed_targets_equal_the_mixed_loss_for_cross_entropy():
    """stack_y=False (v1) mixes the targets as probabilities; for cross-entropy that is the same loss."""
    data = make_data(n_train=64)
    m1, m2 = make_mlp(), make_mlp()
    seen = []

    class Targets(Callback):
        order = -5

        def after_loss(self, learn):
            if learn.training:
                seen.append(learn.yb)

    for m, stack_y, cbs in ((m1, True, []), (m2, False, [Targets()])):
        learn = Learner(data, m, silent=True).mixup(stack_y=stack_y)
        torch.manual_seed(1)
        learn.fit(2, 1e-2, callbacks=cbs)
    assert_same_weights(m1, m2, atol=1e-6)
    assert seen[0].shape == (16, 3) and seen[0].is_floating_point()
    torch.testing.assert_close(seen[0].sum(1), torch.ones(16))


def test_stack_x_gives_the_model_both_inputs_and_lambda():
    class SelfMixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_mlp()

        def forward(self, x, x2=None, lam=None):
            if x2 is not None:
                x = lam[:, None] * x + (1 - lam[:, None]) * x2
            return self.body(x)

    data = make_data(n_train=64)
    m1, m2 = SelfMixing(), SelfMixing()
    for m, stack_x in ((m1, True), (m2, False)):
        learn = Learner(data, m, silent=True).mixup(stack_x=stack_x)
        torch.manual_seed(1)
        learn.fit(2, 1e-2)
    assert_same_weights(m1, m2, atol=1e-6)


def test_validation_is_never_mixed_and_accuracy_works():
    data = make_data(n_train=64)
    learn = Learner(data, make_mlp(), metrics=[accuracy], silent=True)
    plain = learn.validate()
    learn.mixup()
    assert learn.validate() == plain  # a MixUp in learn.callbacks changes no validation
    torch.manual_seed(0)
    learn.fit(2, 1e-2)
    rec = learn.recorder
    assert len(rec.metrics) == 2 and all(0 <= row[0] <= 1 for row in rec.metrics)
    after = learn.validate()
    other = Learner(data, learn.model, metrics=[accuracy], silent=True).validate()  # no MixUp anywhere
    assert after == other
    assert rec.val_losses[-1] == pytest.approx(after[0], abs=1e-6) and rec.metrics[-1][0] == pytest.approx(after[1])


class ValidateInside(Callback):
    """Runs learn.validate() between the mix and the loss of a training batch."""
    def __init__(self):
        self.losses = []

    def after_pred(self, learn):
        if learn.training and learn.iter == 1:
            self.losses.append(learn.validate()[0])


def test_a_validate_inside_a_training_batch_is_plain_and_the_batch_stays_mixed():
    data = make_data(n_train=64)
    m1, m2 = make_mlp(), make_mlp()
    inside = ValidateInside()
    for m, cbs in ((m1, [inside]), (m2, [])):
        learn = Learner(data, m, silent=True).mixup()
        torch.manual_seed(1)
        learn.fit(1, 1e-2, callbacks=cbs)
    assert_same_weights(m1, m2)


def test_loss_func_is_the_same_object_after_a_fit_an_error_and_an_interrupt():
    loss = nn.CrossEntropyLoss()
    learn = Learner(make_data(), make_mlp(), loss_func=loss, silent=True).mixup()
    learn.fit(1, 1e-2)
    assert learn.loss_func is loss and loss.reduction == 'mean'
    with pytest.raises(RuntimeError, match='simulated crash'):
        learn.fit(2, 1e-2, callbacks=[Interrupt(1)])
    assert learn.loss_func is loss and loss.reduction == 'mean'
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, 1e-2, callbacks=[Interrupt(1, KeyboardInterrupt)])
    assert learn.loss_func is loss and loss.reduction == 'mean'
    learn.get_preds(with_loss=True)  # after the fit, the learner's loss is plain: per-item losses, softmax


def test_lr_find_with_mixup_in_the_callbacks_sweeps_and_puts_everything_back():
    data = make_data(n_train=96)
    learn = Learner(data, make_mlp(), silent=True).mixup()
    cb, loss, before = learn.callbacks[0], learn.loss_func, {k: v.clone() for k, v in learn.model.state_dict().items()}
    torch.manual_seed(0)
    res = learn.lr_find(num_it=12, stop_div=False)
    assert all(math.isfinite(v) for v in res.losses) and len(res.losses) == 12
    assert learn.callbacks == [cb] and learn.loss_func is loss
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())


def test_resume_with_mixup_is_identical_to_the_uninterrupted_run(tmp_path):
    reference = outcome(run(tmp_path / 'ref', extra=[MixUp(alpha=0.4)]))
    plain = outcome(run(tmp_path / 'plain'))
    assert not torch.equal(reference['model']['0.weight'], plain['model']['0.weight'])  # MixUp took part
    with pytest.raises(RuntimeError, match='simulated crash'):
        run(tmp_path / 'b', extra=[MixUp(alpha=0.4), Interrupt(6)])  # checkpoint at step 4, inside epoch 0
    assert_identical(reference, outcome(run(tmp_path / 'b', extra=[MixUp(alpha=0.4)], resume='checkpoints')))


def test_learn_mixup_adds_one_mixup_and_returns_the_learner():
    learn = Learner(make_data(), make_mlp(), silent=True)
    assert learn.mixup() is learn
    (cb,) = learn.callbacks
    assert isinstance(cb, MixUp) and cb.alpha == 0.4 and cb.stack_y and not cb.stack_x and cb.per_sample
    learn.callbacks.append(CutMix())
    learn.mixup(alpha=0.2, stack_y=False)  # replaces the mixers there
    (cb,) = learn.callbacks
    assert isinstance(cb, MixUp) and cb.alpha == 0.2 and not cb.stack_y
    assert MixUp(0.3).alpha == 0.3 and MixUp(learn, alpha=0.3).learn is learn  # v1: the learner comes first


def test_mixers_refuse_what_they_cannot_mix():
    with pytest.raises(ValueError, match='MixUp: alpha must be a positive finite number'):
        MixUp(alpha=0)
    with pytest.raises(ValueError, match='CutMix: alpha'):
        CutMix(alpha=float('inf'))
    learn = Learner(make_data(), make_mlp(), silent=True)
    with pytest.raises(Exception, match=r'2 mixing callbacks in one fit \(MixUp, CutMix\)'):
        learn.fit(1, callbacks=[MixUp(), CutMix()])
    with pytest.raises(Exception, match=r'CutMix cuts boxes .* got \(16, 8\) torch.float32'):
        learn.fit(1, callbacks=[CutMix()])
    g = torch.Generator().manual_seed(0)
    ints = DataBunch.from_tensors(torch.randint(0, 5, (32, 8), generator=g), torch.randint(0, 3, (32,)), bs=16)
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(24, 3))
    with pytest.raises(Exception, match='MixUp blends floating-point inputs; input 0 of the batch is torch.int64'):
        Learner(ints, emb, silent=True).fit(1, callbacks=[MixUp()])
    assert issubclass(MixUp, MixHandler) and issubclass(CutMix, MixHandler)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_mixing_on_the_gpu_syncs_nothing():
    dev = torch.device('cuda')
    for mixer, model, data in ((MixUp(), make_mlp(), make_data()), (CutMix(), _conv_model(), _image_data())):
        learn = Learner(data, model, device=dev, silent=True, check_finite=False)
        learn.fit(1, 1e-2, callbacks=[mixer])  # warm up (first-batch checks sync)

        class SyncsOff(Callback):  # from before the mixer's before_batch to after its after_loss
            order = -30

            def before_batch(self, learn):
                if learn.training and learn.iter > 0:
                    torch.cuda.set_sync_debug_mode('error')

        class SyncsOn(Callback):
            order = -15

            def after_loss(self, learn):
                torch.cuda.set_sync_debug_mode(0)

        try:
            learn.fit(1, 1e-2, callbacks=[mixer, SyncsOff(), SyncsOn()])
        finally:
            torch.cuda.set_sync_debug_mode(0)
