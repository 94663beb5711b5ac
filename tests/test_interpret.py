"""ClassificationInterpretation and learn.show_results against references computed by hand from the model."""
import functools
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from minifast import ClassificationInterpretation, DatasetType, FlipLR, ImageDataBunch, Learner, Lighting
from conftest import make_data, make_mlp
from helpers import same_state, snapshot

CLASSES = ['ant', 'bee', 'cat', 'dog']


def image_data(n_train=24, n_valid=22, size=20, bs=8, tfms=None, stats=((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n_train + n_valid) % len(CLASSES)
    # noise over a faint colour per class (ant red, bee green, cat blue, dog grey): learnable, with mistakes left
    colour = torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1], [.5, .5, .5]])[y][:, :, None, None]
    x = (torch.rand(len(y), 3, size, size, generator=g) * 200 + colour * 55).to(torch.uint8)
    data = ImageDataBunch.from_tensors(x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes=CLASSES,
                                       tfms=tfms, bs=bs, val_bs=5, device='cpu', device_data=False)
    return data.normalize(stats) if stats else data


def tiny_cnn(n_out=len(CLASSES), seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(24, n_out))


@functools.lru_cache(maxsize=None)
def trained_weights():
    """A tiny CNN briefly trained on image_data(): its predictions vary and are partly right."""
    learn = Learner(image_data(), tiny_cnn(), silent=True)
    torch.manual_seed(0)
    learn.fit_one_cycle(3, 3e-2)
    return snapshot(learn.model)


def image_learner(**kw):
    """A learner of the trained tiny CNN on image_data(**kw)."""
    learn = Learner(image_data(**kw), tiny_cnn(), silent=True)
    learn.model.load_state_dict(trained_weights())
    return learn


def hand_outputs(learn):
    """Raw outputs on the validation images, computed without the library's loop."""
    learn.model.eval()
    with torch.no_grad():
        out = learn.model(learn.data.preprocess(learn.data.valid_ds.x))
    learn.model.train()
    return out


def save_png(fig, name):
    """Renders `fig` (Agg); saves it under $MINIFAST_TEST_PNGS when set, for a person to look at."""
    fig.canvas.draw()
    if os.environ.get('MINIFAST_TEST_PNGS'):
        out = Path(os.environ['MINIFAST_TEST_PNGS'])
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / name)


def test_confusion_matrix_and_most_confused_equal_counts_by_hand():
    learn = image_learner()
    interp = ClassificationInterpretation.from_learner(learn)
    preds, y = learn.get_preds()
    cm = np.zeros((4, 4), dtype=np.int64)
    for a, p in zip(y.tolist(), preds.argmax(1).tolist()):
        cm[a, p] += 1
    got = interp.confusion_matrix()
    assert got.dtype.kind == 'i' and np.array_equal(got, cm)
    assert cm.sum() == 22 and 0 < np.trace(cm) < 22 and (cm.sum(0) > 0).sum() > 1  # right and wrong, varied
    pairs = Counter((CLASSES[a], CLASSES[p]) for a, p in zip(y.tolist(), preds.argmax(1).tolist()) if a != p)
    mc = interp.most_confused()
    assert sorted(mc) == sorted((a, p, n) for (a, p), n in pairs.items())
    assert [n for *_, n in mc] == sorted(pairs.values(), reverse=True)
    assert interp.most_confused(min_val=max(pairs.values())) == [r for r in mc if r[2] == max(pairs.values())]
    assert interp.most_confused(min_val=99) == []


def test_top_losses_equal_cross_entropy_by_hand_and_sorted():
    learn = image_learner()
    interp = learn.interpret()
    y = learn.data.valid_ds.y
    ref = F.cross_entropy(hand_outputs(learn), y, reduction='none')
    val, idx = interp.top_losses()
    rv, ri = ref.sort(descending=True)
    torch.testing.assert_close(val, rv)
    assert torch.equal(idx, ri)
    v3, i3 = interp.top_losses(3, largest=False)
    torch.testing.assert_close(v3, ref.sort().values[:3])
    assert torch.equal(i3, ref.sort().indices[:3])
    torch.testing.assert_close(interp.losses, ref)
    assert torch.equal(interp.pred_class, interp.preds.argmax(1)) and torch.equal(interp.y_true, y)
    assert interp.ds_type is DatasetType.Valid and interp.learn is learn and interp.data is learn.data
    # k beyond the set is clipped to it; a negative k is refused
    assert len(interp.top_losses(1000)[0]) == 22
    with pytest.raises(ValueError, match='k must be a non-negative integer'):
        interp.top_losses(-1)


def test_from_learner_makes_one_prediction_pass():
    learn = image_learner()
    calls = []
    orig = learn.get_preds
    learn.get_preds = lambda *a, **k: calls.append(k) or orig(*a, **k)
    ClassificationInterpretation.from_learner(learn, DatasetType.Fix)
    assert len(calls) == 1 and calls[0]['with_loss'] is True


def test_plot_top_losses_shows_the_images_as_the_model_saw_them():
    learn = image_learner(tfms=[FlipLR(1.), Lighting(0.5, p=1.)])  # training augmentation must not show
    interp = learn.interpret()
    fig = interp.plot_top_losses(5, figsize=(6, 6), heatmap=False)
    assert isinstance(fig, Figure) and len(fig.axes) == 5
    val, idx = interp.top_losses(5)
    names = interp.data.classes
    for ax, i, loss in zip(fig.axes, idx.tolist(), val.tolist()):
        a, p = int(interp.y_true[i]), int(interp.pred_class[i])
        assert ax.get_title() == f'{names[p]}/{names[a]} / {loss:.2f} / {float(interp.preds[i, a]):.2f}'
        shown = torch.as_tensor(ax.images[0].get_array()).permute(2, 0, 1)
        orig = learn.data.valid_ds.x[i].float() / 255
        torch.testing.assert_close(shown.float(), orig, atol=1e-5, rtol=0)  # denormalised, unaugmented
    save_png(fig, 'plot_top_losses.png')


def test_plot_confusion_matrix_has_class_names_counts_and_normalised_rows():
    learn = image_learner()
    interp = learn.interpret()
    fig = interp.plot_confusion_matrix(title='CM')
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_title() == 'CM' and ax.get_xlabel() == 'Predicted' and ax.get_ylabel() == 'Actual'
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    cm = interp.confusion_matrix()
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(cm.ravel().tolist())
    save_png(fig, 'plot_confusion_matrix.png')
    fig2 = interp.plot_confusion_matrix(normalize=True, norm_dec=3)
    shown = fig2.axes[0].images[0].get_array()
    np.testing.assert_allclose(np.asarray(shown).sum(1), (cm.sum(1) > 0).astype(float))
    assert all(len(t.get_text().split('.')[1]) == 3 for t in fig2.axes[0].texts)
    assert fig2.axes[0].get_title() == 'Confusion matrix'
    # on a given axes, without text
    from matplotlib import pyplot as plt
    f3, ax3 = plt.subplots()
    assert interp.plot_confusion_matrix(ax=ax3, plot_txt=False) is f3 and not ax3.texts
    plt.close(f3)


def test_a_class_absent_from_the_set_gets_an_empty_row():
    data = image_data(n_valid=6)
    data.valid_ds.y[:] = 1  # only 'bee' in validation
    learn = Learner(data, tiny_cnn(), silent=True)
    interp = learn.interpret()
    cm = interp.confusion_matrix()
    assert cm.shape == (4, 4) and cm[1].sum() == 6 and cm.sum() == 6
    fig = interp.plot_confusion_matrix(normalize=True)
    assert np.isfinite(np.asarray(fig.axes[0].images[0].get_array())).all()


def test_show_results_titles_actual_and_predicted_and_marks_wrong_ones():
    learn = image_learner(tfms=[FlipLR(1.)])
    fig = learn.show_results(rows=3)
    assert isinstance(fig, Figure) and len(fig.axes) == 9
    preds = learn.get_preds()[0].argmax(1)
    y = learn.data.valid_ds.y
    for i, ax in enumerate(fig.axes):
        assert ax.get_title() == f'{CLASSES[int(y[i])]}/{CLASSES[int(preds[i])]}'
        wrong = int(y[i]) != int(preds[i])
        assert ax.title.get_color() == ('red' if wrong else 'black')
        shown = torch.as_tensor(ax.images[0].get_array()).permute(2, 0, 1).float()
        torch.testing.assert_close(shown, learn.data.valid_ds.x[i].float() / 255, atol=1e-5, rtol=0)
    assert fig._suptitle.get_text().startswith('actual/predicted')
    save_png(fig, 'show_results.png')
    assert len(learn.show_results(DatasetType.Train, rows=2).axes) == 4


def test_model_and_modes_are_unchanged_by_interpret_tta_and_show_results():
    learn = image_learner(tfms=[FlipLR(), Lighting()])
    learn.model.train()
    learn.model[5].eval()  # a mix of modes, to be kept as it is
    before, modes = snapshot(learn.model), [m.training for m in learn.model.modules()]
    rng = torch.get_rng_state()
    learn.interpret()
    learn.interpret(tta=True)
    learn.TTA()
    learn.show_results()
    learn.interpret().plot_top_losses(3)
    assert same_state(learn.model, before)
    assert [m.training for m in learn.model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_interpret_with_tta_uses_tta_predictions_and_their_losses():
    learn = image_learner(tfms=[FlipLR()])
    interp = learn.interpret(tta=True)
    p, y = learn.TTA()
    torch.testing.assert_close(interp.preds, p)
    torch.testing.assert_close(interp.losses, -p[torch.arange(len(y)), y].log())


def test_non_image_data_interprets_but_plot_top_losses_needs_images():
    learn = Learner(make_data(), make_mlp(), silent=True)
    interp = learn.interpret()
    assert interp.confusion_matrix().sum() == 20
    assert isinstance(interp.plot_confusion_matrix(), Figure)
    assert interp.most_confused(0) == interp.most_confused(1)
    assert [t.get_text() for t in interp.plot_confusion_matrix().axes[0].get_xticklabels()] == ['0', '1', '2']
    with pytest.raises(TypeError, match='plot_top_losses shows images: it needs an ImageDataBunch'):
        interp.plot_top_losses(4)
    with pytest.raises(TypeError, match='show_results shows images'):
        learn.show_results()


def test_plot_top_losses_of_the_shuffled_training_loader_is_refused():
    learn = image_learner()
    interp = learn.interpret(DatasetType.Train)
    assert interp.confusion_matrix().sum() == 24  # counts still make sense
    with pytest.raises(ValueError, match='DatasetType.Fix'):
        interp.plot_top_losses(3)
    fix = learn.interpret(DatasetType.Fix)
    assert len(fix.plot_top_losses(30).axes) == 24  # k beyond the set: clipped


def test_most_confused_sorts_by_count_on_crafted_predictions():
    learn = image_learner()
    # actual -> predicted: ant->bee once, ant->dog three times, cat->bee twice, dog->dog twice (right)
    pairs = [(0, 1)] + [(0, 3)] * 3 + [(2, 1)] * 2 + [(3, 3)] * 2
    y = torch.tensor([a for a, _ in pairs])
    preds = F.one_hot(torch.tensor([p for _, p in pairs]), 4).float()
    interp = ClassificationInterpretation(learn, preds, y, torch.zeros(len(y)))
    assert interp.most_confused() == [('ant', 'dog', 3), ('cat', 'bee', 2), ('ant', 'bee', 1)]
    assert interp.most_confused(min_val=2) == [('ant', 'dog', 3), ('cat', 'bee', 2)]
    assert interp.confusion_matrix().tolist() == [[0, 1, 0, 3], [0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 2]]
    bad = ClassificationInterpretation(learn, preds, torch.tensor([0] * 7 + [4]), torch.zeros(len(y)))
    with pytest.raises(ValueError, match='target 4 is outside the 4 classes 0..3'):
        bad.confusion_matrix()


def test_fastai_v1_calls_run_unchanged():
    learn = image_learner()
    interp = learn.interpret(DatasetType.Valid, True)  # v1's positional order: ds_type, tta
    assert torch.allclose(interp.preds, learn.TTA()[0])
    interp = ClassificationInterpretation.from_learner(learn)
    fig = interp.plot_confusion_matrix(figsize=(12, 12), dpi=60)
    assert fig.get_dpi() == 60 and tuple(fig.get_size_inches()) == (12, 12)
    assert isinstance(interp.plot_confusion_matrix(True, 'T', 'Reds', 1, 3, return_fig=True), Figure)
    assert isinstance(interp.plot_top_losses(9, figsize=(15, 11)), Figure)
    assert interp.most_confused(min_val=2) == interp.most_confused(2, slice_size=10)
    with pytest.raises(NotImplementedError, match='heatmap'):
        interp.plot_top_losses(9, heatmap=True)
