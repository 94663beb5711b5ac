"""Cross-validation: fold partitions (sizes, stratification, seeding), fold DataBunches built like the original,
cross_validate's fairness and records against hand-written runs, CVResult's statistics, table, record and plot."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from minifast import Callback, DataBunch, DivergenceError, ImageDataBunch, Learner, accuracy, set_seed
from minifast.crossval import CVResult, cross_validate, fold_data, kfold_data, kfold_indices
from minifast.data.augment import FlipLR
from minifast.grid import GridResult, record_problem

from conftest import make_data


def check_partition(folds, n, k):
    assert len(folds) == k
    seen = torch.cat([va for _, va in folds])
    assert sorted(seen.tolist()) == list(range(n))  # disjoint and covering
    for tr, va in folds:
        assert tr.dtype == va.dtype == torch.long
        assert tr.tolist() == sorted(set(range(n)) - set(va.tolist())) and va.tolist() == sorted(va.tolist())
    sizes = sorted(len(va) for _, va in folds)
    assert sizes[-1] - sizes[0] <= 1


def test_folds_partition_the_items_with_sizes_within_one():
    folds = kfold_indices(23, k=5, seed=0)
    check_partition(folds, 23, 5)
    assert sorted(len(va) for _, va in folds) == [4, 4, 5, 5, 5]  # 23 = 2*4 + 3*5
    check_partition(kfold_indices(10, k=10), 10, 10)  # leave-one-out
    check_partition(kfold_indices(7, k=2), 7, 2)


def test_stratified_folds_spread_each_class_as_evenly_as_possible():
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 6)[torch.randperm(23, generator=torch.Generator().manual_seed(3))]
    folds = kfold_indices(y, k=5, seed=1)
    check_partition(folds, 23, 5)
    per_class = [[int((y[va] == c).sum()) for _, va in folds] for c in range(3)]
    # hand-checked: 10 over 5 folds is 2 each, 7 = 2+2+1+1+1, 6 = 2+1+1+1+1
    assert sorted(per_class[0]) == [2, 2, 2, 2, 2]
    assert sorted(per_class[1]) == [1, 1, 1, 2, 2]
    assert sorted(per_class[2]) == [1, 1, 1, 1, 2]
    # numpy labels, lists and bools are class labels too
    assert [v.tolist() for _, v in kfold_indices(y.numpy(), 5, seed=1)] == [v.tolist() for _, v in folds]
    assert [v.tolist() for _, v in kfold_indices(y.tolist(), 5, seed=1)] == [v.tolist() for _, v in folds]


def test_unstratified_folds_of_an_imbalanced_set_can_miss_a_class():
    # the oracle that stratification matters: some seed puts both of class 1's items in one fold
    y = torch.tensor([0] * 8 + [1] * 2)
    missing = [s for s in range(20) if any(int((y[va] == 1).sum()) == 2 for _, va in
                                           kfold_indices(y, 2, stratify=False, seed=s))]
    assert missing
    assert all(int((y[va] == 1).sum()) == 1 for _, va in kfold_indices(y, 2, stratify=True, seed=missing[0]))


def test_folds_are_determined_by_the_seed():
    y = torch.arange(40) % 4
    a, b = kfold_indices(y, 4, seed=7), kfold_indices(y, 4, seed=7)
    assert all(torch.equal(p[1], q[1]) for p, q in zip(a, b))
    c = kfold_indices(y, 4, seed=8)
    assert any(not torch.equal(p[1], q[1]) for p, q in zip(a, c))
    before = torch.get_rng_state()
    kfold_indices(y, 4, seed=7)
    assert torch.equal(before, torch.get_rng_state())  # torch's global RNG untouched


def test_auto_stratifies_class_labels_only():
    y_int = torch.tensor([0] * 6 + [1] * 6)
    y_float = torch.linspace(0, 1, 12)
    plain = [v.tolist() for _, v in kfold_indices(12, 3, seed=2)]
    assert [v.tolist() for _, v in kfold_indices(y_float, 3, seed=2)] == plain  # regression: not stratified
    assert [v.tolist() for _, v in kfold_indices(y_int, 3, seed=2, stratify=False)] == plain
    strat = kfold_indices(y_int, 3, seed=2)
    assert [int((y_int[v] == 1).sum()) for _, v in strat] == [2, 2, 2]
    # stratify=True on float values groups equal values
    yf = torch.tensor([0.] * 6 + [1.] * 6)
    assert [int((yf[v] == 1).sum()) for _, v in kfold_indices(yf, 3, stratify=True, seed=2)] == [2, 2, 2]


def test_fold_errors_name_the_problem():
    with pytest.raises(ValueError, match=r'k must be an integer >= 2.*got 1'):
        kfold_indices(10, k=1)
    with pytest.raises(ValueError, match='k must be an integer'):
        kfold_indices(10, k=2.5)
    with pytest.raises(ValueError, match=r'k=11 folds of 10 items.*at most 10'):
        kfold_indices(10, k=11)
    y = torch.tensor([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(ValueError, match=r"class 1 \('cat'\) has 3 item.*k=5.*at most 3, or use stratify=False"):
        kfold_indices(y, k=5, stratify=True, classes=['dog', 'cat', 'cow'])
    with pytest.raises(ValueError, match='stratify=True needs the labels'):
        kfold_indices(10, k=2, stratify=True)
    with pytest.raises(ValueError, match="stratify must be True, False or 'auto'"):
        kfold_indices(10, k=2, stratify='yes')
    with pytest.warns(UserWarning, match=r'class 1 has 3 item\(s\), fewer than the k=5 folds'):
        folds = kfold_indices(y, k=5)  # 'auto' warns and still spreads the class
    check_partition(folds, 23, 5)
    assert sorted(int((y[v] == 1).sum()) for _, v in folds) == [0, 0, 1, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        kfold_indices(y, k=5, stratify=False)


class Double:
    """A deterministic after_batch (the kind of thing normalisation is), to see which loader got which."""

    def __init__(self, f):
        self.f = f

    def __call__(self, b):
        return b[0] * self.f, b[1]


def test_fold_data_of_tensors_holds_the_training_items_at_the_indices():
    data = make_data(n_train=30, n_valid=10, bs=4, val_bs=7)
    data.train_dl.after_batch, data.valid_dl.after_batch = Double(2.), Double(3.)
    x, y = data.train_dl.tensors
    tr, va = kfold_indices(y, 3, seed=0)[1]
    fd = fold_data(data, tr, va)
    assert type(fd) is DataBunch
    assert torch.equal(fd.train_dl.tensors[0], x[tr]) and torch.equal(fd.train_dl.tensors[1], y[tr])
    assert torch.equal(fd.valid_dl.tensors[0], x[va]) and torch.equal(fd.valid_dl.tensors[1], y[va])
    t, v = fd.train_dl, fd.valid_dl
    assert (t.batch_size, t.shuffle, t.drop_last, v.batch_size, v.shuffle, v.drop_last) == (4, True, True, 7, False,
                                                                                          False)
    assert t.after_batch is data.train_dl.after_batch and v.after_batch is data.valid_dl.after_batch
    assert (fd.c, fd.classes, fd.c_inferred) == (data.c, data.classes, data.c_inferred)
    assert fd.input_spec() == data.input_spec()
    xb, _ = next(iter(v))
    assert torch.equal(xb, x[va][:7] * 3.)  # the validation pipeline, not the training one
    # no validation set: the fold validates with the training loader's after_batch (as DatasetType.Fix does)
    nov = make_data(n_train=30, n_valid=0, bs=4)
    nov.train_dl.after_batch = Double(2.)
    fd = fold_data(nov, tr, va)
    assert fd.valid_dl.batch_size == 4 and fd.valid_dl.after_batch is nov.train_dl.after_batch
    # the original validation set is not part of any fold
    folds = kfold_data(data, 3)
    assert sum(len(f.valid_dl.tensors[0]) for f in folds) == 30
    assert all(len(f.train_dl.tensors[0]) + len(f.valid_dl.tensors[0]) == 30 for f in folds)


def test_fold_data_of_a_torch_dataloader():
    ds = torch.utils.data.TensorDataset(torch.randn(12, 3), torch.arange(12) % 2)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, drop_last=True)
    data = DataBunch(dl, torch.utils.data.DataLoader(ds, batch_size=5), c=2)
    (tr, va), _ = kfold_indices(ds.tensors[1], 2, seed=0)
    fd = fold_data(data, tr, va)
    assert fd.train_dl.drop_last and isinstance(fd.train_dl.sampler, torch.utils.data.RandomSampler)
    assert fd.valid_dl.batch_size == 5 and not fd.valid_dl.drop_last
    assert torch.equal(torch.cat([b[0] for b in fd.valid_dl]), ds.tensors[0][va])
    assert [len(f.valid_dl.dataset) for f in kfold_data(data, 2)] == [6, 6]


def image_data(n=24, n_valid=6, stats=True, **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n + n_valid, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(n + n_valid) % 3
    data = ImageDataBunch.from_tensors(x[:n], y[:n], x[n:], y[n:], classes=['a', 'b', 'c'],
                                       tfms=([FlipLR(p=1.)], []), bs=4, val_bs=5, device='cpu', **kw)
    return data.normalize() if stats else data


def test_fold_data_of_images_keeps_the_pipeline_and_augments_only_training():
    data = image_data()
    tr, va = kfold_indices(data.train_ds.y, 4, seed=0)[2]
    fd = fold_data(data, tr, va)
    assert type(fd) is ImageDataBunch
    assert torch.equal(fd.train_ds.x, data.train_ds.x[tr]) and torch.equal(fd.train_ds.y, data.train_ds.y[tr])
    assert torch.equal(fd.valid_ds.x, data.train_ds.x[va]) and torch.equal(fd.valid_ds.y, data.train_ds.y[va])
    assert fd.classes == data.classes and fd.c == 3 and fd.input_spec() == data.input_spec()
    assert all(torch.equal(a, b) for a, b in zip(fd.stats, data.stats))  # the whole training set's stats
    assert (fd.train_dl.batch_size, fd.valid_dl.batch_size, fd.train_dl.drop_last) == (4, 5, True)
    assert fd.train_tfms == data.train_tfms and fd.valid_tfms == []
    # the oracle: the original's pipelines applied to those images by hand
    mean, std = (s[None, :, None, None] for s in data.stats)
    by_hand = (data.train_ds.x[va].float() / 255 - mean) / std
    xb, yb = next(iter(fd.valid_dl))
    assert torch.allclose(xb, by_hand[:5], atol=1e-6) and torch.equal(yb, data.train_ds.y[va][:5])
    torch.manual_seed(0)
    xb, yb = next(iter(fd.train_dl))  # FlipLR(p=1) flips every training image
    torch.manual_seed(0)
    j = torch.randperm(len(tr))[:4]
    assert torch.allclose(xb, ((data.train_ds.x[tr][j].float() / 255 - mean) / std).flip(-1), atol=1e-6)
    # unnormalised data stays unnormalised
    raw = image_data(stats=False)
    assert fold_data(raw, tr, va).stats is None


class Start(Callback):
    """Records the weights each fit starts from and its training set's size."""
    seen = []

    def before_fit(self, learn):
        Start.seen.append(([p.detach().clone() for p in learn.model.parameters()], len(learn.data.train_dl.tensors[0])))


def make_learner(data, hidden=16, probe=True):
    torch.randn(len(data.train_dl.tensors[0]))  # the fold's size moves the RNG: each fold's own weights differ
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))
    return Learner(data, model, silent=True, metrics=[accuracy], callback_fns=[Start] if probe else None)


def test_cross_validate_gives_one_record_per_fold_and_numpy_statistics():
    data = make_data(n_train=50, n_valid=10, bs=8)
    Start.seen = []
    res = cross_validate(make_learner, data, k=3, epochs=2, max_lr=1e-2, seed=0)
    assert [r['fold'] for r in res.folds] == [0, 1, 2] and all(r['status'] == 'done' for r in res.folds)
    assert [r['name'] for r in res.folds] == ['default fold 0', 'default fold 1', 'default fold 2']
    assert len(Start.seen) == 3 and sorted(n for _, n in Start.seen) == [33, 33, 34]
    w0 = Start.seen[0][0]
    assert all(all(torch.equal(a, b) for a, b in zip(w0, w)) for w, _ in Start.seen[1:])
    for name in ('train_loss', 'valid_loss', 'accuracy'):
        vals = np.array([r['final'][name] for r in res.folds])
        assert res.mean[name] == pytest.approx(vals.mean(), rel=1e-12)
        assert res.sd[name] == pytest.approx(vals.std(ddof=1), rel=1e-12)
    assert res.score == res.mean['valid_loss'] and res.status == 'done'
    # hand-checked: mean and sample sd of 1, 2, 4 are 7/3 and sqrt(7/3)
    hand = CVResult([{'final': {'valid_loss': v}, 'status': 'done', 'epochs': [], 'seconds': 0.} for v in (1., 2., 4.)])
    assert hand.mean['valid_loss'] == pytest.approx(7 / 3) and hand.sd['valid_loss'] == pytest.approx((7 / 3) ** .5)


def test_a_fold_record_equals_training_that_fold_by_hand():
    data = make_data(n_train=50, n_valid=10, bs=8)
    res = cross_validate(make_learner, data, k=3, epochs=2, max_lr=3e-3, seed=5, config={'hidden': 12, 'wd': 1e-3},
                         stratify=False)
    folds = kfold_indices(50, 3, seed=5)
    set_seed(5)
    init = make_learner(fold_data(data, *folds[0]), hidden=12).model.state_dict()  # fold 0's learner's weights
    for i in (0, 2):
        set_seed(5)
        learn = make_learner(fold_data(data, *folds[i]), hidden=12, probe=False)
        learn.model.load_state_dict(init)
        set_seed(5)
        learn.fit_one_cycle(2, 3e-3, wd=1e-3)
        r = learn.recorder
        rec = res.folds[i]
        assert rec['steps']['loss'] == r.raw_losses and rec['steps']['lr'] == r.lrs  # bit-identical
        assert [e['valid_loss'] for e in rec['epochs']] == r.val_losses
        assert rec['final']['accuracy'] == r.metrics[-1][0] and rec['config'] == {'hidden': 12, 'wd': 0.001}


def test_diverged_folds_are_recorded_and_left_out_of_the_mean():
    data = make_data(n_train=30, n_valid=0, bs=5)
    class Boom(Callback):
        def after_batch(self, learn):
            if learn.data.tag == 1 and learn.epoch == 1:
                raise DivergenceError('boom')
    tags = iter(range(100))

    def make(data):
        data.tag = next(tags) - 1  # the first learner is made for the initial weights
        return Learner(data, nn.Linear(8, 3), silent=True, metrics=[accuracy], callback_fns=[Boom])
    seen = []
    res = cross_validate(make, data, k=3, epochs=3, on_fold=lambda i, r: seen.append((i, r['status'])))
    assert seen == [(0, 'done'), (1, 'diverged'), (2, 'done')]
    assert res.status == 'diverged' and '  diverged' in res.table()
    ok = [res.folds[0]['final']['valid_loss'], res.folds[2]['final']['valid_loss']]
    assert res.mean['valid_loss'] == pytest.approx(np.mean(ok)) and res.sd['valid_loss'] == pytest.approx(
        np.std(ok, ddof=1))
    rec = res.record()
    assert rec['status'] == 'diverged' and rec['fold_status'] == ['done', 'diverged', 'done']
    assert record_problem(rec) is None
    assert GridResult([rec]).summary()[0]['complete'] is False  # never ranked on the surviving folds


def test_on_fold_exception_stops_the_cross_validation():
    data = make_data(n_train=30, n_valid=0, bs=5)
    calls = []

    def stop(i, rec):
        calls.append(i)
        raise KeyboardInterrupt('pruned')
    with pytest.raises(KeyboardInterrupt, match='pruned'):
        cross_validate(lambda data: make_learner(data, probe=False), data, k=3, epochs=1, on_fold=stop)
    assert calls == [0]


def test_cv_record_table_and_plot():
    data = make_data(n_train=40, n_valid=0, bs=8)
    res = cross_validate(lambda data, hidden=16: make_learner(data, hidden, probe=False), data, k=4, epochs=3,
                         config={'hidden': 8, 'moms': (0.9, 0.8)})
    rec = res.record()
    assert record_problem(rec) is None and rec['status'] == 'done' and rec['k'] == 4
    assert rec['name'] == 'hidden=8 moms=(0.9, 0.8)' and rec['config'] == {'hidden': 8, 'moms': [0.9, 0.8]}
    assert rec['final'] == res.mean and rec['sd'] == res.sd and rec['folds'] == [r['final'] for r in res.folds]
    assert rec['seconds'] == pytest.approx(sum(r['seconds'] for r in res.folds))
    assert [e['epoch'] for e in rec['epochs']] == [0, 1, 2]
    assert rec['epochs'][1]['valid_loss'] == pytest.approx(np.mean([r['epochs'][1]['valid_loss'] for r in res.folds]))
    assert res.record('mine')['name'] == 'mine'
    GridResult([rec]).table()  # a grid result holds a CV-scored run
    lines = res.table().splitlines()
    assert lines[0].split() == ['fold', 'train_loss', 'valid_loss', 'accuracy', 'seconds', 'status']
    assert [ln.split()[0] for ln in lines[1:]] == ['0', '1', '2', '3', 'mean', 'sd']
    assert f"{res.mean['accuracy']:.4f}" in lines[5] and f"{res.sd['accuracy']:.4f}" in lines[6]
    assert repr(res) == res.table()
    fig = res.plot('accuracy')
    ax = fig.axes[0]
    assert len(ax.lines) == 5 and ax.get_xlabel() == 'Epoch' and ax.get_ylabel() == 'accuracy'
    assert '4 folds' in ax.get_title() and [t.get_text() for t in ax.get_legend().get_texts()][-1] == 'mean'
    assert list(ax.lines[-1].get_ydata()) == pytest.approx([e['accuracy'] for e in rec['epochs']])


def test_cross_validate_image_data():
    data = image_data(n=24)

    def make(data):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        return Learner(data, model, silent=True, metrics=[accuracy])
    res = cross_validate(make, data, k=3, epochs=1)
    assert len(res.folds) == 3 and res.status == 'done' and record_problem(res.record()) is None
    with pytest.raises(ValueError, match=r"policy must be one of"):
        cross_validate(make, data, k=3, policy='cosine')


def digits_cv(n_folds=5, epochs=4):
    datasets = pytest.importorskip('sklearn.datasets')
    d = datasets.load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    data = DataBunch.from_tensors(x[:1500], y[:1500], x[1500:], y[1500:], bs=32)  # 297 held out, untouched by CV

    def make(data):
        return Learner(data, nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), silent=True,
                       metrics=[accuracy])
    return cross_validate(make, data, k=n_folds, epochs=epochs, max_lr=1e-2)


def test_digits_cross_validation_accuracy_is_plausible():
    res = digits_cv()
    print(res)
    assert res.mean['accuracy'] > 0.9 and 0 < res.sd['accuracy'] < 0.05
    assert all(r['final']['accuracy'] > 0.85 for r in res.folds)
