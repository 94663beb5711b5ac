"""torchmetrics.Metric objects in `metrics=`: reset per validation, updated per batch, computed once, reported like
minifast's own metrics (against minifast's accuracy and a macro F1 computed by hand)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minifast import Callback, CSVLogger, Learner, accuracy

from conftest import make_data, make_mlp

tmc = pytest.importorskip('torchmetrics.classification')

N_VALID, VAL_BS = 37, 8  # five validation batches, the last one of 5 items


def _data():
    return make_data(n_train=64, n_valid=N_VALID, bs=16, val_bs=VAL_BS)


def hand_macro_f1(out, y, n=3):
    """Macro F1 from predictions by hand: per class 2tp / (2tp + fp + fn), averaged over the classes."""
    p = out.argmax(1)
    f1s = []
    for c in range(n):
        tp = ((p == c) & (y == c)).sum().item()
        fp = ((p == c) & (y != c)).sum().item()
        fn = ((p != c) & (y == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.)
    return sum(f1s) / n


class HandF1(Callback):
    """After each epoch's validation: the macro F1 of the model over the whole validation set by hand."""
    order = 100

    def __init__(self):
        self.values, self.reported = [], []

    def after_epoch(self, learn):
        x, y = learn.data.valid_dl.tensors
        learn.model.eval()
        with torch.no_grad():
            self.values.append(hand_macro_f1(learn.model(x), y))
        self.reported.append(list(learn.last_metrics))


def test_torchmetrics_micro_accuracy_equals_minifast_accuracy():
    tm = tmc.MulticlassAccuracy(num_classes=3, average='micro')
    learn = Learner(_data(), make_mlp(), metrics=[accuracy, tm], silent=True)
    assert len(learn.data.valid_dl) == 5
    learn.fit(2, 5e-2)
    r = learn.recorder
    assert r.metrics_names == ['accuracy', 'MulticlassAccuracy']
    for own, theirs in r.metrics:
        assert theirs == pytest.approx(own, abs=1e-6)
    loss, own, theirs = learn.validate()
    assert theirs == pytest.approx(own, abs=1e-6)
    preds, y = learn.get_preds()
    assert theirs == pytest.approx((preds.argmax(1) == y).float().mean().item(), abs=1e-6)
    state = tm.metric_state  # reset before each validation (2 epochs, then validate): one pass's counts
    assert int(state['tp'] + state['fn']) == N_VALID


def test_torchmetrics_macro_f1_is_per_validation_and_equals_hand_computed():
    f1, hand = tmc.MulticlassF1Score(num_classes=3, average='macro'), HandF1()
    data = _data()
    assert set(data.valid_dl.tensors[1].tolist()) == {0, 1, 2}  # every class present: no 0/0 class to disagree on
    learn = Learner(data, make_mlp(), metrics=[accuracy, f1], silent=True, callbacks=[hand])
    learn.fit(2, 5e-2)
    got = [m[1] for m in learn.recorder.metrics]
    assert got[0] != pytest.approx(got[1], abs=1e-4)  # the model changed: a state kept across epochs would show
    for epoch, (v, h, rep) in enumerate(zip(got, hand.values, hand.reported)):
        assert v == pytest.approx(h, abs=1e-6), f'epoch {epoch}'
        assert rep[2] == v  # callbacks' last_metrics: [loss, accuracy, F1]
    state = f1.metric_state  # reset per validation: the counts of one pass over the validation set
    assert int(state['tp'].sum() + state['fn'].sum()) == N_VALID
    preds, y = learn.get_preds()
    assert learn.validate()[2] == pytest.approx(hand_macro_f1(preds, y), abs=1e-6)
    assert int(state['tp'].sum() + state['fn'].sum()) == N_VALID


def test_torchmetrics_names_in_table_recorder_csv_and_given_names(tmp_path, capsys):
    f1 = tmc.MulticlassF1Score(num_classes=3, average='macro')
    acc = tmc.MulticlassAccuracy(num_classes=3, average='micro')
    acc.__name__ = 'tm_acc'  # a name the user gives
    learn = Learner(_data(), make_mlp(), metrics=[f1, accuracy, acc], path=tmp_path, callback_fns=[CSVLogger])
    learn.fit(1, 1e-2)
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ['epoch', 'train_loss', 'valid_loss', 'MulticlassF1Score', 'accuracy', 'tm_acc', 'time']
    assert learn.recorder.metrics_names == ['MulticlassF1Score', 'accuracy', 'tm_acc']
    lines = (tmp_path / 'history.csv').read_text().splitlines()
    assert lines[0].split(',')[3:6] == ['MulticlassF1Score', 'accuracy', 'tm_acc']
    vals = learn.recorder.metrics[0]
    assert [float(v) for v in lines[1].split(',')[3:6]] == pytest.approx(vals, abs=1e-6)
    assert vals[2] == pytest.approx(vals[1], abs=1e-6)  # the order of the metrics is kept
    assert learn.validate(metrics=[acc]) == pytest.approx(learn.validate()[:1] + [vals[1]], abs=1e-6)


def test_torchmetrics_non_scalar_and_collections_are_refused_by_name():
    per_class = tmc.MulticlassF1Score(num_classes=3, average=None)
    learn = Learner(_data(), make_mlp(), metrics=[per_class], silent=True)
    with pytest.raises(ValueError, match=r'metric MulticlassF1Score: compute\(\) returned a tensor of shape \(3,\).*'
                                         r'average="macro"'):
        learn.validate()
    import torchmetrics
    coll = torchmetrics.MetricCollection([tmc.MulticlassAccuracy(num_classes=3)])
    with pytest.raises(TypeError, match=r'metrics\[1\] is a torchmetrics.MetricCollection \(MulticlassAccuracy\)'):
        Learner(_data(), make_mlp(), metrics=[accuracy, coll])


def test_torchmetrics_single_process_never_syncs_and_empty_pass_is_nan():
    def boom(*a, **k):
        raise AssertionError('a single-process validation gathered a torchmetrics state')
    # as if torch.distributed were initialised while one process validates (distributed.local)
    tm = tmc.MulticlassAccuracy(num_classes=3, average='micro', dist_sync_fn=boom,
                                distributed_available_fn=lambda: True)
    learn = Learner(_data(), make_mlp(), metrics=[accuracy, tm], silent=True)
    loss, own, theirs = learn.validate()
    assert theirs == pytest.approx(own, abs=1e-6)
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 8), torch.zeros(0).long()))
    vals = learn.validate(dl=empty)
    assert len(vals) == 3 and all(v != v for v in vals)  # nan like minifast's own metrics: no items


def test_torchmetrics_not_imported_by_minifast_or_a_fit_without_it():
    code = ('import sys; sys.path.insert(0, "tests"); import minifast; assert "torchmetrics" not in sys.modules\n'
            'from conftest import make_data, make_mlp\n'
            'learn = minifast.Learner(make_data(), make_mlp(), metrics=[minifast.accuracy], silent=True)\n'
            'learn.fit(1, 1e-2); learn.validate()\n'
            'assert "torchmetrics" not in sys.modules, "a fit imported torchmetrics"\n'
            'print("ok")')
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, MPLBACKEND='Agg', PYTHONPATH=os.pathsep.join(filter(None, [str(root),
                                                                                     os.environ.get('PYTHONPATH')])))
    p = subprocess.run([sys.executable, '-c', code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == 'ok', p.stderr[-3000:]


def test_loss_interpolation_leaves_out_or_refuses_torchmetrics():
    # a sweep evaluates many weights in one pass of the data: a per-pass torchmetrics state would mix them
    from minifast import evaluate_weights, interpolate_losses
    learn = Learner(_data(), make_mlp(), metrics=[accuracy, tmc.MulticlassF1Score(num_classes=3)], silent=True)
    w = {k: v.clone() for k, v in learn.model.state_dict().items()}
    w2 = {k: v + 0.01 for k, v in w.items()}
    res = interpolate_losses(learn, w, w2, alphas=[0., 1.], dls=('valid',))
    assert res.columns == ['loss', 'accuracy']
    assert res.metric('accuracy')[list(res.alphas).index(1.)] == pytest.approx(learn.validate()[1], abs=1e-6)
    with pytest.raises(TypeError, match='MulticlassF1Score'):
        evaluate_weights(learn, w, metrics=[tmc.MulticlassF1Score(num_classes=3)])
