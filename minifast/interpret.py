"""What a trained classifier gets wrong (fastai v1's ClassificationInterpretation: top losses, confusion matrix, most
confused pairs) and `learn.show_results`, from one prediction pass over a dataset."""

import numpy as np
import torch

from .callbacks.recorder import new_figure
from .data.core import DatasetType, TensorDataLoader
from .tta import TTA

__all__ = ['ClassificationInterpretation', 'interpret', 'show_results']


class ClassificationInterpretation:
    """Predictions `preds`, targets `y_true` and per-item `losses` of `learn` on the `ds_type` set, with
    `pred_class` the argmax of each prediction: the top losses, the confusion matrix and its plots."""

    def __init__(self, learn, preds, y_true, losses, ds_type=DatasetType.Valid):
        self.learn, self.data, self.ds_type = learn, learn.data, ds_type
        self.preds, self.y_true, self.losses = preds, y_true, losses
        self.pred_class = preds.argmax(dim=1) if preds.ndim == 2 else preds

    @classmethod
    def from_learner(cls, learn, ds_type=DatasetType.Valid, activ=None, tta=False):
        """From one `learn.get_preds(ds_type, with_loss=True)` pass (losses computed batch-wise on the device), or
        from learn.TTA(..., with_loss=True) with tta=True."""
        if tta:
            preds, y, losses = TTA(learn, ds_type=ds_type, activ=activ, with_loss=True)
        else:
            preds, y, losses = learn.get_preds(ds_type, activ=activ, with_loss=True)
        return cls(learn, preds, y, losses, ds_type)

    def __repr__(self):
        return f'{type(self).__name__}({len(self.losses)} items of {self.ds_type.name}, {self._n_classes()} classes)'

    def top_losses(self, k=None, largest=True):
        """(losses, indices) of the `k` largest losses (smallest with largest=False), as torch.topk; k=None or a k
        beyond the set's size gives every item, sorted."""
        n = len(self.losses)
        if k is not None and (isinstance(k, bool) or int(k) != k or k < 0):
            raise ValueError(f'top_losses: k must be a non-negative integer or None, got {k!r}')
        return self.losses.topk(n if k is None else min(int(k), n), largest=largest)

    def _n_classes(self):
        classes = getattr(self.data, 'classes', None)
        if classes is not None:
            return len(classes)
        c = getattr(self.data, 'c', None)
        return c if c is not None else self.preds.shape[1] if self.preds.ndim == 2 else 0

    def _class_names(self):
        classes = getattr(self.data, 'classes', None)
        return [str(c) for c in classes] if classes is not None else [str(i) for i in range(self._n_classes())]

    def confusion_matrix(self, slice_size=None):
        """Counts (numpy int64, classes x classes): row = actual class, column = predicted class. (fastai v1's
        `slice_size` is accepted and unused: one bincount needs no slicing.)"""
        y, p, c = self.y_true, self.pred_class, self._n_classes()
        if y.ndim != 1 or y.is_floating_point() or self.preds.ndim != 2:
            raise ValueError(f'confusion_matrix needs single-label classification: integer targets of one label per '
                             f'item and one score per class; got targets {tuple(y.shape)} {y.dtype}, predictions '
                             f'{tuple(self.preds.shape)}')
        if self.preds.shape[1] != c:
            raise ValueError(f'confusion_matrix: the predictions have {self.preds.shape[1]} columns but the data has '
                             f'{c} classes')
        y = y.long()
        bad = (y < 0) | (y >= c)
        if bad.any():
            raise ValueError(f'confusion_matrix: target {int(y[bad][0])} is outside the {c} classes 0..{c - 1}')
        cm = torch.bincount(y * c + p.long(), minlength=c * c).view(c, c)
        return cm.numpy().astype(np.int64)

    def most_confused(self, min_val=1, slice_size=None):
        """[(actual, predicted, count)] of the off-diagonal cells of the confusion matrix with count >= min_val,
        the largest count first."""
        cm, names = self.confusion_matrix(), self._class_names()
        np.fill_diagonal(cm, 0)
        res = [(names[i], names[j], int(cm[i, j])) for i, j in zip(*np.nonzero(cm >= max(min_val, 1)))]
        return sorted(res, key=lambda r: -r[2])  # stable: ties stay in row, then column order

    def plot_confusion_matrix(self, normalize=False, title='Confusion matrix', cmap='Blues', slice_size=None,
                              norm_dec=2, plot_txt=True, return_fig=None, ax=None, figsize=None, dpi=None):
        """A Figure of the confusion matrix (actual classes down, predicted across); normalize divides each row by
        its count (a class absent from the set gets a row of zeros). fastai v1's arguments, in its order; the Figure
        is always returned (return_fig is accepted and unused), drawn on `ax` when given."""
        cm = self.confusion_matrix()
        if normalize:
            rows = cm.sum(1, keepdims=True)
            cm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
        names, c = self._class_names(), len(cm)
        fig, (ax,) = new_figure(ax, figsize=figsize or (max(4., 0.5 * c + 2), max(4., 0.5 * c + 1.5)))
        if dpi is not None:
            fig.set_dpi(dpi)
        im = ax.imshow(cm, interpolation='nearest', cmap=cmap, vmin=0)
        fig.colorbar(im, ax=ax)
        ax.set_title(title)
        ax.set_xticks(range(c))
        ax.set_xticklabels(names, rotation=90)
        ax.set_yticks(range(c))
        ax.set_yticklabels(names)
        if plot_txt:
            thresh = cm.max() / 2.
            for i in range(c):
                for j in range(c):
                    txt = f'{cm[i, j]:.{norm_dec}f}' if normalize else f'{cm[i, j]}'
                    ax.text(j, i, txt, ha='center', va='center', color='white' if cm[i, j] > thresh else 'black')
        ax.set_xlabel('Predicted')
        ax.set_ylabel('Actual')
        ax.grid(False)
        fig.tight_layout()
        return fig

    def plot_top_losses(self, k, largest=True, figsize=(12, 12), heatmap=False, return_fig=None):
        """A Figure of the `k` images with the largest losses as the model saw them (no augmentation), each titled
        prediction/actual/loss/probability of the actual class (k beyond the set: every item)."""
        if heatmap:
            raise NotImplementedError('plot_top_losses: heatmap=True (fastai v1\'s Grad-CAM overlay) is not '
                                      'implemented; call it with heatmap=False')
        if self.ds_type is DatasetType.Train:
            raise ValueError('plot_top_losses: the Train loader is shuffled and augmented, so its losses cannot be '
                             'matched with images; interpret ds_type=DatasetType.Fix (the training set in order)')
        val, idx = self.top_losses(k, largest)
        x = model_inputs(self.data, self.data.dl(self.ds_type), idx, 'plot_top_losses')
        names = self._class_names()
        fig = self.data.image_grid(x, figsize)
        for ax, i, loss in zip(fig.axes, idx.tolist(), val.tolist()):
            actual = int(self.y_true[i])
            ax.set_title(f'{names[int(self.pred_class[i])]}/{names[actual]} / {loss:.2f} / '
                         f'{float(self.preds[i, actual]):.2f}', fontsize=8)
        fig.suptitle('prediction/actual/loss/probability')
        fig.tight_layout()
        return fig


def model_inputs(data, dl, idx, who):
    """The items `idx` of the loader `dl` of an image bunch as the model sees them without augmentation (the uint8
    images through the validation pipeline), on the data's device."""
    x = dl.tensors[0] if isinstance(dl, TensorDataLoader) else None
    if x is None or x.dtype != torch.uint8 or x.ndim != 4 or not hasattr(data, 'preprocess'):
        raise TypeError(f'{who} shows images: it needs an ImageDataBunch (uint8 images N x C x H x W); this '
                        f'learner has a {type(data).__name__} whose loader is a {type(dl).__name__}')
    return data.preprocess(x[idx.to(x.device)])


def interpret(learn, ds_type=DatasetType.Valid, tta=False, activ=None):
    """fastai v1's learn.interpret(ds_type, tta): ClassificationInterpretation.from_learner(learn, ds_type, activ,
    tta)."""
    return ClassificationInterpretation.from_learner(learn, ds_type, activ, tta)


def show_results(learn, ds_type=DatasetType.Valid, rows=3, figsize=None):
    """A Figure of the first rows x rows images of the `ds_type` set (Train: the training set in order) as the model
    sees them, titled actual/predicted, the wrong ones in red."""
    data = learn.data
    dl = data.dl(DatasetType.Fix if ds_type is DatasetType.Train else ds_type)
    n = min(int(rows) ** 2, len(dl.dataset))
    if n < 1:
        raise ValueError(f'show_results: nothing to show (rows={rows}, {len(dl.dataset)} items in {ds_type.name})')
    idx = torch.arange(n)
    x = model_inputs(data, dl, idx, 'show_results')
    y = dl.tensors[1][:n]
    one = TensorDataLoader(x, y, batch_size=n)
    preds = learn.get_preds(dl=one)[0]
    if preds.ndim != 2:
        raise ValueError(f'show_results shows classifications: the model gives predictions shaped '
                         f'{tuple(preds.shape)}, not one score per class')
    pred = preds.argmax(1)
    names = [str(c) for c in getattr(data, 'classes', None) or range(preds.shape[-1])]
    fig = data.image_grid(x, figsize or (2.2 * rows, 2.4 * rows))
    for ax, a, p in zip(fig.axes, y.tolist(), pred.tolist()):
        ax.set_title(f'{names[a]}/{names[p]}', fontsize=9, color='black' if a == p else 'red')
    fig.suptitle('actual/predicted (red: wrong)')
    fig.tight_layout()
    return fig
