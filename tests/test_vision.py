"""cnn_learner (fastai v1's): model, layer groups, freezing, pretrained weights from a local file or torchvision's
cache only (nothing downloads); and fastai v1 cells run verbatim with only the import line changed."""
import contextlib
import io
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import get_model_weights

from minifast import ImageDataBunch, accuracy, cnn_learner, error_rate, write_image_folder
from minifast.models import BodyHead


def tiny_arch(weights=None):
    """A torchvision-style builder (takes weights=) of a very small CNN: conv stages, a pooling layer, a classifier."""
    assert weights is None, 'the tests never ask a tiny arch for downloadable weights'
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def image_folder(root, n_train=16, n_valid=8, size=12, classes=('3', '7'), channels=3, seed=0):
    """root/train/<class>/*.png and root/valid/<class>/*.png; the class is in the brightness, so it is learnable."""
    g = torch.Generator().manual_seed(seed)
    for split, n in (('train', n_train), ('valid', n_valid)):
        y = torch.arange(n) % len(classes)
        x = (torch.rand(n, channels, size, size, generator=g) * 100 + 120 * y[:, None, None, None]).to(torch.uint8)
        write_image_folder(root, x, y, list(classes), split)
    return root


@pytest.fixture
def data(tmp_path):
    return ImageDataBunch.from_folder(image_folder(tmp_path), size=12, bs=4, device='cpu')


def test_cnn_learner_builds_create_cnns_model_in_three_groups(data, tmp_path):
    learn = cnn_learner(data, tiny_arch, pretrained=False, metrics=error_rate, wd=0.1)
    m = learn.model
    assert isinstance(m, BodyHead) and len(m[0]) == 6 and m[1][-1].out_features == data.c == 2
    assert [list(g.parameters()) for g in learn.layer_groups] == [list(g.parameters()) for g in m.layer_groups()]
    assert all(p.requires_grad for p in m.parameters())  # not pretrained: nothing frozen
    assert learn.metrics == [error_rate] and learn.wd == 0.1 and learn.path == tmp_path  # the data's folder
    learn.fit(1, 1e-3)
    assert len(learn.recorder.val_losses) == 1


def test_a_pretrained_body_is_frozen_and_loads_a_local_file(data, tmp_path):
    torch.manual_seed(1)
    src = tiny_arch()
    torch.save(src.state_dict(), tmp_path / 'w.pth')
    learn = cnn_learner(data, tiny_arch, pretrained=tmp_path / 'w.pth', metrics=accuracy)
    body, head = learn.model
    for (k, v), w in zip(body.state_dict().items(), list(src.state_dict().values())):
        assert torch.equal(v, w), k  # the body is the file's, in order (the classifier is cut off)
    convs = [p for m in body.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()]
    bns = [p for m in body.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert not any(p.requires_grad for p in convs) and all(p.requires_grad for p in bns)  # train_bn, as v1
    assert all(p.requires_grad for p in head.parameters())
    learn.unfreeze()
    assert all(p.requires_grad for p in learn.model.parameters())


def test_a_weights_file_that_does_not_fit_is_refused_naming_what(data, tmp_path):
    sd = tiny_arch().state_dict()
    sd['0.weight'] = torch.zeros(8, 3, 5, 5)
    del sd['8.bias']
    sd['extra'] = torch.zeros(1)
    torch.save(sd, tmp_path / 'bad.pth')
    with pytest.raises(ValueError, match=r"pretrained='.*bad.pth'\): the weights do not fit tiny_arch \(3 problem"
                                         r"\(s\)\): missing 8.bias; unexpected extra; 0.weight: \(8, 3, 5, 5\) in the "
                                         r"file, \(8, 3, 3, 3\) in tiny_arch"):
        cnn_learner(data, tiny_arch, pretrained=str(tmp_path / 'bad.pth'))
    with pytest.raises(FileNotFoundError, match=r"pretrained='.*nope.pth'\): no such weights file"):
        cnn_learner(data, tiny_arch, pretrained=tmp_path / 'nope.pth')

    class Hostile:
        def __reduce__(self):
            return (print, ('ran code from a weights file',))
    torch.save({'0.weight': Hostile()}, tmp_path / 'hostile.pth')
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(ValueError, match=r'hostile.pth.*not a readable state dict'):
        cnn_learner(data, tiny_arch, pretrained=tmp_path / 'hostile.pth')
    assert out.getvalue() == ''  # weights-only loading: nothing in the file ran


def _no_download(monkeypatch):
    def refuse(url, *a, **k):
        raise urllib.error.URLError(f'no network in the tests ({url})')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', refuse)


def test_pretrained_true_reads_torchvisions_cache_without_downloading(data, tmp_path, monkeypatch):
    """squeezenet1_1 (1.2M parameters, a 4.9 MB file): random weights written where torchvision looks."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    _no_download(monkeypatch)
    arch = torchvision.models.squeezenet1_1
    url = get_model_weights(arch).DEFAULT.url
    torch.manual_seed(3)
    ref = arch(weights=None).state_dict()
    ckpt = tmp_path / 'torch' / 'hub' / 'checkpoints' / url.rsplit('/', 1)[1]
    ckpt.parent.mkdir(parents=True)
    torch.save(ref, ckpt)
    learn = cnn_learner(data, arch, metrics=error_rate)  # fastai v1's default: pretrained=True
    body = learn.model[0]
    for k, v in body.state_dict().items():
        assert torch.equal(v, ref[f'features.{k}']), k
    assert not any(p.requires_grad for p in body.parameters())  # no norm layers in squeezenet: all frozen
    assert all(p.requires_grad for p in learn.model[1].parameters())
    ckpt.unlink()
    with pytest.raises(RuntimeError) as e:
        cnn_learner(data, arch)
    msg = str(e.value)
    assert 'create_cnn(squeezenet1_1, pretrained=True): could not get the pretrained weights' in msg
    assert f'copy squeezenet1_1-b8a52dc0.pth (from {url}) into {tmp_path}/torch/hub/checkpoints' in msg
    assert "pass pretrained='path/to/weights.pth', or use pretrained=False" in msg


def test_custom_head_split_on_and_init(data):
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    nn.init.constant_(head[2].bias, 5.)
    learn = cnn_learner(data, tiny_arch, pretrained=False, custom_head=head)
    assert learn.model[1] is head and head[2].bias.abs().sum() == 0  # fastai v1's init: kaiming, zero bias
    assert isinstance(learn.model, BodyHead) and len(learn.layer_groups) == 3
    learn = cnn_learner(data, tiny_arch, pretrained=False, init=nn.init.zeros_,
                        split_on=lambda m: [m[0], m[1]])
    assert len(learn.layer_groups) == 2 and learn.layer_groups[1] is learn.model[1]
    assert all(m.weight.abs().sum() == 0 for m in learn.model[1].modules() if isinstance(m, nn.Linear))
    torch.manual_seed(0)
    a = cnn_learner(data, tiny_arch, pretrained=False, init=None).model[1][4].weight
    torch.manual_seed(0)
    b = cnn_learner(data, tiny_arch, pretrained=False).model[1][4].weight
    assert torch.equal(a, b)  # create_cnn's head already has v1's default init: init=None keeps it, not redraws
    with pytest.raises(TypeError, match='custom_head must be an nn.Module'):
        cnn_learner(data, tiny_arch, pretrained=False, custom_head=[nn.Linear(16, 2)])


def test_cnn_learner_needs_the_number_of_classes(data):
    data.c = None
    with pytest.raises(ValueError, match=r'cnn_learner: data.c \(the number of classes\) is None'):
        cnn_learner(data, tiny_arch, pretrained=False)


# ---- fastai v1 cells, verbatim but for the import line ------------------------------------------------------------
def run_cells(cells, **setup):
    """Run notebook cells in one namespace that starts with `from minifast import *` (fastai v1: `from
    fastai.vision import *`) and `setup` (what untar_data and the arch would give); returns the namespace and what
    each cell's last expression showed (its repr), as a notebook would."""
    ns = dict(setup)
    exec('from minifast import *', ns)
    shown = []
    for src in cells:
        lines = src.strip().splitlines()
        body, last = '\n'.join(lines[:-1]), lines[-1]
        exec(body, ns)
        try:
            code = compile(last, '<cell>', 'eval')
        except SyntaxError:
            exec(last, ns)
            shown.append(None)
        else:
            shown.append(repr(eval(code, ns)))
    return ns, shown


def mnist_sample(root):
    """fastai v1's MNIST_SAMPLE layout: train/{3,7}, valid/{3,7} of grayscale PNGs, labels.csv (name,label)."""
    image_folder(root, n_train=64, n_valid=8, size=12, channels=1)
    rows = ['name,label'] + [f'{p.relative_to(root).as_posix()},{int(p.parent.name == "7")}'
                             for p in sorted((root / 'train').rglob('*.png'))]
    (root / 'labels.csv').write_text('\n'.join(rows) + '\n')
    return root


V1_FOLDER_CELLS = [
    "data = ImageDataBunch.from_folder(path, ds_tfms=get_transforms(), size=24, bs=16).normalize(imagenet_stats)",
    "data.classes, data.c, len(data.train_ds), len(data.valid_ds)",
    "data.show_batch(rows=3, figsize=(5,5))",
    "learn = cnn_learner(data, arch, metrics=error_rate, pretrained=False)",
    "learn.summary()",
    "learn.lr_find()\nlearn.recorder.plot(suggestion=True)",
    "min_grad_lr = learn.recorder.min_grad_lr\nlearn.fit_one_cycle(2, min_grad_lr)",
    "learn.save('stage-1')",
    "learn.unfreeze()\nlearn.fit_one_cycle(1, max_lr=slice(1e-5,1e-3))",
    "learn.load('stage-1');",
    "preds,y = learn.get_preds(ds_type=DatasetType.Valid)\npreds.shape",
]

V1_DATA_CELLS = [
    "tfms = get_transforms(do_flip=False)\ndata = ImageDataBunch.from_folder(path, ds_tfms=tfms, size=26)",
    "data = ImageDataBunch.from_csv(path, ds_tfms=tfms, size=28)\ndata.classes",
    "fn_paths = get_image_files(path/'train'/'3') + get_image_files(path/'train'/'7')\n"
    "pat = r\"/(\\d)/\\d+\\.png$\"\n"
    "data = ImageDataBunch.from_name_re(path, fn_paths, pat=pat, ds_tfms=tfms, size=24)\ndata.classes",
    "data = ImageDataBunch.from_name_func(path, fn_paths, ds_tfms=tfms, size=24,\n"
    "        label_func = lambda x: '3' if '/3/' in str(x) else '7')\ndata.classes",
    "labels = [('3' if '/3/' in str(x) else '7') for x in fn_paths]\n"
    "data = ImageDataBunch.from_lists(path, fn_paths, labels=labels, ds_tfms=tfms, size=24)\ndata.classes",
    "data = (ImageList.from_folder(path)\n        .split_by_folder()\n        .label_from_folder()\n"
    "        .transform(tfms, size=24)\n        .databunch(bs=8))\ndata.classes",
    "data = (ImageList.from_csv(path, 'labels.csv')\n        .split_by_rand_pct(0.2)\n        .label_from_df()\n"
    "        .transform(tfms, size=24)\n        .databunch())\ndata.classes",
    "data = (ImageList.from_folder(path)\n        .split_by_folder()\n"
    "        .label_from_func(lambda o: o.parent.name)\n        .databunch())\nlen(data.train_ds)",
]


def test_fastai_v1_cells_run_verbatim(tmp_path, capsys):
    torch.manual_seed(0)
    ns, shown = run_cells(V1_FOLDER_CELLS, path=mnist_sample(tmp_path), arch=tiny_arch)
    assert shown[1] == "(['3', '7'], 2, 64, 8)"
    assert shown[4].startswith('BodyHead\n') and 'Total params:' in shown[4]
    assert 0 < ns['min_grad_lr'] < 1 and f"Min numerical gradient: {ns['min_grad_lr']:.2E}" in capsys.readouterr().out
    assert (tmp_path / 'models' / 'stage-1.pth').exists()  # learn.path is the data's folder, as v1
    assert shown[-1] == 'torch.Size([8, 2])'


def test_fastai_v1_data_cells_run_verbatim(tmp_path):
    ns, shown = run_cells(V1_DATA_CELLS, path=mnist_sample(tmp_path))
    assert shown[1] == "['0', '1']"  # labels.csv's labels, as strings
    assert shown[2:6] == ["['3', '7']"] * 4
    assert shown[6] == "['0', '1']" and shown[7] == '64'
    assert ns['data'].train_ds.x.shape[1:] == (3, 12, 12)  # no size: the images' own; grayscale becomes RGB
    assert len(ns['labels']) == 64


@pytest.mark.slow
def test_v1_default_resnet18_from_the_cache_fits(tmp_path, monkeypatch):
    """fastai v1's `cnn_learner(data, models.resnet18, metrics=accuracy)` with its default pretrained=True: random
    weights of resnet18's shapes (a 47 MB file) where torchvision looks, no download; the split is v1's (layer3)."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    _no_download(monkeypatch)
    arch = torchvision.models.resnet18
    ckpt = tmp_path / 'torch' / 'hub' / 'checkpoints' / get_model_weights(arch).DEFAULT.url.rsplit('/', 1)[1]
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(arch(weights=None).state_dict(), ckpt)
    data = ImageDataBunch.from_folder(image_folder(tmp_path / 'data', n_train=32), size=28, bs=16, device='cpu')
    learn = cnn_learner(data, arch, metrics=accuracy)
    body = learn.model[0]
    assert learn.layer_groups[1][0] is body[6] and not body[7][0].conv1.weight.requires_grad  # layer3, layer4
    before = body[7][0].conv1.weight.clone()
    learn.fit(1)
    assert torch.equal(body[7][0].conv1.weight, before) and len(learn.recorder.val_losses) == 1


V1_AFTER_CELLS = [
    "data = ImageDataBunch.from_folder(path, ds_tfms=get_transforms(), size=24, bs=16).normalize(imagenet_stats)\n"
    "learn = cnn_learner(data, models.resnet18, metrics=accuracy, pretrained=False)\nlearn.fit_one_cycle(1)",
    "img = open_image(path/'valid'/'3'/'0.png')\nimg.shape",
    "pred_class,pred_idx,outputs = learn.predict(img)\npred_class",
    "interp = ClassificationInterpretation.from_learner(learn)\nlosses,idxs = interp.top_losses()\n"
    "len(data.valid_ds)==len(losses)==len(idxs)",
    "interp.plot_top_losses(9, figsize=(15,11))",
    "interp.plot_confusion_matrix(figsize=(12,12), dpi=60)",
    "interp.most_confused(min_val=2)",
    "preds,y,losses = learn.get_preds(with_loss=True)\nlosses.shape",
    "log_preds,y = learn.TTA()\nlog_preds.shape",
    "learn.show_results(rows=3)",
    "learn.export()",
    "learn = load_learner(path, test=ImageList.from_folder(path/'test'))\n"
    "preds,y = learn.get_preds(ds_type=DatasetType.Test)\npreds.shape",
]


def test_fastai_v1_after_training_cells_run_verbatim(tmp_path):
    """predict on open_image, interpretation, get_preds with losses, TTA, show_results, export and load_learner with a
    test folder, as a fastai v1 notebook types them; each checked against the live learner."""
    path = mnist_sample(tmp_path)
    test = path / 'test'
    test.mkdir()
    for f in sorted((path / 'valid').rglob('*.png'))[:5]:
        (test / f'{f.parent.name}_{f.name}').write_bytes(f.read_bytes())
    torch.manual_seed(0)
    ns, shown = run_cells(V1_AFTER_CELLS[:-2], path=path, models=torchvision.models)
    live, interp = ns['learn'], ns['interp']
    assert shown[1] == '(3, 12, 12)' and shown[2] in ("'3'", "'7'")
    assert torch.equal(ns['outputs'], live.predict(path / 'valid' / '3' / '0.png')[2])
    assert shown[3] == 'True' and shown[7] == 'torch.Size([8])' and shown[8] == 'torch.Size([8, 2])'
    assert torch.allclose(ns['losses'], interp.losses) and torch.equal(ns['y'], interp.y_true)
    assert all(s.startswith('<Figure') for s in (shown[4], shown[5], shown[9]))
    ns2, shown2 = run_cells(V1_AFTER_CELLS[-2:], path=path, learn=live)
    assert shown2[0] == repr(path / 'export')
    assert shown2[1] == 'torch.Size([5, 2])'
    files = sorted(test.iterdir())
    assert torch.equal(ns2['preds'], live.predict_files(files)[3])
