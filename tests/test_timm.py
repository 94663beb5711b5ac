"""timm backbones in create_cnn / cnn_learner: built without weights, cut at the feature layer, minifast's head,
layer groups from timm's group_matcher (freeze, slice lrs, layer decay against timm's own layer decay), weights only
from a local file, export round trip."""
import importlib.util

import pytest
import torch
from torch import nn

from minifast import ImageDataBunch, Learner, cnn_learner, create_cnn, load_learner
from minifast.models import TimmBodyHead, model_spec

# timm is imported by the tests, not at collection: importing it imports safetensors.torch, which would make
# test_checkpoint's "safetensors is not installed" test find it anyway
pytestmark = pytest.mark.skipif(importlib.util.find_spec('timm') is None,
                                reason='timm is not installed (minifast[timm])')


@pytest.fixture
def timm():
    import timm
    return timm

# two small architectures that build in well under a second on CPU: a CNN (pooled feature map, concat pool head)
# and a vision transformer (timm pools its tokens; the head has no pooling), at 32x32 inputs
VIT = dict(img_size=32, depth=3, embed_dim=48, num_heads=2)  # a 3-block vit_tiny: its layout, a fraction of its size
ARCHS = [('resnet10t', {}, 'conv1.0.weight'), ('vit_tiny_patch16_224', VIT, 'cls_token')]


def image_data(n=16, seed=1):
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(n) % 2
    return ImageDataBunch.from_tensors(x[:n - 8], y[:n - 8], x[n - 8:], y[n - 8:], bs=4, device='cpu')


@pytest.mark.parametrize('name,kw,stem', ARCHS)
def test_timm_backbone_forward_and_layer_groups(name, kw, stem, timm):
    m = create_cnn(name, 5, arch_kwargs=kw, lin_ftrs=[16])
    assert isinstance(m, TimmBodyHead)
    m.eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    lgs = m.layer_groups()
    first = {id(p) for p in lgs[0].parameters()}
    assert id(dict(m[0].named_parameters())[stem]) in first  # the stem first
    assert lgs[-1] is m[1]  # the head last
    # every parameter in exactly one group, as many body groups as timm's coarse grouping
    ids = [id(p) for g in lgs for p in g.parameters()]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    timm_groups = timm.models.group_parameters(m[0], m[0].group_matcher(coarse=True))
    assert len(lgs) == len(timm_groups) + 1


@pytest.mark.parametrize('name,kw,stem', ARCHS)
def test_timm_freeze_slice_and_layer_decay(name, kw, stem):
    learn = Learner(image_data(), create_cnn(name, 2, arch_kwargs=kw, lin_ftrs=[8]), silent=True, device='cpu',
                    train_bn=False)
    n = len(learn.layer_groups)
    learn.freeze()
    assert not any(p.requires_grad for p in learn.model[0].parameters())
    assert all(p.requires_grad for p in learn.model[1].parameters())
    learn.unfreeze()
    learn.create_opt(slice(1e-4, 1e-2))
    lrs = sorted({(g['layer_group'], g['lr']) for g in learn.opt.param_groups})
    assert [lr for _, lr in lrs] == pytest.approx(torch.logspace(-4, -2, n, dtype=torch.float64).tolist(), rel=1e-9)
    learn.layer_decay, learn.opt = 0.5, None
    learn.create_opt(1e-3)
    by_group = dict(sorted({(g['layer_group'], g['lr']) for g in learn.opt.param_groups}))
    assert list(by_group.values()) == pytest.approx([1e-3 * 0.5 ** (n - 1 - i) for i in range(n)], rel=1e-12)
    learn.layer_decay_rule, learn.opt = 'zoobot', None
    learn.create_opt(1e-3)
    by_group = dict(sorted({(g['layer_group'], g['lr']) for g in learn.opt.param_groups}))
    assert list(by_group.values()) == pytest.approx([1e-3 * 0.5 ** max(n - 2 - i, 0) for i in range(n)], rel=1e-12)


@pytest.mark.parametrize('name,kw,stem', ARCHS)
def test_timm_rule_equals_timm_param_groups_layer_decay(name, kw, stem, timm):
    # timm's own layer decay (BEiT's) on the whole timm model, fine groups, its classifier the top layer; minifast's
    # default rule on the same backbone with timm_groups='fine' and minifast's head as the top layer
    from timm.optim import param_groups_layer_decay
    torch.manual_seed(0)
    ref = timm.create_model(name, **kw)
    scale = {}
    for g in param_groups_layer_decay(ref, layer_decay=0.75):
        for p in g['params']:
            scale[id(p)] = g['lr_scale']
    names = {id(p): n for n, p in ref.named_parameters()}
    want = {names[i]: s for i, s in scale.items()}
    learn = Learner(image_data(), create_cnn(name, 2, arch_kwargs=kw, timm_groups='fine'), silent=True,
                    device='cpu', layer_decay=0.75)
    learn.create_opt(1.)
    body = {id(p): n for n, p in learn.model[0].named_parameters()}
    got = {body[id(p)]: g['lr'] for g in learn.opt.param_groups for p in g['params'] if id(p) in body}
    assert got.keys() <= want.keys() and len(got) > 10
    assert got == pytest.approx({k: want[k] for k in got}, rel=1e-12)
    assert all(g['lr'] == 1. for g in learn.opt.param_groups if g['layer_group'] == len(learn.layer_groups) - 1)


def test_timm_weights_only_from_a_local_file(tmp_path, monkeypatch, timm):
    import huggingface_hub.constants
    from safetensors.torch import save_file
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))  # an empty cache
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    with pytest.raises(FileNotFoundError, match=r"create_cnn\('resnet10t', pretrained=True\): timm's weights for "
                                                r"resnet10t are not on this machine .*timm/resnet10t.*downloads none"):
        create_cnn('resnet10t', 2, pretrained=True)
    torch.manual_seed(3)
    src = timm.create_model('resnet10t')
    state = src.state_dict()
    torch.save(state, tmp_path / 'w.pth')
    save_file(state, str(tmp_path / 'w.safetensors'))
    for f in ('w.pth', 'w.safetensors'):
        m = create_cnn('resnet10t', 2, pretrained=str(tmp_path / f))
        assert torch.equal(m[0].conv1[0].weight, src.conv1[0].weight)
        assert torch.equal(m[0].layer4[0].bn2.running_var, src.layer4[0].bn2.running_var)
    torch.save(timm.create_model('resnet14t').state_dict(), tmp_path / 'other.pth')
    with pytest.raises(ValueError, match=r"create_cnn\(resnet10t, pretrained=.*other.pth'\): the weights do not fit "
                                         r'resnet10t .*unexpected layer'):
        create_cnn('resnet10t', 2, pretrained=str(tmp_path / 'other.pth'))
    # the cached default weights are used when they are there (the Hugging Face cache layout)
    snap = tmp_path / 'hf' / 'models--timm--resnet10t.c3_in1k' / 'snapshots' / 'abc'
    snap.mkdir(parents=True)
    save_file(state, str(snap / 'model.safetensors'))
    (tmp_path / 'hf' / 'models--timm--resnet10t.c3_in1k' / 'refs').mkdir()
    (tmp_path / 'hf' / 'models--timm--resnet10t.c3_in1k' / 'refs' / 'main').write_text('abc')
    m = create_cnn('resnet10t', 2, pretrained=True)
    assert torch.equal(m[0].conv1[0].weight, src.conv1[0].weight)


def test_timm_bad_names_and_arguments_are_named(timm):
    with pytest.raises(ValueError, match=r"'resnet10x' is not a timm model name \(did you mean resnet10t"):
        create_cnn('resnet10x', 2)
    with pytest.raises(ValueError, match="'hf-hub:timm/resnet10t.c3_in1k' is not a timm model name"):
        create_cnn('hf-hub:timm/resnet10t.c3_in1k', 2)  # would read a config from the hub
    with pytest.raises(ValueError, match='arch_kwargs may not hold checkpoint_path'):
        create_cnn('resnet10t', 2, arch_kwargs=dict(checkpoint_path='x.pth'))
    with pytest.raises(ValueError, match=r"cut= and split_at= apply to torchvision backbones"):
        create_cnn('resnet10t', 2, split_at=2)
    with pytest.raises(ValueError, match="timm_groups must be 'coarse'"):
        create_cnn('resnet10t', 2, timm_groups='medium')
    with pytest.raises(ValueError, match='has its own weights'):
        create_cnn(timm.create_model('resnet10t'), 2, pretrained=True)


def test_timm_instance_as_arch_and_cnn_learner(timm):
    body = timm.create_model('resnet10t')
    m = create_cnn(body, 3, lin_ftrs=[8])
    assert m[0] is body and isinstance(body.fc, nn.Identity)
    assert model_spec(m)[0] is None  # an instance cannot be rebuilt from a manifest: give the name to export
    learn = cnn_learner(image_data(), 'vit_tiny_patch16_224', arch_kwargs=VIT, pretrained=False, lin_ftrs=[8],
                        head_dropout=0.3, head_wd=0,
                        layer_decay=0.75, layer_decay_rule='zoobot', wd=0.1, silent=True, device='cpu')
    assert [mod.p for mod in learn.model[1].modules() if isinstance(mod, nn.Dropout)] == [0.15, 0.3]
    learn.fit(1, 1e-3)
    head = {id(p) for p in learn.model[1].parameters()}
    assert all(g['wd'] == 0 for g in learn.opt.param_groups if id(g['params'][0]) in head)
    lrs = dict(sorted({(g['layer_group'], g['lr']) for g in learn.opt.param_groups}))
    assert lrs[len(lrs) - 1] == lrs[len(lrs) - 2] == pytest.approx(1e-3)  # zoobot: head and the top block


def test_timm_export_round_trip(tmp_path):
    data = image_data()
    learn = Learner(data, create_cnn('vit_tiny_patch16_224', 2, arch_kwargs=VIT, lin_ftrs=[8]),
                    path=tmp_path, device='cpu', silent=True)
    assert model_spec(learn.model)[0]['args']['arch'] == 'vit_tiny_patch16_224'
    learn.model.eval()
    learn.export()
    back = load_learner(tmp_path)
    assert isinstance(back.model, TimmBodyHead)
    assert torch.equal(back.get_preds(dl=data.valid_dl)[0], learn.get_preds()[0])
