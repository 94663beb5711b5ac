"""learn.summary(): layers, output shapes against a hand-run forward, parameter totals against the model's, layer
groups, and a model left exactly as it was."""
import pytest
import torch
from torch import nn

from minifast import DataBunch, ImageDataBunch, Learner, cnn_learner
from minifast.summary import ModelSummary


def seq_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.Linear(5, 3))


def image_data(n=12, size=8, bs=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 3
    return ImageDataBunch.from_tensors(x, y, x[:6], y[:6], classes=['a', 'b', 'c'], bs=bs, device='cpu')


def model_state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()])


def same_state(a, b):
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:])


def test_rows_shapes_and_totals_against_the_model_and_a_hand_run_forward(tmp_path):
    data = image_data()
    model = seq_model()
    learn = Learner(data, model, layer_groups=[model[:4], model[4:]], path=tmp_path, device='cpu')
    learn.freeze()
    s = learn.summary()
    assert isinstance(s, ModelSummary) and repr(s) == str(s) == s.table
    assert [r['type'] for r in s.rows] == [type(m).__name__ for m in model]
    assert [r['name'] for r in s.rows] == [str(i) for i in range(len(model))]
    x = data.one_batch(train=False)[0][:1]
    shapes = []
    with torch.no_grad():
        model.eval()
        for m in model:  # the forward by hand, layer by layer
            x = m(x)
            shapes.append(list(x.shape[1:]))
        model.train()
    assert [r['output_shape'] for r in s.rows] == shapes
    assert s.input_shape == [3, 8, 8]
    assert [r['params'] for r in s.rows] == [sum(p.numel() for p in m.parameters()) for m in model]
    assert s.total_params == sum(p.numel() for p in model.parameters()) == sum(r['params'] for r in s.rows)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert s.trainable_params == trainable < s.total_params  # frozen: the first group's conv
    assert [r['trainable'] for r in s.rows] == [False, True, None, None, None, None, True, True]  # train_bn
    assert [r['group'] for r in s.rows] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert s.groups == [{'group': 0, 'params': 112 + 8, 'trainable_params': 8},
                        {'group': 1, 'params': 325 + 18, 'trainable_params': 343}]
    for text in ('Layer (type)', 'Output Shape', 'Param #', 'Trainable', 'Group', 'Input shape: [3, 8, 8] per item',
                 f'Total params: {s.total_params:,}', f'Total trainable params: {trainable:,}',
                 f'Total non-trainable params: {s.total_params - trainable:,}', 'Layer group 1: 343 params',
                 'Loss function: cross_entropy'):
        assert text in s.table, text


def test_summary_leaves_the_model_and_the_rng_exactly_as_they_were(tmp_path):
    data = image_data()
    model = seq_model()
    model[1].eval()  # a mixed state: one BatchNorm already in eval mode inside a training model
    learn = Learner(data, model, path=tmp_path, device='cpu')
    before, rng = model_state(model), torch.get_rng_state()
    learn.summary()
    assert same_state(before, model_state(model)) and torch.equal(rng, torch.get_rng_state())
    assert model.training and not model[1].training

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError('boom')
    bad = nn.Sequential(nn.Conv2d(3, 4, 3), Boom())
    learn = Learner(data, bad, path=tmp_path, device='cpu')
    before = model_state(bad)
    with pytest.raises(RuntimeError, match='boom'):
        learn.summary()
    assert same_state(before, model_state(bad))  # hooks removed and modes back, also after an error


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)
        self.out.weight = self.emb.weight  # tied: counted once
        self.act = nn.ReLU()
        self.unused = nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.ones(1))  # a parameter of a module with children

    def forward(self, x):
        return self.act(self.out(self.act(self.emb(x)))) * self.scale


def test_tied_unused_shared_and_direct_parameters(tmp_path):
    x, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    model = Tied()
    learn = Learner(DataBunch.from_tensors(x, y, x, y, bs=4), model, path=tmp_path, device='cpu')
    s = learn.summary()
    rows = {r['name']: r for r in s.rows}
    assert s.total_params == sum(p.numel() for p in model.parameters()) == 20 + 4 + 6 + 1
    assert sum(r['params'] for r in s.rows) == s.total_params
    assert rows['out']['params'] == 4 and rows['(model)']['params'] == 1 and rows['(model)']['output_shape'] == [4]
    assert rows['act']['calls'] == 2 and '[4] (x2)' in s.table
    assert rows['unused']['output_shape'] is None and 'not run' in s.table
    assert s.input_shape == [4]


def test_cnn_learner_summary_and_data_without_items(tmp_path):
    def arch(weights=None):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    weights = tmp_path / 'w.pth'
    torch.save(arch().state_dict(), weights)
    data = image_data()
    learn = cnn_learner(data, arch, pretrained=weights)
    s = learn.summary()
    assert s.total_params == sum(p.numel() for p in learn.model.parameters())
    assert [g['params'] for g in s.groups] == [sum(p.numel() for p in g.parameters()) for g in learn.layer_groups]
    assert [g['trainable_params'] for g in s.groups][:2] == [16, 0]  # frozen body: only its BatchNorm trains
    assert s.rows[-1]['output_shape'] == [3] and s.rows[-1]['group'] == 2
    # load_learner's data (no images, the input size known) still gives a summary
    empty = ImageDataBunch.from_spec(data.input_spec())
    s2 = Learner(empty, learn.model, path=tmp_path, device='cpu', layer_groups=learn.layer_groups).summary()
    assert [r['output_shape'] for r in s2.rows] == [r['output_shape'] for r in s.rows]
    assert "a blank image of the data's size" in s2.table
