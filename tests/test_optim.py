"""Parameter groups and the optimizer: splitting into layer groups, slice and layer-decay LRs, weight-decay modes
against torch's optimizers, freezing, per-module settings, the optimizer across fits, summary."""
from collections import OrderedDict
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minifast import Learner
from minifast.optim import (LayerGroup, create_opt, freeze, freeze_to, group_lrs, layer_decay_lrs, lr_per_group,
                            module_groups, param_groups, param_summary, set_training_mode, split, split_by_idx,
                            split_model, unfreeze)
from conftest import make_data, make_mlp, reference_fit
from helpers import assert_same_weights, learner_fit


def bn_net(seed=0):
    """Three blocks: Linear+BN+ReLU, Linear+BN+ReLU, Linear (the head)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def named_net(seed=0):
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    return nn.Sequential(OrderedDict(encoder=enc, head=nn.Linear(16, 3)))


def learner(model, layer_groups=None, **kw):
    return Learner(make_data(n_train=64), model, layer_groups=layer_groups, silent=True, device='cpu', **kw)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def ids(ps):
    return [id(p) for p in ps]


# ---- layer groups ---------------------------------------------------------------------------------------------
def test_split_by_idx_cuts_a_sequential_and_shares_its_modules():
    m = bn_net()
    groups = split_by_idx(m, 3, 6)
    assert [len(g) for g in groups] == [3, 3, 1]
    assert groups[1][0] is m[3] and groups[2][0] is m[6]
    assert split_by_idx(m, m[3], -1)[1][0] is m[3]  # a child module or a negative index as cut point
    assert ids(p for g in groups for p in g.parameters()) == ids(m.parameters())
    with pytest.raises(ValueError, match='strictly increasing cut points between 1 and 6'):
        split_by_idx(m, 6, 3)
    with pytest.raises(ValueError, match='between 1 and 6'):
        split_by_idx(m, 0)
    with pytest.raises(TypeError, match='cuts an nn.Sequential; got a Linear'):
        split_by_idx(nn.Linear(2, 2), 1)


def test_split_by_idx_cuts_a_sequential_subclass_with_its_own_init():
    class Net(nn.Sequential):  # as create_cnn's BodyHead: slicing it with m[a:b] would call Net(OrderedDict)
        def __init__(self, body, head, extra):
            super().__init__(body, head)
            self.extra = extra

    m = Net(nn.Linear(2, 3), nn.Linear(3, 1), extra=0)
    groups = split_by_idx(m, 1)
    assert [type(g) for g in groups] == [nn.Sequential, nn.Sequential]
    assert groups[0][0] is m[0] and groups[1][0] is m[1] and list(groups[1]._modules) == ['1']


def test_split_model_sources_and_coverage_check():
    m = bn_net()
    assert split_model(m) == [m]
    groups = split_model(m, lambda model: [model[:3], [model[3], model[4]], model[6]])
    assert isinstance(groups[1], LayerGroup) and ids(groups[1].parameters()) == ids([*m[3].parameters(),
                                                                                      *m[4].parameters()])
    assert [len(list(g.parameters())) for g in split_model(m, [3, 6])] == [4, 4, 2]

    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def layer_groups(self):
            return [self.body, self.head]
    own = Own()
    assert split_model(own) == [own.body, own.head]
    stored = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    stored.split = lambda model: [model[0], model[1]]  # a function stored on the model gets the model
    assert split_model(stored) == [stored[0], stored[1]]

    with pytest.raises(ValueError, match=r'2 parameters of the model are in no layer group.*6\.weight, 6\.bias'):
        split_model(m, lambda model: [model[:3], model[3:6]])
    with pytest.raises(ValueError, match=r'layer group 1 \(ReLU\) has no parameters'):
        split_model(m, lambda model: [model, model[2]])
    with pytest.raises(TypeError, match='expected modules, got a Parameter'):
        split_model(m, lambda model: [list(model.parameters())])


def test_split_on_a_learner_resets_the_optimizer():
    m = bn_net()
    learn = learner(m)
    learn.fit(1, 1e-3)
    split(learn, [3, 6])
    assert len(learn.layer_groups) == 3 and learn.opt is None
    learn.fit(1, slice(1e-4, 1e-2))
    assert sorted({g['layer_group'] for g in learn.opt.param_groups}) == [0, 1, 2]


# ---- learning rates per group ---------------------------------------------------------------------------------
def test_slice_lrs_per_group_exact():
    assert lr_per_group(slice(1e-4, 1e-2), 3) == pytest.approx([1e-4, 1e-3, 1e-2], rel=1e-12)
    assert lr_per_group(slice(1e-2), 3) == pytest.approx([1e-3, 1e-3, 1e-2], rel=1e-12)
    m = bn_net()
    learn = learner(m, split_by_idx(m, 3, 6), bn_wd=False)  # two param groups per layer group
    learn.fit(1, slice(1e-5, 1e-3))
    lrs = {g['layer_group']: g['lr'] for g in learn.opt.param_groups}
    assert [lrs[i] for i in range(3)] == pytest.approx([1e-5, 1e-4, 1e-3], rel=1e-12)
    assert all(g['lr'] == lrs[g['layer_group']] for g in learn.opt.param_groups)


def test_layer_decay_lrs_exact_and_through_the_learner():
    assert layer_decay_lrs(1e-4, 3, 0.75) == pytest.approx([1e-4 * 0.75 ** 2, 7.5e-5, 1e-4], rel=1e-12)
    assert layer_decay_lrs(1e-4, 3, 0.) == [0., 0., 1e-4]  # seed 000: only the head learns
    assert layer_decay_lrs(1e-4, 3, 1.) == [1e-4] * 3
    with pytest.raises(ValueError, match='layer_decay must be >= 0'):
        layer_decay_lrs(1e-4, 3, -0.5)
    m = bn_net()
    learn = learner(m, split_by_idx(m, 3, 6))
    assert group_lrs(learn, 1e-3) == [1e-3] * 3  # no layer_decay on the learner: plain lr_per_group
    learn.layer_decay = 0.5
    assert group_lrs(learn, 1e-3) == pytest.approx([2.5e-4, 5e-4, 1e-3], rel=1e-12)
    assert group_lrs(learn, [1., 2., 3.]) == [1., 2., 3.]  # explicit values (as fit_one_cycle passes on) as given
    with pytest.raises(ValueError, match='both spread the lr'):
        group_lrs(learn, slice(1e-4, 1e-3))
    create_opt(learn, 1e-3)
    assert [g['lr'] for g in learn.opt.param_groups] == pytest.approx([2.5e-4, 5e-4, 1e-3], rel=1e-12)
    learn.fit(1, group_lrs(learn, 4e-3))
    assert [g['lr'] for g in learn.opt.param_groups] == pytest.approx([1e-3, 2e-3, 4e-3], rel=1e-12)


def test_bn_wd_false_with_several_layer_groups_equals_reference():
    m1, m2 = bn_net(), bn_net()
    learn = learner(m1, split_by_idx(m1, 3, 6), bn_wd=False, wd=0.1)
    torch.manual_seed(7)
    learn.fit(2, slice(1e-3, 1e-2))
    pgs = learn.opt.param_groups
    assert [(g['layer_group'], g['decay'], g['wd']) for g in pgs] == [
        (0, True, 0.1), (0, False, 0.), (1, True, 0.1), (1, False, 0.), (2, True, 0.1), (2, False, 0.)]
    assert ids(pgs[0]['params']) == ids([m1[0].weight])
    assert ids(pgs[1]['params']) == ids([m1[0].bias, m1[1].weight, m1[1].bias])
    lrs = lr_per_group(slice(1e-3, 1e-2), 3)
    ref = torch.optim.AdamW([
        {'params': [m2[0].weight], 'lr': lrs[0], 'weight_decay': 0.1},
        {'params': [m2[0].bias, m2[1].weight, m2[1].bias], 'lr': lrs[0], 'weight_decay': 0.},
        {'params': [m2[3].weight], 'lr': lrs[1], 'weight_decay': 0.1},
        {'params': [m2[3].bias, m2[4].weight, m2[4].bias], 'lr': lrs[1], 'weight_decay': 0.},
        {'params': [m2[6].weight], 'lr': lrs[2], 'weight_decay': 0.1},
        {'params': [m2[6].bias], 'lr': lrs[2], 'weight_decay': 0.}], lr=1e-3, betas=(0.9, 0.99))
    reference_fit(m2, learn.data, ref, 2, 7)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)


# ---- freezing -------------------------------------------------------------------------------------------------
OPTS = {'adamw_native_true_wd': dict(),  # AdamW's own decoupled decay
        'sgd_manual_true_wd': dict(opt_func=partial(torch.optim.SGD, momentum=0.9)),  # WeightDecay._decay
        'adam_l2': dict(opt_func=torch.optim.Adam, true_wd=False)}  # L2 added to the gradient


@pytest.mark.parametrize('opt', OPTS)
def test_frozen_groups_do_not_change_but_bn_trains_and_tracks_stats(opt):
    m = bn_net()
    learn = learner(m, split_by_idx(m, 3, 6), wd=0.5, **OPTS[opt])  # a big wd: any decay would show
    freeze(learn)
    assert not m[0].weight.requires_grad and m[1].weight.requires_grad and m[6].weight.requires_grad
    before = snapshot(m)
    learn.fit(2, 1e-2)
    after = snapshot(m)
    for k in ('0.weight', '0.bias', '3.weight', '3.bias'):
        assert torch.equal(before[k], after[k]), k  # frozen: bit-for-bit, no update and no weight decay
    for k in ('1.weight', '1.bias', '4.weight', '4.bias', '6.weight', '6.bias',  # BN of frozen groups trains
              '1.running_mean', '1.running_var', '4.running_mean'):  # and its running stats still update
        assert not torch.equal(before[k], after[k]), k
    unfreeze(learn)
    assert all(p.requires_grad for p in m.parameters())
    learn.fit(1, 1e-2)
    assert not torch.equal(after['0.weight'], m[0].weight) and not torch.equal(after['3.bias'], m[3].bias)


def test_train_bn_false_freezes_bn_weights_but_stats_still_update():
    m = bn_net()
    learn = learner(m, split_by_idx(m, 3, 6))
    freeze_to(learn, 2, train_bn=False)
    before = snapshot(m)
    learn.fit(1, 1e-2)
    after = snapshot(m)
    assert all(torch.equal(before[k], after[k]) for k in ('1.weight', '1.bias', '4.weight', '0.weight'))
    assert not torch.equal(before['1.running_mean'], after['1.running_mean'])
    assert not torch.equal(before['6.weight'], after['6.weight'])


@pytest.mark.skipif(not hasattr(nn, 'RMSNorm'), reason='nn.RMSNorm needs torch >= 2.4')
def test_rms_norm_is_a_norm_layer_for_bn_wd_and_freeze():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.RMSNorm(16), nn.ReLU(), nn.Linear(16, 3))
    learn = learner(m, split_by_idx(m, 2), bn_wd=False)
    no_wd = [p for g in param_groups(learn.layer_groups, bn_wd=False) if not g['decay'] for p in g['params']]
    assert ids(no_wd) == ids([m[0].bias, m[1].weight, m[3].bias])  # no decay, like LayerNorm's weight
    freeze(learn)
    assert not m[0].weight.requires_grad and m[1].weight.requires_grad  # trains in a frozen group (train_bn)


def test_freeze_to_ranges_and_training_modes():
    m = bn_net()
    learn = learner(m, split_by_idx(m, 3, 6))
    trainable = lambda: [m[i].weight.requires_grad for i in (0, 1, 3, 4, 6)]  # noqa: E731
    freeze_to(learn, 1)
    assert trainable() == [False, True, True, True, True]
    freeze_to(learn, -2, train_bn=False)
    assert trainable() == [False, False, True, True, True]
    freeze_to(learn, 3)  # everything frozen but the BatchNorm layers
    assert trainable() == [False, True, False, True, False]
    set_training_mode(learn, 'full')
    assert trainable() == [True] * 5
    set_training_mode(learn, 'head_only', train_bn=False)
    assert trainable() == [False, False, False, False, True]
    with pytest.raises(ValueError, match="expected 'head_only'"):
        set_training_mode(learn, 'head')
    with pytest.raises(ValueError, match=r'freeze_to\(4\): the learner has 3 layer groups'):
        freeze_to(learn, 4)
    for bad in (1.5, None, True):  # was "'float' object cannot be interpreted as an integer", naming no function
        with pytest.raises(TypeError, match=r'freeze_to\(.*\): n must be an int'):
            freeze_to(learn, bad)
    one = learner(bn_net())
    with pytest.warns(UserWarning, match='single layer group, so nothing is frozen'):
        freeze(one)
    assert all(p.requires_grad for p in one.model.parameters())


def test_freeze_clears_stale_gradients():
    m = bn_net()
    learn = learner(m, split_by_idx(m, 3, 6))
    F.cross_entropy(m(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])).backward()
    freeze(learn)
    assert m[0].weight.grad is None and m[6].weight.grad is not None


# ---- per-module settings --------------------------------------------------------------------------------------
def test_module_groups_settings_reach_the_optimizer_and_match_a_reference():
    m1, m2 = named_net(), named_net()
    spec = {'encoder': dict(lr_mult=0.1), 'head': dict(wd=0., eps=1e-6)}
    learn = learner(m1, module_groups(m1, spec), wd=0.05)
    create_opt(learn, 1e-2)
    pgs = learn.opt.param_groups
    assert [v for g in pgs for v in (g['lr'], g['wd'], g['weight_decay'], g['eps'])] == pytest.approx(
        [1e-3, 0.05, 0.05, 1e-8, 1e-2, 0., 0., 1e-6])
    torch.manual_seed(3)
    learn.fit(2, 1e-2)
    ref = torch.optim.AdamW([{'params': m2.encoder.parameters(), 'lr': 1e-2 * 0.1, 'weight_decay': 0.05},
                             {'params': m2.head.parameters(), 'lr': 1e-2, 'weight_decay': 0., 'eps': 1e-6}],
                            betas=(0.9, 0.99))
    reference_fit(m2, learn.data, ref, 2, 3)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k


def test_fixed_lr_zero_holds_a_module_still_through_one_cycle_and_mult_follows_it():
    m = named_net()
    learn = learner(m, module_groups(m, {'encoder.0': dict(lr=0.), 'encoder': dict(lr_mult=0.5), 'head': {}}))
    assert [lg.name for lg in learn.layer_groups] == ['encoder.0', 'encoder', 'head']
    create_opt(learn, 1e-2)
    assert [g['lr'] for g in learn.opt.param_groups] == pytest.approx([0., 5e-3, 1e-2])
    before = snapshot(m)
    learn.fit_one_cycle(2, 1e-2)
    after = snapshot(m)
    assert torch.equal(before['encoder.0.weight'], after['encoder.0.weight'])  # lr 0: not moved, not decayed
    assert torch.equal(before['encoder.0.bias'], after['encoder.0.bias'])
    assert not torch.equal(before['encoder.3.weight'], after['encoder.3.weight'])
    lrs = torch.tensor(learn.recorder.group_lrs)  # (steps, param groups), as applied by the one-cycle schedule
    assert (lrs[:, 0] == 0).all()
    torch.testing.assert_close(lrs[:, 1], 0.5 * lrs[:, 2])
    assert lrs[0, 2].item() == pytest.approx(1e-2 / 25) and lrs[:, 2].max() > 0.9e-2  # the head follows the cycle


def test_module_groups_nested_names_rest_group_and_root_parameters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(8))  # held by the root itself, as a ViT's pos_embed
            self.body = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.body(x + self.pos))
    net = Net()
    groups = module_groups(net, [('head', {}), ('body.1', dict(wd=0.))])
    assert [g.name for g in groups] == ['(rest)', 'head', 'body.1']
    assert ids(groups[0].parameters()) == ids([net.pos, *net.body[0].parameters()])
    assert ids(groups[2].parameters()) == ids(net.body[1].parameters())
    pgs = param_groups(groups, bn_wd=False)
    assert [(g['layer_group'], g['decay'], len(g['params'])) for g in pgs] == [
        (0, True, 2), (0, False, 1), (1, True, 1), (1, False, 1), (2, False, 2)]
    assert module_groups(net, {('body', 'head'): {}, }).__len__() == 2  # a tuple of names is one group (+ rest)
    with pytest.raises(ValueError, match="no module named 'haed'; did you mean 'head'"):
        module_groups(net, {'haed': {}})
    with pytest.raises(ValueError, match="'body' has no parameters"):
        module_groups(net, {'body': {}, 'body.0': {}, 'body.1': {}})
    with pytest.raises(ValueError, match="use 'wd' rather than the optimizer's 'weight_decay'"):
        module_groups(net, {'head': dict(weight_decay=0.)})
    with pytest.raises(ValueError, match='give lr .* or lr_mult .*, not both'):
        module_groups(net, {'head': dict(lr=1e-3, lr_mult=0.1)})
    learn = learner(net, module_groups(net, {'head': dict(nesterov=True)}))
    with pytest.raises(ValueError, match="layer group 'head': AdamW has no option 'nesterov'"):
        create_opt(learn)


def test_fixed_momentum_per_module():
    m = named_net()
    learn = learner(m, module_groups(m, {'encoder': dict(mom=0.5), 'head': {}}))
    create_opt(learn)
    assert [g['betas'][0] for g in learn.opt.param_groups] == [0.5, 0.9]
    learn.fit_one_cycle(1, 1e-2, moms=(0.95, 0.85))
    assert {moms[0] for moms in learn.recorder.group_moms} == {0.5}


# ---- summary --------------------------------------------------------------------------------------------------
def test_param_summary_counts_before_and_after_the_optimizer():
    m = bn_net()
    learn = learner(m, split_by_idx(m, 3, 6), bn_wd=False, wd=0.01)
    freeze(learn, train_bn=True)
    s = param_summary(learn)
    assert [(r['layer_group'], r['modules'], r['params'], r['trainable'], r['decay'], r['lr'], r['wd'])
            for r in s.rows] == [(0, '0-2', 128, 0, True, None, 0.01), (0, '0-2', 48, 32, False, None, 0.),
                                 (1, '3-5', 256, 0, True, None, 0.01), (1, '3-5', 48, 32, False, None, 0.),
                                 (2, '6', 48, 48, True, None, 0.01), (2, '6', 3, 3, False, None, 0.)]
    text = str(s)
    assert text.splitlines()[0].split()[:4] == ['#', 'layer', 'group', 'modules']
    assert '531 parameters, 115 trainable, 416 frozen' in text and 'no optimizer yet' in text
    learn.fit(1, slice(1e-4, 1e-2))
    rows = param_summary(learn).rows
    assert [r['lr'] for r in rows] == pytest.approx([1e-4, 1e-4, 1e-3, 1e-3, 1e-2, 1e-2])
    assert repr(param_summary(learn)) == str(param_summary(learn))

    n = named_net()
    learn = learner(n, module_groups(n, {'encoder': dict(lr_mult=0.1), 'head': dict(wd=0.)}))
    rows = param_summary(learn).rows
    assert [(r['modules'], r['params'], r['settings']) for r in rows] == [
        ('encoder', 8 * 16 + 16 + 32 + 16 * 16 + 16, 'lr_mult=0.1'), ('head', 16 * 3 + 3, 'wd=0')]
    assert 'settings' in str(param_summary(learn)).splitlines()[0]


def test_learner_wiring_splitter_layer_decay_freeze_and_summary():
    import numpy as np
    from conftest import make_data
    from minifast import Learner

    def bn_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                             nn.Linear(16, 3))

    learn = Learner(make_data(n_train=64), bn_net(), splitter=[2, 5], layer_decay=0.5, silent=True,
                    training_mode='head_only')
    assert len(learn.layer_groups) == 3
    frozen = [p.detach().clone() for p in learn.model[3].parameters()]
    bn_w = learn.model[1].weight.detach().clone()
    learn.fit_one_cycle(1, 1e-2)
    g = np.array(learn.recorder.group_lrs)
    np.testing.assert_allclose(g[:, 0] / g[:, 2], 0.25, rtol=1e-9)  # head at full lr, each lower group x 0.5
    np.testing.assert_allclose(g[:, 1] / g[:, 2], 0.5, rtol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(frozen, learn.model[3].parameters()))
    assert not torch.equal(bn_w, learn.model[1].weight)  # train_bn: BatchNorm still trains in a frozen group
    table = str(learn.param_summary())
    assert 'trainable' in table.lower() and len(learn.param_summary().rows) >= 3
    learn.unfreeze()
    learn.fit(1, 1e-2)
    assert not all(torch.equal(a, b) for a, b in zip(frozen, learn.model[3].parameters()))
    res = learn.lr_find(num_it=10)
    g = np.array(learn.recorder.group_lrs)
    assert 2 <= len(res.lrs) <= 10 and res.lrs[0] == pytest.approx(1e-7)
    np.testing.assert_allclose(g[:, 0] / g[:, 2], 0.25, rtol=1e-9)  # the sweep keeps the layer decay too
    with pytest.raises(ValueError, match='layer_groups or splitter, not both'):
        Learner(make_data(), bn_net(), splitter=[2], layer_groups=[nn.Linear(1, 1)])


def test_layer_groups_as_lists_bad_layer_decay_and_all_frozen():
    from conftest import make_data as md
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    learn = Learner(md(), m, layer_groups=[[m[0], m[1]], [m[2]]], silent=True)
    assert len(learn.layer_groups) == 2
    with pytest.raises(ValueError, match=r"layer_decay must be a number in \[0, 1\], got '0.5'"):
        Learner(md(), m, layer_decay='0.5')
    freeze_to(learn, 2, train_bn=False)
    with pytest.raises(ValueError, match='every parameter of the model is frozen'):
        learn.fit(1)


def test_freezing_drops_stale_optimizer_state():
    from conftest import make_data as md
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    learn = Learner(md(), m, layer_groups=[m[0], m[2]], silent=True)
    learn.fit(1)
    assert m[0].weight in learn.opt.state
    freeze(learn)
    assert m[0].weight not in learn.opt.state and m[2].weight in learn.opt.state
    learn.fit(1)
    unfreeze(learn)
    learn.fit(1)
    assert learn.opt.state[m[0].weight]['step'] == len(learn.data.train_dl)  # fresh moments after the unfreeze


def test_opt_func_weight_decay_is_reported_not_silently_replaced():
    from conftest import make_data as md
    learn = Learner(md(), nn.Linear(8, 3), opt_func=partial(torch.optim.SGD, momentum=0.9, weight_decay=5e-4),
                    silent=True)
    with pytest.warns(UserWarning, match=r'opt_func sets weight_decay=0.0005, which the Learner replaces by its own '
                                         r'wd \(0.01\)'):
        learn.fit(1)


@pytest.mark.parametrize('lr', [slice(0, 1e-2), slice(1e-4, 0), slice(-1e-4, 1e-2), slice(None), slice(1e-4, 1e-2, 2)])
def test_a_slice_of_lrs_needs_positive_ends(lr):
    """slice(0, b) used to fail inside numpy ('Geometric sequence cannot include zero'), slice(None) in a TypeError."""
    from minifast.optim import lr_per_group
    with pytest.raises(ValueError, match=r'lr=slice\(.*a slice of learning rates is slice\(end\) or slice\(start, '):
        lr_per_group(lr, 3)


def test_l2_weight_decay_equals_torch_adam_weight_decay():
    data = make_data(n_train=96)
    m1, m2 = make_mlp(), make_mlp()
    learner_fit(m1, data, 2, 1e-2, seed=2, wd=0.05, true_wd=False)
    reference_fit(m2, data, torch.optim.Adam(m2.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05), 2, 2)
    assert_same_weights(m1, m2, atol=1e-6)


def test_true_wd_with_sgd_is_decoupled():
    data = make_data(n_train=96)
    m1, m2 = make_mlp(), make_mlp()
    lr, wd = 0.05, 0.1
    learner_fit(m1, data, 2, lr, seed=3, wd=wd, opt_func=partial(torch.optim.SGD, momentum=0.9))
    opt = torch.optim.SGD(m2.parameters(), lr=lr, momentum=0.9)

    def decay():
        with torch.no_grad():
            for p in m2.parameters():
                p.mul_(1 - lr * wd)
    reference_fit(m2, data, opt, 2, 3, before_step=decay)
    assert_same_weights(m1, m2, atol=1e-6)


def test_bn_wd_false_spares_norm_layers_and_biases():
    def bn_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    data = make_data(n_train=96)
    m1, m2 = bn_model(), bn_model()
    learn = learner_fit(m1, data, 2, 1e-2, seed=4, wd=0.2, bn_wd=False)
    decay = [m2[0].weight, m2[3].weight]
    rest = [m2[0].bias, m2[1].weight, m2[1].bias, m2[3].bias]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.2}, {'params': rest, 'weight_decay': 0.}], lr=1e-2,
                            betas=(0.9, 0.99))
    reference_fit(m2, data, opt, 2, 4)
    assert_same_weights(m1, m2, atol=1e-6)
    assert sorted(g['wd'] for g in learn.opt.param_groups) == [0., 0.2]


def test_optimizer_persists_across_fits_and_lr_per_layer_group():
    model = make_mlp()
    learn = Learner(make_data(), model, silent=True, layer_groups=[model[0], model[2]])
    learn.fit(1, slice(1e-4, 1e-2))
    opt = learn.opt
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([1e-4, 1e-2])
    learn.fit(1, [1e-3, 2e-3])
    assert learn.opt is opt and [g['lr'] for g in opt.param_groups] == pytest.approx([1e-3, 2e-3])
    assert len(opt.state) == 4  # Adam moments kept from the first fit
    learn.fit(1, slice(1e-2))
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([1e-3, 1e-2])
    with pytest.raises(ValueError, match='lr has 3 values but the learner has 2 layer groups'):
        learn.fit(1, [1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize('groups', [[3], 3])
def test_layer_groups_that_are_not_modules_are_named(groups):
    # [3] used to fail as "'int' object is not iterable"
    with pytest.raises(TypeError, match=r'layer group 0 is a int \(3\); a layer group is a module or a list of modules'
                       if groups == [3] else r'Learner: layer_groups must be a list of layer groups'):
        Learner(make_data(), make_mlp(), layer_groups=groups)


# ---- seed 000's fine-tuning parameters: layer decay rules, head_wd -----------------------------------------------
def test_layer_decay_rules_timm_and_zoobot_by_hand():
    # timm (default): the head is the top layer; the highest body group already gets lr * decay
    assert layer_decay_lrs(1e-4, 4, 0.75) == pytest.approx([1e-4 * 0.75 ** 3, 1e-4 * 0.5625, 7.5e-5, 1e-4], rel=1e-12)
    # zoobot (seed 000): head and highest block at 1e-4, then 7.5e-5, then 5.6e-5 (the seed's numbers)
    assert layer_decay_lrs(1e-4, 4, 0.75, 'zoobot') == pytest.approx([5.625e-5, 7.5e-5, 1e-4, 1e-4], rel=1e-12)
    assert layer_decay_lrs(1e-4, 4, 0., 'zoobot') == [0., 0., 1e-4, 1e-4]  # seed 000: only the first block learns
    assert layer_decay_lrs(1e-4, 4, 1., 'zoobot') == [1e-4] * 4
    assert layer_decay_lrs(1e-4, 1, 0.5, 'zoobot') == [1e-4]
    with pytest.raises(ValueError, match="layer_decay_rule must be one of"):
        layer_decay_lrs(1e-4, 3, 0.5, 'beit')


def test_layer_decay_rule_through_the_learner_and_its_check():
    learn = Learner(make_data(), bn_net(), splitter=[3, 6], layer_decay=0.5, layer_decay_rule='zoobot', silent=True)
    learn.create_opt(1e-2)
    assert [g['lr'] for g in learn.opt.param_groups] == pytest.approx([5e-3, 1e-2, 1e-2], rel=1e-12)
    learn.layer_decay_rule = 'timm'
    assert group_lrs(learn, 1e-2) == pytest.approx([2.5e-3, 5e-3, 1e-2], rel=1e-12)
    with pytest.raises(ValueError, match="layer_decay_rule must be 'timm' .* or 'zoobot'.*got 'beit'"):
        Learner(make_data(), bn_net(), layer_decay=0.5, layer_decay_rule='beit')


def wd_of(learn):
    """{parameter id: the weight decay its optimizer group applies}."""
    return {id(p): g['wd'] for g in learn.opt.param_groups for p in g['params']}


@pytest.mark.parametrize('bn_wd', [True, False])
def test_head_wd_fixes_the_head_weight_decay_only(bn_wd):
    m = bn_net()
    learn = Learner(make_data(), m, splitter=[3, 6], wd=0.1, head_wd=0, bn_wd=bn_wd, silent=True)
    learn.create_opt(1e-3)
    wd = wd_of(learn)
    assert wd[id(m[6].weight)] == 0 and wd[id(m[6].bias)] == 0  # the head (last layer group)
    assert wd[id(m[0].weight)] == wd[id(m[3].weight)] == 0.1
    assert wd[id(m[1].weight)] == wd[id(m[0].bias)] == (0.1 if bn_wd else 0.)  # bn_wd=False: norm and bias not
    learn.fit(1, 1e-3, wd=0.2)  # a fit's wd leaves the head's fixed one alone
    wd = wd_of(learn)
    assert wd[id(m[6].weight)] == 0 and wd[id(m[0].weight)] == 0.2
    rows = param_summary(Learner(make_data(), bn_net(), splitter=[3, 6], wd=0.1, head_wd=0.03)).rows
    assert [r['wd'] for r in rows] == [0.1, 0.1, 0.03]  # before any optimizer, the summary says the same


def test_head_wd_refuses_a_head_with_its_own_wd_and_bad_values():
    with pytest.raises(ValueError, match=r"head_wd=0: the head's layer group 'head' already sets its weight decay"):
        Learner(make_data(), named_net(), splitter={'encoder': {}, 'head': dict(wd_mult=2)}, head_wd=0,
                silent=True).create_opt(1e-3)
    for bad in (-1, float('nan'), 'x'):
        with pytest.raises(ValueError, match=r'Learner: head_wd must be a finite number >= 0'):
            Learner(make_data(), bn_net(), head_wd=bad)


def test_a_slice_of_lrs_gives_plain_floats_so_a_checkpoint_of_the_fit_loads_weights_only(tmp_path):
    from minifast import Checkpoint, DataBunch, Learner
    from minifast.optim import lr_per_group
    lrs = lr_per_group(slice(1e-3, 1e-1), 3)
    assert [type(x) for x in lrs] == [float] * 3 and lrs == pytest.approx([1e-3, 1e-2, 1e-1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    data = DataBunch.from_tensors(torch.randn(32, 4), torch.randint(0, 2, (32,)), bs=8)
    learn = Learner(data, model, silent=True, layer_groups=[model[0], model[2]], path=tmp_path)
    learn.fit_one_cycle(2, slice(1e-3, 1e-2), callbacks=[Checkpoint(path='ck')])
    (first,) = sorted((tmp_path / 'ck').glob('*epoch0*.pth'))
    state = torch.load(first, weights_only=True)  # numpy scalars among the recorded lrs made this refuse the file
    assert all(type(v) is float for row in state['callbacks']['Recorder']['group_lrs'] for v in row)
