"""Experiment trackers as callbacks: TensorBoardLogger, MLflowLogger and WandbLogger mirror a fit's Recorder (per-step
lr/momentum/losses, per-epoch losses and metrics, hyper-parameters with the final metrics, figures) into the tools
users already read. Rank 0 writes; each library is an optional extra (`pip install minifast[track]`) imported when a
tracker is first used, never by `import minifast`."""
import contextlib
import functools
import importlib
import math
import re
import uuid
import shutil
import time
from numbers import Number
from pathlib import Path

import matplotlib.pyplot as plt

from ..core import Callback
from ..distributed import is_main
from .lr_finder import LRFinder, ema_step

__all__ = ['Tracker', 'TensorBoardLogger', 'MLflowLogger', 'WandbLogger', 'param_value', 'flat_params',
           'fit_params', 'run_status']

_TEXT = ('.md', '.txt', '.json', '.jsonl', '.csv', '.yaml', '.yml', '.log')


def _library(module, who):
    """The optional library `module`, or an ImportError that names the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split('.')[0]
        raise ImportError(f'{who} needs the {top!r} package, which is not installed: pip install minifast[track] '
                          f'({e})') from e


def _name(f):
    """A readable name for a function, class or partial: 'SGD(momentum=0.9)' for partial(torch.optim.SGD, ...)."""
    if isinstance(f, functools.partial):
        kw = ', '.join(f'{k}={param_value(v)}' for k, v in f.keywords.items())
        return f'{_name(f.func)}({kw})'
    return getattr(f, '__name__', None) or type(f).__name__


def param_value(v):
    """A value trackers' params accept: bools, ints, finite floats and strings as they are; numpy/torch scalars as
    numbers; anything else (tuples, slices, None, nan, classes, functions) as a short string."""
    if hasattr(v, 'item') and getattr(v, 'ndim', 0) == 0:
        v = v.item()
    if isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return '(' + ', '.join(str(param_value(x)) for x in v) + ')'
    if isinstance(v, slice):
        return f'slice({v.start}, {v.stop})'
    if isinstance(v, Number):
        return float(v)
    if v is None:
        return 'None'
    if callable(v):
        return _name(v)
    return str(v)


def flat_params(params, prefix=''):
    """{'a/b': value} for nested dicts {'a': {'b': value}}, every value through `param_value`."""
    out = {}
    for k, v in (params or {}).items():
        key = f'{prefix}{k}'
        if isinstance(v, dict):
            out.update(flat_params(v, key + '/'))
        else:
            out[key] = param_value(v)
    return out


def fit_params(learn):
    """The hyper-parameters of learn's current fit: epochs, lr (one per layer group when they differ), wd,
    optimizer, true_wd, bn_wd, batch size, number of layer groups, loss function and model class."""
    args = learn.fit_args or {}
    lrs = list(args.get('lr') or [])
    p = {'epochs': learn.n_epoch}
    if lrs and len(set(lrs)) == 1:
        p['lr'] = lrs[0]
    else:
        p.update({f'lr/group{i}': lr for i, lr in enumerate(lrs)})
    dl = getattr(learn.data, 'train_dl', None)
    p.update({'wd': args.get('wd', learn.wd), 'opt_func': _name(learn.opt_func), 'true_wd': learn.true_wd,
              'bn_wd': learn.bn_wd, 'bs': getattr(dl, 'batch_size', None), 'n_groups': len(learn.layer_groups),
              'loss_func': _name(learn.loss_func), 'model': type(learn.model).__name__})
    return p


def run_status(error):
    """'FINISHED' when `error` is None, 'KILLED' for a KeyboardInterrupt, 'FAILED' for any other exception."""
    if error is None:
        return 'FINISHED'
    return 'KILLED' if isinstance(error, KeyboardInterrupt) else 'FAILED'


def _finite(v):
    return v is not None and isinstance(v, Number) and math.isfinite(v)


class Tracker(Callback):
    """Base of the trackers: a callback that mirrors each fit into one tracker run (rank 0 only).

    before_fit logs the fit's parameters (`fit_params`, then `params`); after_epoch the epoch's steps from the
    Recorder ('lr/group{i}', 'mom/group{i}', 'loss/raw', 'loss/smooth', at the global step: no host sync in the
    training loop) and its row (train_loss, valid_loss, each metric, at the epoch); after_fit what is left (a cancelled
    epoch), the hyper-parameters with the final metrics, the Recorder's loss and lr/momentum plots (or the lr_find
    curve, when the fit was an LR range test), and ends the run FINISHED, FAILED (an exception) or KILLED (Ctrl-C).
    The same instance in a later fit appends to the same run: steps and epochs continue, and parameters that
    changed are logged as 'fit{n}/name' (trackers keep the first value of a parameter).

    Outside a fit: log_params, log_metrics, log_figure, log_artifact, log_record, child (a nested run per grid run
    or search trial) and close; `with tracker:` closes it (FAILED/KILLED when the block raises).
    """
    order = 65  # after the Recorder (50), CSVLogger and the progress bar; before Checkpoint (90)
    _who = 'Tracker'

    def __init__(self, params=None):
        self.params = dict(params or {})
        self._main = is_main()
        self._open_run = False
        self._logged = {}  # every parameter written to the run, by name
        self._step = self._epoch = self._fits = 0  # where the next fit's steps and epochs start, fits so far
        self._uid = uuid.uuid4().hex  # which tracker (hence which run) a checkpoint's state was written by

    # ---- what a backend writes -----------------------------------------------------------------------------------
    def _open(self):
        """Start (or resume) this tracker's run."""
        raise NotImplementedError

    def _write_params(self, params):
        raise NotImplementedError

    def _write_scalars(self, rows, axis):
        """rows: (name, value, step) triples; axis: 'step' or 'epoch', what the steps count."""
        raise NotImplementedError

    def _write_figure(self, fig, name, step):
        raise NotImplementedError

    def _write_artifact(self, path):
        raise NotImplementedError

    def _write_hparams(self, params, metrics, epoch):
        """The run's hyper-parameters together with its final metrics (TensorBoard's hparams view, W&B's summary);
        `epoch`: the last epoch's number."""

    def _finish(self, status):
        """End the run with `status` ('FINISHED', 'FAILED' or 'KILLED'); a later write reopens it."""
        raise NotImplementedError

    def _make_child(self, name, params):
        raise NotImplementedError

    def _ensure_open(self):
        if not self._open_run:
            self._open()
            self._open_run = True

    # ---- public ----------------------------------------------------------------------------------------------
    def log_params(self, params):
        """Log parameters (nested dicts become 'a/b'); a name logged before with another value is logged as
        'fit{n}/name' (n: the fit), as trackers keep a parameter's first value."""
        if not self._main:
            return
        new = {}
        for k, v in flat_params(params).items():
            if k not in self._logged:
                new[k] = v
            elif self._logged[k] != v:
                new[f'fit{self._fits}/{k}'] = v
        new = {k: v for k, v in new.items() if self._logged.get(k, object()) != v}
        if new:
            self._ensure_open()
            self._write_params(new)
            self._logged.update(new)

    def log_metrics(self, metrics, step=None, axis='step'):
        """Log {name: number} at `step` (default: the tracker's next global step); None and non-finite values are
        skipped."""
        if not self._main:
            return
        step = self._step if step is None else step
        rows = [(k, float(v), step) for k, v in metrics.items() if _finite(v)]
        if rows:
            self._ensure_open()
            self._write_scalars(rows, axis)

    def log_figure(self, fig, name, step=None, close=True):
        """Log a matplotlib figure as an image named `name`; closes it (pyplot keeps every open figure) unless
        close=False."""
        try:
            if self._main:
                self._ensure_open()
                self._write_figure(fig, name, self._step if step is None else step)
        finally:
            if close:
                plt.close(fig)

    def log_artifact(self, path):
        """Log a file (report.md, a PNG, a CSV...) with the run."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f'{type(self).__name__}.log_artifact: {path} is not a file')
        if self._main:
            self._ensure_open()
            self._write_artifact(path)

    def log_record(self, record, name=None):
        """Replay a run record as grid.run_record writes it into a child run named `name` (default: its name):
        config, seed and status as params, its per-step lr/mom/loss ('lr', 'mom': the last layer group, as the
        record keeps; 'loss/raw', 'loss/smooth'), its per-epoch rows, and its final values as hparams. A grid calls
        it for the runs it reuses from its log, so the tracker still shows every run."""
        if not self._main:
            return
        params = {**record.get('config', {}), 'seed': record.get('seed'), 'status': record.get('status'),
                  'verdict': record.get('verdict')}
        status = 'FINISHED' if record.get('status', 'done') == 'done' else 'FAILED'
        with self.child(name or record.get('name') or 'run', params) as c:
            c.log_params(c.params)
            steps = record.get('steps') or {}
            rows, mov = [], 0.
            for i, lr in enumerate(steps.get('lr') or []):
                rows.append(('lr', lr, i))
            for i, m in enumerate(steps.get('mom') or []):
                rows.append(('mom', m, i))
            for i, v in enumerate(steps.get('loss') or [], 1):
                mov, smooth = ema_step(mov, v, 0.98, i)  # the Recorder's smoothing (beta 0.98)
                rows += [('loss/raw', v, i - 1), ('loss/smooth', smooth, i - 1)]
            c._write_scalars([r for r in rows if _finite(r[1])], 'step')
            erows = [(k, v, row.get('epoch', e)) for e, row in enumerate(record.get('epochs') or [])
                     for k, v in row.items() if k not in ('epoch', 'time') and _finite(v)]
            c._write_scalars(erows, 'epoch')
            final = {k: float(v) for k, v in (record.get('final') or {}).items() if _finite(v)}
            c._write_hparams(dict(c._logged), final, max(len(record.get('epochs') or []) - 1, 0))
            c._step, c._epoch = len(steps.get('lr') or []), len(record.get('epochs') or [])
            c._close(status)

    @contextlib.contextmanager
    def child(self, name, params=None):
        """A tracker (a callback) for one sub-run (a grid run, a search trial) nested under this one; it is closed
        when the block ends (FAILED/KILLED when the block raises)."""
        c = self._make_child(name, params)
        c._main = self._main
        try:
            yield c
        except BaseException as e:
            c._close(run_status(e))
            raise
        c._close('FINISHED')

    def close(self):
        """End the run (FINISHED); a later write opens it again."""
        self._close('FINISHED')

    def _close(self, status):
        if self._open_run:
            self._open_run = False
            self._finish(status)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        self._close(run_status(error))

    # ---- callback hooks --------------------------------------------------------------------------------------
    def before_fit(self, learn):
        self._main, self._in_fit = learn.is_main, True
        self._done_steps = self._done_epochs = 0  # of this fit's Recorder lists, written so far
        if not self._main:
            return
        self._sweep = any(isinstance(cb, LRFinder) for cb in learn.hooks.cbs)
        self._ensure_open()
        self.log_params({**fit_params(learn), **self.params})

    def state_dict(self):
        """What a checkpoint keeps: this tracker's identity, where this fit's steps and epochs start in its run and how
        many of them are written."""
        return {'tracker': self._uid, 'step': self._step, 'epoch': self._epoch,
                'done_steps': getattr(self, '_done_steps', 0), 'done_epochs': getattr(self, '_done_epochs', 0)}

    def load_state_dict(self, state):
        """Resuming a fit this tracker wrote (the same run): its steps and epochs keep their numbers, and those
        written before the checkpoint are not written again (a later fit of another tracker writes them all, into its
        own run: they are part of that run's history)."""
        if state.get('tracker') == self._uid:
            self._step, self._epoch = state['step'], state['epoch']
            self._done_steps, self._done_epochs = state['done_steps'], state['done_epochs']

    def _write_steps(self, r):
        """The Recorder's steps not yet written (its lists are host floats at epoch end: no sync here)."""
        n = len(r.group_lrs)
        if n <= self._done_steps:
            return
        raw, smooth, rows = r.raw_losses, r.losses, []
        for i in range(self._done_steps, n):
            s = self._step + i
            rows += [(f'lr/group{g}', lr, s) for g, lr in enumerate(r.group_lrs[i])]
            if i < len(r.group_moms):
                rows += [(f'mom/group{g}', m, s) for g, m in enumerate(r.group_moms[i])]
            if i < len(raw):
                rows += [('loss/raw', raw[i], s), ('loss/smooth', smooth[i], s)]
        self._done_steps = n
        self._write_scalars([x for x in rows if _finite(x[1])], 'step')

    def _epoch_row(self, r, e):
        row = {'train_loss': r.train_losses[e], 'valid_loss': r.val_losses[e]}
        row.update(zip(r.metrics_names, r.metrics[e]))
        return {k: float(v) for k, v in row.items() if _finite(v)}

    def _write_epochs(self, r):
        rows = []
        for e in range(self._done_epochs, len(r.train_losses)):
            rows += [(k, v, self._epoch + e) for k, v in self._epoch_row(r, e).items()]
        self._done_epochs = len(r.train_losses)
        if rows:
            self._write_scalars(rows, 'epoch')

    def after_epoch(self, learn):
        if self._main:
            self._write_steps(learn.recorder)
            self._write_epochs(learn.recorder)

    def after_fit(self, learn):
        if not self._main or not getattr(self, '_in_fit', False):  # (a fit that failed before this before_fit)
            return
        self._in_fit = False
        try:
            r = learn.recorder
            self._write_steps(r)
            self._write_epochs(r)
            final = self._epoch_row(r, len(r.train_losses) - 1) if r.train_losses else {}
            self._write_hparams(dict(self._logged), final, self._epoch + max(self._done_epochs - 1, 0))
            self._step += self._done_steps
            self._epoch += self._done_epochs
            self._figures(r)
        finally:  # whatever failed above, the run is not left open (an MLflow run RUNNING)
            self._fits += 1
            self._close(run_status(learn.exception))

    def _figures(self, r):
        if not r.group_lrs:
            return
        if self._sweep:
            self.log_figure(r.plot(), 'lr_find')
            return
        self.log_figure(r.plot_losses(), 'losses')
        self.log_figure(r.plot_lr(show_moms=bool(r.group_moms)), 'lr_mom')


def _safe(name):
    """`name` usable as one folder name."""
    return re.sub(r'[\\/:*?"<>|]+', '_', str(name)).strip() or 'run'


class TensorBoardLogger(Tracker):
    """Writes a fit (see Tracker) to TensorBoard event files in `log_dir` through torch.utils.tensorboard; the
    hyper-parameters with the final metrics ('final/<name>') go to the same run's hparams view; a child is the
    subfolder log_dir/name. Files given to log_artifact are copied to log_dir/artifacts (text files also shown as
    text). Needs the tensorboard package (pip install minifast[track])."""

    def __init__(self, log_dir='runs', params=None):
        super().__init__(params)
        self.log_dir, self.writer = Path(log_dir), None

    def _open(self):
        tb = _library('torch.utils.tensorboard', 'TensorBoardLogger')
        self.writer = tb.SummaryWriter(log_dir=str(self.log_dir))  # a new event file in the same run folder

    def _write_params(self, params):
        table = '\n'.join(f'| {k} | {v} |' for k, v in params.items())
        self.writer.add_text('params', f'| param | value |\n|---|---|\n{table}', self._fits)

    def _write_scalars(self, rows, axis):
        for name, v, step in rows:
            self.writer.add_scalar(name, v, step)

    def _write_figure(self, fig, name, step):
        self.writer.add_figure(name, fig, step, close=False)

    def _write_artifact(self, path):
        dest = self.log_dir / 'artifacts'
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / path.name)
        if path.suffix.lower() in _TEXT:
            self.writer.add_text(path.name, path.read_text(errors='replace'), self._step)

    def _write_hparams(self, params, metrics, epoch):
        summary = _library('torch.utils.tensorboard.summary', 'TensorBoardLogger')
        mets = {f'final/{k}': v for k, v in metrics.items()}
        # torch's add_hparams writes into a new subfolder per call; the summaries written here keep the hparams
        # in this run, so the hparams view links to its scalars
        for s in summary.hparams(params, mets):
            self.writer._get_file_writer().add_summary(s)
        for k, v in mets.items():
            self.writer.add_scalar(k, v, epoch)

    def _finish(self, status):
        self.writer.add_text('status', status, self._fits)
        self.writer.close()
        self.writer = None

    def _make_child(self, name, params):
        return TensorBoardLogger(self.log_dir / _safe(name), params)


class MLflowLogger(Tracker):
    """Writes a fit (see Tracker) to an MLflow run through MlflowClient only (no global tracking URI or active run
    is set). tracking_uri None: the SQLite store sqlite:///<cwd>/mlflow.db (MLflow's own default store) with
    artifacts in <cwd>/mlruns, the folder taken when the logger is made; any tracking URI otherwise. The experiment
    is created when missing, its artifacts in `artifact_location` when given (else as above, or the store's
    default for a given URI). Metrics go in batches (log_batch); figures and files are artifacts; the run ends
    FINISHED, FAILED or KILLED with the fit. One run per logger: a later fit reopens it and its steps continue; a
    child is a nested run (tag mlflow.parentRunId). Needs mlflow or mlflow-skinny (pip install minifast[track])."""
    _BATCH = 1000  # MLflow's limit on metrics per log_batch call

    def __init__(self, experiment='minifast', tracking_uri=None, run_name=None, params=None, artifact_location=None,
                 parent_run_id=None):
        super().__init__(params)
        self.experiment, self.run_name, self.parent_run_id = experiment, run_name, parent_run_id
        if tracking_uri is None:
            tracking_uri = f'sqlite:///{Path.cwd() / "mlflow.db"}'
            artifact_location = artifact_location or Path.cwd() / 'mlruns'
        if artifact_location is not None and '://' not in str(artifact_location):
            artifact_location = Path(artifact_location).resolve().as_uri()
        self.tracking_uri, self.artifact_location = str(tracking_uri), artifact_location
        self.run_id, self._client = None, None

    @property
    def client(self):
        """The MlflowClient of this logger's tracking URI."""
        if self._client is None:
            mlflow = _library('mlflow', 'MLflowLogger')
            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _experiment_id(self):
        c = self.client
        exp = c.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return c.create_experiment(self.experiment, artifact_location=self.artifact_location)
        except Exception:  # another process created it meanwhile
            exp = c.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _open(self):
        if self.run_id is not None:
            self.client.update_run(self.run_id, status='RUNNING')
            return
        tags = {'mlflow.parentRunId': self.parent_run_id} if self.parent_run_id else None
        run = self.client.create_run(self._experiment_id(), run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id

    def _write_params(self, params):
        entities = _library('mlflow.entities', 'MLflowLogger')
        ps = [entities.Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(ps), 100):  # MLflow's limit on params per call
            self.client.log_batch(self.run_id, params=ps[i:i + 100])

    def _write_scalars(self, rows, axis):
        entities = _library('mlflow.entities', 'MLflowLogger')
        now = int(time.time() * 1000)
        ms = [entities.Metric(k, float(v), now, int(s)) for k, v, s in rows]
        for i in range(0, len(ms), self._BATCH):
            self.client.log_batch(self.run_id, metrics=ms[i:i + self._BATCH])

    def _write_figure(self, fig, name, step):
        self.client.log_figure(self.run_id, fig, f'{name}.png')

    def _write_artifact(self, path):
        self.client.log_artifact(self.run_id, str(path))

    def _finish(self, status):
        self.client.set_terminated(self.run_id, status)

    def _make_child(self, name, params):
        self._ensure_open()  # the parent run must exist to nest under it
        c = MLflowLogger(self.experiment, self.tracking_uri, run_name=str(name), params=params,
                         artifact_location=self.artifact_location, parent_run_id=self.run_id)
        c._client = self._client
        return c


class WandbLogger(Tracker):
    """Writes a fit (see Tracker) to a Weights & Biases run; mode='offline' by default (nothing leaves the machine;
    `wandb sync <dir>/wandb/offline-run-*` uploads later). Per-step values are plotted against 'step', per-epoch ones
    against 'epoch' (define_metric); params go to the run's config, final metrics to its summary, figures as
    images, files through run.save. A later fit resumes the same run id; a child is a new run in this one's group.
    Needs wandb (pip install minifast[track])."""

    def __init__(self, project='minifast', mode='offline', dir=None, params=None, name=None, group=None,
                 **init_kwargs):
        super().__init__(params)
        self.project, self.mode, self.dir, self.name = project, mode, dir, name
        self.group = group or name or f'minifast-{time.strftime("%Y%m%d-%H%M%S")}'
        self.init_kwargs, self.run, self.run_id = init_kwargs, None, None

    def _open(self):
        wandb = _library('wandb', 'WandbLogger')
        kw = dict(project=self.project, mode=self.mode, name=self.name, group=self.group, reinit='create_new',
                  **self.init_kwargs)
        if self.dir is not None:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
            kw['dir'] = str(self.dir)
        if self.run_id is not None:
            kw.update(id=self.run_id, resume='allow')
        self.run = wandb.init(**kw)
        self.run_id = self.run.id
        for axis in ('step', 'epoch'):
            self.run.define_metric(axis)
        self.run.define_metric('lr/*', step_metric='step')
        self.run.define_metric('mom/*', step_metric='step')
        self.run.define_metric('loss/*', step_metric='step')

    def _write_params(self, params):
        self.run.config.update(params, allow_val_change=True)

    def _write_scalars(self, rows, axis):
        by_step = {}
        for k, v, s in rows:
            by_step.setdefault(s, {})[k] = v
        for s in sorted(by_step):
            vals = by_step[s]
            if axis == 'epoch':
                for k in vals:
                    self.run.define_metric(k, step_metric='epoch')
            self.run.log({axis: s, **vals})

    def _write_figure(self, fig, name, step):
        wandb = _library('wandb', 'WandbLogger')
        self.run.log({name: wandb.Image(fig)})

    def _write_artifact(self, path):
        self.run.save(str(path.resolve()), base_path=str(path.resolve().parent), policy='now')

    def _write_hparams(self, params, metrics, epoch):
        self.run.summary.update({f'final/{k}': v for k, v in metrics.items()})

    def _finish(self, status):
        self.run.finish(exit_code={'FINISHED': 0, 'KILLED': 255}.get(status, 1))
        self.run = None

    def _make_child(self, name, params):
        return WandbLogger(self.project, self.mode, self.dir, params=params, name=str(name), group=self.group,
                           **self.init_kwargs)
