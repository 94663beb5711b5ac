"""The model zoo: seed 004's ResNet-56 (parameter count, output, state-dict compatibility), the CIFAR depth family,
create_head, create_cnn and the layer groups a Learner finds."""
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from minifast import DataBunch, Learner
from minifast.models import (CIFAR_DEPTHS, AdaptiveConcatPool2d, BodyHead, CifarResNet, Flatten, cifar_resnet,
                             create_cnn, create_head, from_seed_state_dict, resnet56, to_seed_state_dict)


# ---- the reference: seed 004's model code, verbatim ---------------------------------------------------------------
# Extra Classes for the head of our model
class SeedAdaptiveConcatPool2d(nn.Module):
    "Layer that concats `AdaptiveAvgPool2d` and `AdaptiveMaxPool2d`."
    def __init__(self, sz=None):
        "Output will be 2*sz or 2 if sz is None"
        super().__init__()
        self.output_size = sz or 1
        self.ap = nn.AdaptiveAvgPool2d(self.output_size)
        self.mp = nn.AdaptiveMaxPool2d(self.output_size)
    def forward(self, x):  # noqa: E301
        return torch.cat([self.mp(x), self.ap(x)], 1)


class SeedFlatten(nn.Module):
    "Flatten `x` to a single dimension, often used at the end of a model. `full` for rank-1 tensor"
    def __init__(self, full:bool=False):  # noqa: E231
        super().__init__()
        self.full = full
    def forward(self, x):  # noqa: E301
        return x.view(-1) if self.full else x.view(x.size(0), -1)


class SeedBasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        shortcut = self.shortcut(x) if hasattr(self, 'shortcut') else x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return F.relu(out)


class SeedResnet(nn.Module):
    def __init__(self, num_blocks=[9,9,9], num_classes=100):  # noqa: E231,B006
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self.make_group(16, 16, num_blocks[0], stride=1)
        self.layer2 = self.make_group(16, 32, num_blocks[1], stride=2)
        self.layer3 = self.make_group(32, 64, num_blocks[2], stride=2)

        self.head = nn.Sequential(
            SeedAdaptiveConcatPool2d(),
            SeedFlatten(),
            nn.BatchNorm1d(128),
            nn.Dropout(0.25),
            nn.Linear(128, 128, bias=True),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(128),
            nn.Dropout(0.5),
            nn.Linear(128, num_classes, bias=True)
        )

    def make_group(self, c_in, c_out, num_blocks, stride):
        layers = [SeedBasicBlock(c_in, c_out, stride)]
        for i in range(num_blocks-1):
            layers.append(SeedBasicBlock(c_out, c_out, stride=1))
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.head(out)
        return out
# ---- end of the seed's code ---------------------------------------------------------------------------------------


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def expected_cifar_params(n, nc=100):
    """Parameter count of the CIFAR ResNet with n blocks per stage, from the architecture's description."""
    conv = lambda ci, co, k: ci * co * k * k  # noqa: E731  (bias-free)
    bn = lambda c: 2 * c  # noqa: E731
    block = lambda ci, co: conv(ci, co, 3) + bn(co) + conv(co, co, 3) + bn(co) + \
        (conv(ci, co, 1) + bn(co) if ci != co else 0)  # noqa: E731
    total = conv(3, 16, 3) + bn(16)
    for ci, co in ((16, 16), (16, 32), (32, 64)):
        total += block(ci, co) + (n - 1) * block(co, co)
    return total + bn(128) + 128 * 128 + 128 + bn(128) + 128 * nc + nc


def test_resnet56_parameter_count_and_output():
    m = resnet56()
    assert n_params(m) == 885_044 == expected_cifar_params(9) == n_params(SeedResnet())
    assert m.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert resnet56(num_classes=10).train()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize('depth', (8, 14, *CIFAR_DEPTHS))
def test_cifar_resnet_depths(depth):
    n = (depth - 2) // 6
    m = cifar_resnet(depth, num_classes=10)
    assert [len(s) for s in (m.layer1, m.layer2, m.layer3)] == [n, n, n]
    assert n_params(m) == expected_cifar_params(n, 10) == n_params(SeedResnet([n] * 3, num_classes=10))
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)]
    assert len(convs) + 1 == depth  # 3x3 convs + the last Linear: the depth in He et al.'s counting


def test_cifar_resnet_depth_order_and_bad_depth():
    counts = [n_params(cifar_resnet(d)) for d in CIFAR_DEPTHS]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    for bad in (51, 2, 7, 8.0, True):
        with pytest.raises(ValueError, match=rf'depth {bad!r} is not 6n \+ 2 .*20, 32, 44, 56, 110'):
            cifar_resnet(bad)


def test_resnet56_structure_matches_the_seed():
    m, seed = resnet56(), SeedResnet()
    ours = [(n, type(x).__name__) for n, x in m.named_modules()]
    theirs = [(n, type(x).__name__.removeprefix('Seed')) for n, x in seed.named_modules()]
    assert ours[1:] == theirs[1:]  # same names, same module types, same order
    assert [b.shortcut is not None for b in m.layer2] == [True] + [False] * 8
    assert all(c.bias is None for c in m.modules() if isinstance(c, nn.Conv2d))
    h = m.head
    assert [type(x) for x in h] == [AdaptiveConcatPool2d, Flatten, nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU,
                                    nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert (h[3].p, h[7].p) == (0.25, 0.5) and h[4].in_features == h[4].out_features == 128


def test_seed_state_dict_loads_with_identical_outputs():
    torch.manual_seed(1)
    seed = SeedResnet()
    seed.train()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        seed(torch.randn(8, 3, 32, 32) * 2 + 0.5)
        for mod in seed.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    sd = seed.state_dict()
    m = resnet56()
    m.load_state_dict(from_seed_state_dict(sd), strict=True)
    x = torch.randn(4, 3, 32, 32)
    seed.eval(), m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), seed(x))
    back = to_seed_state_dict(m.state_dict())
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    seed2 = SeedResnet()
    seed2.load_state_dict(back, strict=True)
    with torch.no_grad():
        assert torch.equal(seed2.eval()(x), seed(x))


def test_seed_state_dict_from_fastai_save_and_dataparallel():
    sd = SeedResnet().state_dict()
    for saved in ({'model': sd, 'opt': {}}, {f'module.{k}': v for k, v in sd.items()}):
        resnet56().load_state_dict(from_seed_state_dict(saved), strict=True)
    with pytest.raises(TypeError, match='state dict'):
        from_seed_state_dict([1, 2])


def test_same_seed_same_initial_weights_as_the_seed_model():
    # same modules built in the same order consume the RNG identically: a fresh resnet56 is the seed's Resnet()
    torch.manual_seed(3)
    sd = SeedResnet().state_dict()
    torch.manual_seed(3)
    ours = resnet56().state_dict()
    assert all(torch.equal(ours[k], sd[k]) for k in sd)


def test_concat_pool_and_flatten():
    x = torch.randn(2, 3, 5, 5)
    out = AdaptiveConcatPool2d()(x)
    assert out.shape == (2, 6, 1, 1)
    assert torch.equal(out[:, :3, 0, 0], x.amax((2, 3))) and torch.allclose(out[:, 3:, 0, 0], x.mean((2, 3)))
    assert AdaptiveConcatPool2d(2)(x).shape == (2, 6, 2, 2)
    assert Flatten()(out).shape == (2, 6) and Flatten(full=True)(out).shape == (12,)
    cl = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    assert Flatten()(cl).shape == (2, 36)  # view() would fail on channels_last


def test_create_head_structure_and_dropouts():
    h = create_head(1024, 10)  # fastai v1 defaults: lin_ftrs [512], ps 0.5 -> 0.25 then 0.5
    assert [type(x) for x in h] == [AdaptiveConcatPool2d, Flatten, nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU,
                                    nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert [x.p for x in h if isinstance(x, nn.Dropout)] == [0.25, 0.5]
    assert [(x.in_features, x.out_features) for x in h if isinstance(x, nn.Linear)] == [(1024, 512), (512, 10)]
    assert h.eval()(torch.randn(2, 512, 4, 4)).shape == (2, 10)

    h = create_head(64, 5, lin_ftrs=[32, 16], ps=[0.1, 0.2, 0.3], concat_pool=False, bn_final=True)
    assert isinstance(h[0], nn.AdaptiveAvgPool2d) and isinstance(h[-1], nn.BatchNorm1d) and h[-1].num_features == 5
    assert [x.p for x in h if isinstance(x, nn.Dropout)] == [0.1, 0.2, 0.3]
    assert sum(isinstance(x, nn.ReLU) for x in h) == 2
    assert h.eval()(torch.randn(3, 64, 2, 2)).shape == (3, 5)

    assert [x.p for x in create_head(8, 2, lin_ftrs=[6, 4], ps=0.4) if isinstance(x, nn.Dropout)] == [0.2, 0.2, 0.4]
    h = create_head(8, 2, lin_ftrs=[], ps=0)  # no hidden layer, no dropout
    assert [type(x) for x in h] == [AdaptiveConcatPool2d, Flatten, nn.BatchNorm1d, nn.Linear]
    with pytest.raises(ValueError, match='ps has 2 .* 3 Linear'):
        create_head(8, 2, lin_ftrs=[6, 4], ps=[0.1, 0.2])


def test_bad_head_and_model_arguments_are_named():
    # each was a torch error naming no argument ('empty(): argument size ...', "'int' object is not iterable"), or
    # no error at all for a zero-sized layer
    cases = [(lambda: create_head(8, None), 'create_head: nc'), (lambda: create_head(8, 0), 'create_head: nc'),
             (lambda: create_head(8, 2.0), 'create_head: nc'), (lambda: create_head('8', 2), 'create_head: nf'),
             (lambda: create_head(8, 2, lin_ftrs=512), 'create_head: lin_ftrs'),
             (lambda: create_head(8, 2, lin_ftrs=[0]), 'create_head: each of lin_ftrs'),
             (lambda: create_head(8, 2, lin_ftrs=[1.5]), 'create_head: each of lin_ftrs'),
             (lambda: create_head(8, 2, ps=None), 'create_head: ps'), (lambda: create_head(8, 2, ps='0.5'), 'ps'),
             (lambda: cifar_resnet(8, num_classes=None), 'CifarResNet: num_classes'),
             (lambda: cifar_resnet(8, num_classes=10.0), 'CifarResNet: num_classes'),
             (lambda: CifarResNet((2.5, 1, 1)), 'each of num_blocks'), (lambda: CifarResNet(3), 'num_blocks'),
             (lambda: create_cnn(torchvision.models.resnet18, None), 'create_cnn: nc')]
    for make, name in cases:
        with pytest.raises(ValueError, match=name):
            make()
    assert [x.p for x in create_head(8, 2, lin_ftrs=(4,), ps=(0.1, 0.3)) if isinstance(x, nn.Dropout)] == [0.1, 0.3]


def test_create_cnn_resnet18():
    torch.manual_seed(0)
    m = create_cnn(torchvision.models.resnet18, 7)
    assert isinstance(m, BodyHead) and len(m[0]) == 8  # resnet18 without avgpool, fc
    assert m[1][2].num_features == 1024 and m[1][-1].out_features == 7  # 512 channels, concat pool
    assert m.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    groups = m.layer_groups()
    assert len(groups) == 3 and groups[1][0] is m[0][6] and groups[2] is m[1]  # fastai v1's split at layer3
    assert sum(n_params(g) for g in groups) == n_params(m)
    m = create_cnn(torchvision.models.resnet18, 3, cut=-3, concat_pool=False, lin_ftrs=[16], ps=0)
    assert len(m[0]) == 7 and m[1][2].num_features == 256  # cut before layer4
    assert create_cnn(torchvision.models.vgg11, 4).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_create_cnn_errors():
    def offline(weights=None):
        if weights is not None:
            raise urllib.error.URLError('Name or service not known')
        return torchvision.models.resnet18()

    with pytest.raises(RuntimeError, match=r'create_cnn\(offline, pretrained=True\).*pretrained=False'):
        create_cnn(offline, 2, pretrained=True)
    with pytest.raises(TypeError, match='arch must be a model function'):
        create_cnn(torchvision.models.resnet18(), 2)
    with pytest.raises(TypeError, match='nn.Sequential'):
        create_cnn(torchvision.models.resnet18, 2, cut=lambda m: m.layer1[0])
    # these failed later with errors naming nothing (a shape mismatch, a slice TypeError, a float split at fit time)
    for cut in (10, 'layer3', 6.5):
        with pytest.raises(ValueError, match=r'create_cnn: cut must be an index into the 10 children of ResNet'):
            create_cnn(torchvision.models.resnet18, 2, cut=cut)
    for split_at in (6.0, 'layer3'):
        with pytest.raises(ValueError, match='split_at must cut the body in two'):
            create_cnn(torchvision.models.resnet18, 2, split_at=split_at)
    with pytest.raises(TypeError, match='create_cnn: arch <lambda> returned a int'):
        create_cnn(lambda weights=None: 5, 2)


def test_learner_finds_resnet56_layer_groups_and_freezes_to_the_head():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    data = DataBunch.from_tensors(x[:6], y[:6], x[6:], y[6:], bs=2)
    model = resnet56(num_classes=10)
    learn = Learner(data, model, silent=True)
    assert len(learn.layer_groups) == 4
    assert sum(n_params(lg) for lg in learn.layer_groups) == n_params(model)
    learn.freeze()
    bn = (nn.BatchNorm1d, nn.BatchNorm2d)
    head = {id(p) for p in model.head.parameters()}
    norm = {id(p) for mod in model.modules() if isinstance(mod, bn) for p in mod.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == head | norm
    learn.train_bn = False
    learn.freeze()
    assert {id(p) for p in model.parameters() if p.requires_grad} == head
    learn.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    learn.fit(1, 1e-3)  # the split model trains


def test_learner_finds_create_cnn_layer_groups():
    g = torch.Generator().manual_seed(0)
    data = DataBunch.from_tensors(torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 0, 1]), bs=2)
    learn = Learner(data, create_cnn(torchvision.models.resnet18, 2), silent=True)
    assert len(learn.layer_groups) == 3


def test_create_cnn_head_gets_fastai_v1_initialisation():
    import torchvision
    from minifast import create_cnn
    torch.manual_seed(0)
    m = create_cnn(torchvision.models.resnet18, 7)
    lins = [l for l in m[1].modules() if isinstance(l, nn.Linear)]
    assert all(torch.count_nonzero(l.bias) == 0 for l in lins)
    w = lins[0].weight  # kaiming normal, fan_in: std = sqrt(2 / fan_in)
    assert abs(w.std().item() - (2 / w.shape[1]) ** 0.5) < 0.1 * (2 / w.shape[1]) ** 0.5


def test_create_cnn_body_keeps_the_backbone_child_names():
    # the names are what learn.split({'0.layer3': ...}) and a state dict read; numbers would hide which block is which
    model = create_cnn(torchvision.models.resnet18, 3)
    assert [n for n, _ in model[0].named_children()] == ['conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2',
                                                          'layer3', 'layer4']
    assert model.layer_groups()[1][0] is model[0].layer3  # fastai v1's split: before layer3
    learn = Learner(DataBunch.from_tensors(torch.zeros(4, 3, 8, 8), torch.zeros(4).long()), model, silent=True)
    learn.split({('0.conv1', '0.bn1', '0.layer1', '0.layer2'): {}, '0.layer3': {}, '0.layer4': {}, '1': {}})
    assert len(learn.layer_groups) == 4


def dropouts(m):
    return [d.p for d in m.modules() if isinstance(d, nn.Dropout)]


def test_head_dropout_is_seed_000s_dropout_before_the_output_layer():
    # zoobot's head: Dropout(p) then the output Linear; minifast's with no hidden layer is exactly that
    m = create_cnn(torchvision.models.resnet18, 3, lin_ftrs=[], head_dropout=0.2)
    assert dropouts(m[1]) == [0.2] and isinstance(m[1][-1], nn.Linear)
    assert dropouts(create_cnn(torchvision.models.resnet18, 3, lin_ftrs=[8], head_dropout=0.4)[1]) == [0.2, 0.4]
    assert dropouts(create_cnn(torchvision.models.resnet18, 3, lin_ftrs=[8], head_dropout=0)[1]) == []
    with pytest.raises(ValueError, match=r'give head_dropout=0.2 or ps=0.3, not both'):
        create_cnn(torchvision.models.resnet18, 3, ps=0.3, head_dropout=0.2)
    with pytest.raises(ValueError, match=r'head_dropout must be a dropout probability in \[0, 1\), got 1.5'):
        create_cnn(torchvision.models.resnet18, 3, head_dropout=1.5)


def test_create_head_without_pooling_takes_pooled_features():
    head = create_head(6, 2, lin_ftrs=[4], pool=False)
    assert not any(isinstance(m, (AdaptiveConcatPool2d, nn.AdaptiveAvgPool2d)) for m in head)
    assert head(torch.randn(3, 6)).shape == (3, 2)
