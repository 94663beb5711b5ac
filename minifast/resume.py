"""The full training state a checkpoint holds, finding the newest checkpoint, and resuming a fit from it exactly.

A checkpoint is a dict of tensors and plain Python values (it loads with torch.load(weights_only=True)):
model and optimizer state dicts, the parameters that are frozen, the position in the fit (epoch, batches done in that
epoch, training steps), what the fit was (epochs, steps per epoch, the schedule sampled at a few steps), the RNG states
now and at the start of the epoch (which fixed that epoch's data order), the Recorder's history and every callback's
`state_dict()`.
"""
import contextlib
import os
import re
import time
import warnings
from pathlib import Path

from .checkpoint import CorruptCheckpointError, atomic_save, check_state_dict, load_state, remove_stale_temps
from .checks import metric_name
from .determinism import rng_state, set_rng_state
from .lock import folder_lock
from .optim import lacking_settings, opt_settings
from .state import preserved

__all__ = ['FORMAT', 'CHECKPOINT_FILE', 'training_state', 'find_checkpoint', 'list_checkpoints', 'checkpoint_info',
           'resumable', 'is_finished', 'load_for_resume', 'begin', 'replay', 'save', 'load', 'load_into']

FORMAT, VERSION = 'minifast-checkpoint', 1
# a Checkpoint file's name: {name}_{sequence number}_epoch{E}_step{S}.pth
CHECKPOINT_FILE = re.compile(r'_(\d+)_epoch(\d+)_step(\d+)\.pth$')


def _callback_states(learn):
    """{key: state} of the current fit's callbacks that can save and restore themselves (keys: class name, with
    '#i' from the second instance of a class on)."""
    out, seen = {}, {}
    for cb in (learn.hooks.cbs if learn.hooks is not None else None) or [learn.recorder, *learn.callbacks]:
        if callable(getattr(cb, 'state_dict', None)) and callable(getattr(cb, 'load_state_dict', None)):
            name = type(cb).__name__
            n = seen[name] = seen.get(name, -1) + 1
            out[name if n == 0 else f'{name}#{n}'] = cb
    return out


def fit_signature(learn):
    """What must match to continue a fit exactly: epochs, steps per epoch, each scheduler's sampled values, the
    optimizer's class and construction settings, and the precision."""
    try:
        per_epoch = learn.steps_per_epoch()
    except TypeError:
        per_epoch = None
    scheds = [cb.resume_signature(learn) for cb in (learn.hooks.cbs if learn.hooks is not None else [])
              if callable(getattr(cb, 'resume_signature', None))]
    return {'n_epoch': learn.n_epoch, 'steps_per_epoch': per_epoch, 'schedules': scheds, 'args': learn.fit_args,
            'world_size': learn.dist.world, 'accumulate': learn.stepper.n_acc,
            'metrics': [metric_name(m) for m in learn.metrics],
            # the optimizer's defaults, not its groups' values: schedules move lr, momentum and wd during a fit
            'optimizer': opt_settings(learn.opt) if learn.opt is not None else None,
            'precision': learn.stepper.precision}


def training_state(learn, where='end', with_opt=True, batch=None):
    """The learner's full state as a checkpoint dict.

    where: 'batch' (written in a training after_batch hook: that batch is done), 'boundary' (after a training batch
    completed, its counters already advanced: a deferred Ctrl-C), 'epoch' (in after_epoch: the epoch, validation
    included, is done), 'end' (the fit finished, or outside a fit: nothing left to resume), or None (somewhere in
    a fit that is no resumable point: learn.save from a callback). `batch` overrides the batches counted as done
    in the epoch ('batch'/'boundary'; e.g. all of them when the epoch's training was cut short).
    """
    if where not in ('batch', 'boundary', 'epoch', 'end', None):
        raise ValueError(f"training_state: where must be 'batch', 'boundary', 'epoch', 'end' or None, got {where!r}")
    in_fit = learn.hooks is not None
    pos = {'epoch': learn.epoch, 'n_epoch': learn.n_epoch, 'where': where,
           'batch': (learn.iter + 1 if batch is None else batch) if where in ('batch', 'boundary') else None,
           'train_iter': learn.train_iter + (1 if where == 'batch' else 0)}
    rec = learn.recorder
    state = {
        'format': FORMAT, 'version': VERSION, 'time': time.time(),
        'model': learn.model.state_dict(),
        # which parameters train: a callback may freeze or unfreeze layers during a fit (gradual unfreezing)
        'frozen': [k for k, p in learn.model.named_parameters() if not p.requires_grad],
        'opt': learn.opt.state_dict() if with_opt and learn.opt is not None else None,
        'position': pos,
        'signature': fit_signature(learn) if in_fit else None,
        'rng': rng_state(),
        'epoch_rng': learn.epoch_rng if where in ('batch', 'boundary') else None,
        'callbacks': {k: cb.state_dict() for k, cb in _callback_states(learn).items()} if in_fit else
        {'Recorder': rec.state_dict()},
    }
    scaler = learn.stepper.state_dict()
    if scaler is not None:  # fp16: the loss scale and its growth counter, so a resumed run scales the same
        state['grad_scaler'] = scaler
    return state


def list_checkpoints(folder):
    """Checkpoint files a Checkpoint callback wrote in `folder`, oldest first (by their sequence number)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_FILE.search(p.name))]
    return [p for _, p in sorted(found)]


def find_checkpoint(resume):
    """The file `resume` names: itself when it is a file, else the newest checkpoint in that folder (None when the
    folder is missing or holds none). Temporary files of killed writers there are removed."""
    p = Path(resume)
    if p.is_file():
        remove_stale_temps(p.parent)
        return p
    if p.suffix == '.pth':
        raise FileNotFoundError(f'resume: no such checkpoint file: {p}')
    remove_stale_temps(p)
    files = list_checkpoints(p)
    return files[-1] if files else None


def load_newest_intact(resume, file):
    """(file, state) of the checkpoint to resume from: `file` (what find_checkpoint(resume) found) when it is
    intact; when it is corrupt and `resume` is a folder, the newest intact older checkpoint there, with a warning
    naming the corrupt one(s). Raises CorruptCheckpointError naming them when none is intact."""
    if Path(resume).is_file():  # the file the user named: no other one stands in for it
        return file, load_state(file, 'cpu')
    files = list_checkpoints(resume)
    corrupt = []
    for f in reversed(files[:files.index(file) + 1] if file in files else [file]):
        try:
            state = load_state(f, 'cpu')
        except CorruptCheckpointError as e:
            corrupt.append(e)
            continue
        if corrupt:
            warnings.warn(f'resume: skipped corrupt checkpoint(s) in {resume}: '
                          + '; '.join(str(e) for e in corrupt) + f'. Resuming from the newest intact one, {f.name}')
        return f, state
    raise CorruptCheckpointError(corrupt[0].file, 'no intact checkpoint', f'resume: no checkpoint in {resume} is '
                                 'intact, so there is nothing to resume from: ' + '; '.join(str(e) for e in corrupt))


def resumable(folder):
    """True when `folder`'s newest checkpoint is a run that stopped before its end (`fit(..., resume=folder)` would
    continue it); False for no checkpoint, or a finished run. For notebooks: resume=folder if resumable(folder)."""
    file = find_checkpoint(folder) if Path(folder).exists() else None
    if file is None:
        return False
    st = load_newest_intact(folder, file)[1]  # as fit(resume=folder) does: a corrupt newest file is skipped
    pos = st.get('position') if isinstance(st, dict) else None
    return pos is not None and pos['where'] is not None and not is_finished(pos)


def checkpoint_info(file):
    """A short description of a checkpoint's position, e.g. 'epoch 3 of 10, 120 steps'."""
    st = load_state(file)
    return _describe(st['position']) if isinstance(st, dict) and 'position' in st else 'weights only'


def _describe(pos):
    if pos['where'] is None:
        return f"saved during epoch {pos['epoch']} of {pos['n_epoch']}, at no resumable point"
    if pos['where'] == 'end':
        return f"finished: {pos['n_epoch']} epochs, {pos['train_iter']} steps"
    if pos['where'] == 'epoch':
        return f"after epoch {pos['epoch']} of {pos['n_epoch']} ({pos['train_iter']} steps)"
    return f"epoch {pos['epoch']} of {pos['n_epoch']}, batch {pos['batch']} ({pos['train_iter']} steps)"


def is_finished(pos):
    """True when a checkpoint's position is the end of its fit (nothing left to resume)."""
    return pos['where'] == 'end' or (pos['where'] == 'epoch' and pos['epoch'] + 1 >= pos['n_epoch'])


def _describe_opt(name, settings, keys):
    """'AdamW(betas=(0.9, 0.99), eps=1e-08)': an optimizer's name with the settings `keys`."""
    return f"{name}({', '.join(f'{k}={settings[k]!r}' for k in keys)})"


def _opt_mismatch(a, b):
    """A sentence on how two optimizer signatures (`opt_settings`) differ, or None; None for an unknown one (a
    checkpoint written before signatures held the optimizer)."""
    if a is None or b is None:
        return None
    sa, sb = a['settings'], b['settings']
    # a setting only one side has was added by another torch version (its loading fills in the default)
    differ = [k for k in sa if k in sb and sa[k] != sb[k]]
    if a['class'] == b['class']:
        if not differ:
            return None
        keys_a = keys_b = differ
    else:
        keys_a, keys_b = list(sa), list(sb)
    na, nb = a['class'].rpartition('.')[2], b['class'].rpartition('.')[2]
    if na == nb and a['class'] != b['class']:  # same name in two modules: name them in full
        na, nb = a['class'], b['class']
    return (f'it was written by a fit with {_describe_opt(na, sa, keys_a)} and this learner has '
            f'{_describe_opt(nb, sb, keys_b)}; resume with the optimizer (opt_func) of the interrupted fit')


def _sig_mismatch(saved, now):
    """A sentence on the first difference between two fit signatures, or None."""
    why = _opt_mismatch(saved.get('optimizer'), now.get('optimizer'))
    if why is not None:
        return why
    a, b = saved.get('precision'), now.get('precision')
    if a is not None and a != b:  # absent: an older checkpoint
        return f'it was written in {a} and this learner trains in {b} (learn.to_{a}() resumes it)'
    a, b = saved.get('world_size', 1), now.get('world_size', 1)
    if a != b:
        return (f'it was written by {a} process(es) and this run has {b}; resume with the same number of processes '
                f'(torchrun --nproc_per_node {a} on one node), as the data order and batches depend on it')
    a, b = saved.get('accumulate', 1), now.get('accumulate', 1)
    if a != b:
        return (f'it was written by a fit accumulating gradients over {a} batch(es) per step and this call '
                f'accumulates over {b} (GradientAccumulation n_step)')
    a, b = saved.get('metrics'), now.get('metrics')
    if a is not None and a != b:  # the Recorder's history has one column per metric (absent: an older checkpoint)
        return f'it was written by a learner with the metrics {a} and this one has {b}'
    if saved['n_epoch'] != now['n_epoch']:
        return f"it was written by a {saved['n_epoch']}-epoch fit but this call trains {now['n_epoch']} epochs"
    if saved['steps_per_epoch'] != now['steps_per_epoch']:
        return (f"it was written with {saved['steps_per_epoch']} steps per epoch but the training DataLoader now "
                f"has {now['steps_per_epoch']} (batch size or dataset changed?)")
    a, b = saved['schedules'], now['schedules']
    if len(a) != len(b):
        return f'it was written by a fit with {len(a)} scheduler(s), this call has {len(b)}'
    for sa, sb in zip(a, b):
        if sa == sb:
            continue
        if sa.get('total_steps') != sb.get('total_steps'):
            return (f"its schedule lasts {sa.get('total_steps')} steps but this call's lasts "
                    f"{sb.get('total_steps')}")
        for (t, va), (_, vb) in zip(sa.get('samples', []), sb.get('samples', [])):
            if va != vb:
                return f'its schedule differs from this call\'s at step {t}: {va} vs {vb}'
        return 'its schedule differs from this call\'s'
    if saved.get('args') != now.get('args'):
        return f"it was written by a fit with {saved.get('args')}, this call has {now.get('args')}"
    return None


def load_for_resume(learn, resume):
    """Load and check the checkpoint `resume` names for the fit being started; None when there is nothing to resume
    (a folder without checkpoints: the fit starts from the beginning, with a warning). Raises, naming the file,
    when the run finished or was a different fit, before anything is changed."""
    if resume is True:  # the folder of the fit's Checkpoint callback (the callback that names a resume folder)
        cks = [cb for cb in learn.hooks.cbs if callable(getattr(cb, 'resume_folder', None))]
        if not cks:
            raise ValueError('fit: resume=True needs a Checkpoint callback (its folder is where to resume from); '
                             'pass resume=<folder or file> instead')
        resume = cks[0].resume_folder(learn)
    elif not isinstance(resume, (str, Path)):
        raise TypeError(f'fit: resume must be a folder, a checkpoint file or True, got {resume!r}')
    elif not Path(resume).is_absolute():  # relative to learn.path, as Checkpoint(path=...) is
        here = learn.path / resume
        resume = here if here.exists() or not Path(resume).exists() else Path(resume)
    file = find_checkpoint(resume)
    if file is None:
        warnings.warn(f'resume: no checkpoint in {resume}; training from the beginning')
        return None
    # a folder another process is writing is refused for that reason first, not for what its newest file says
    # (rank 0 alone: under torchrun the ranks read the same folder at once)
    with folder_lock(file.parent, 'fit(resume=...)') if learn.is_main else contextlib.nullcontext():
        file, state = load_newest_intact(resume, file)  # on CPU: RNG states must stay CPU tensors
    if not isinstance(state, dict) or state.get('format') != FORMAT or 'position' not in state:
        raise ValueError(f'resume: {file} holds weights only, not a training state: load it with learn.load() and '
                         f'fit without resume=')
    if state.get('version', 0) > VERSION:
        raise ValueError(f"resume: {file} was written by a newer minifast (format version {state['version']}, this "
                         f'one reads {VERSION})')
    pos = state['position']
    resumable_point = state.get('signature') is not None and pos['where'] is not None
    if resumable_point:  # before "finished": a run of another fit must hear what differs, not that it finished
        why = _sig_mismatch(state['signature'], fit_signature(learn))
        if why is not None:
            raise ValueError(f'resume: {file} ({_describe(pos)}) does not continue this fit: {why}. Resume with '
                             f'the same arguments, data and callbacks as the interrupted call.')
    if pos['where'] is not None and is_finished(pos):
        done = f"{pos['n_epoch']} epochs, {pos['train_iter']} steps"
        raise ValueError(f'resume: the run saved in {file} already finished ({done}); there is nothing to resume. '
                         f'Fit without resume= (or into a new checkpoint folder) to train again.')
    if not resumable_point:
        raise ValueError(f'resume: {file} was saved by learn.save, not at a point a fit can resume from '
                         f'({_describe(pos)}); write resumable states with the Checkpoint callback')
    if pos['where'] != 'epoch' and state['epoch_rng'] is None:
        raise ValueError(f'resume: {file} stops inside epoch {pos["epoch"]} but lacks the RNG state of that '
                         f"epoch's start, so its data order cannot be replayed")
    check_state_dict(learn.model, state['model'], file)
    state['file'] = file
    return state


def restore_model_opt(learn, state):
    """Load the checkpoint's weights and optimizer state (checked by `load_for_resume`) into the learner; raises
    on an optimizer state of another kind (the caller, `begin`, puts the learner back)."""
    learn.model.load_state_dict(state['model'])
    frozen = state.get('frozen')
    if frozen is not None:  # absent from older checkpoints
        frozen = set(frozen)
        for k, p in learn.model.named_parameters():
            p.requires_grad_(k not in frozen)
    if state['opt'] is not None:
        try:
            learn.opt.load_state_dict(state['opt'])
        except (ValueError, KeyError) as e:
            raise ValueError(f"resume: {state['file']}: the optimizer state does not match this learner's "
                             f'parameter groups: {e}') from e
        # torch checks only the groups' sizes: another optimizer's groups load and its first step fails on a setting
        # they lack. A checkpoint whose signature names its optimizer is refused before this; an older one is here.
        opt = learn.opt
        lacking = lacking_settings(opt)
        if lacking:
            raise ValueError(f"resume: {state['file']}: its optimizer state is not one of this learner's "
                             f'{type(opt).__name__} (it lacks the settings {lacking}); resume with the optimizer '
                             f'(opt_func) of the interrupted fit')
    learn.stepper.load_state_dict(state.get('grad_scaler'))


def restore_callbacks(learn, state):
    """Give every callback of this fit its saved state; returns the callbacks' keys the checkpoint had no match for."""
    cbs = _callback_states(learn)
    saved = state['callbacks']
    for key, cb in cbs.items():
        if key in saved:
            try:
                cb.load_state_dict(saved[key])
            except Exception as e:  # e.g. a state written by another version of the callback
                raise ValueError(f"resume: {state['file']}: {key}.load_state_dict could not restore the state saved "
                                 f'there: {type(e).__name__}: {e}') from e
    orphans = sorted(set(saved) - set(cbs))
    if orphans:
        warnings.warn(f"resume: {state['file']} holds the state of callback(s) {orphans}, which this fit does not "
                      f'have; their state was not restored')


def model_state(state):
    """The model's state dict inside a loaded checkpoint, full or weights-only."""
    return state['model'] if isinstance(state, dict) and 'model' in state and isinstance(state['model'], dict) \
        else state



# ---- the resume point: what the loop calls ---------------------------------------------------------------------
def begin(learn, state, before_fit):
    """Start a fit: `before_fit()` (which runs the event), with a resumed run's `state` (from `load_for_resume`;
    None: a fresh fit) put in around it: weights, optimizer, scaler and frozen flags before, callbacks' state after.
    If anything fails, the learner is rolled back. Returns the epoch to start at; a run resumed inside an epoch
    replays that epoch's data order (`replay`)."""
    parts = ('weights', 'opt', 'scaler', 'trainable') if state is not None else ()
    with preserved(learn, parts) as snap:  # put back if before_fit or a callback refusing its saved state fails
        if state is not None:
            restore_model_opt(learn, state)
        before_fit()
        if state is not None:  # after before_fit, which resets the Recorder and the callbacks
            restore_callbacks(learn, state)
        snap.discard()  # it worked: nothing to put back
    if state is None:
        return 0
    pos = state['position']
    learn.train_iter = pos['train_iter']
    set_rng_state(state['rng'])
    if pos['where'] == 'epoch':
        return pos['epoch'] + 1
    learn.resuming = (pos['batch'], state['epoch_rng'], state['rng'])
    rec = state['callbacks'].get('Recorder')
    learn.resumed_epoch = None if rec is None else {'start': rec['epoch_start'], 'elapsed': rec['epoch_elapsed']}
    return pos['epoch']


def replay(learn, dl):
    """The resumed epoch's batches: replay its data order from the RNG state of its start, pass the batches the
    checkpoint had done, then put back the RNG state of the checkpoint. Returns (iterator, batches done)."""
    k, epoch_rng, rng = learn.resuming
    learn.resuming, learn.epoch_rng = None, epoch_rng
    if getattr(dl, 'persistent_workers', False) and getattr(dl, 'num_workers', 0) > 0:
        warnings.warn('resume: the training DataLoader has persistent_workers=True; its workers carry their RNG '
                      'across epochs, so random augmentation done in them differs from the uninterrupted run '
                      '(the data order is still the same)')
    set_rng_state(epoch_rng)
    it = iter(dl)
    for i in range(k):
        try:
            next(it)
        except StopIteration:
            raise ValueError(f'resume: the training DataLoader ended after {i} batches, but the checkpoint had '
                             f'done {k} batches of epoch {learn.epoch}') from None
    set_rng_state(rng)
    return it, k


# ---- learn.save and learn.load (bound on Learner) --------------------------------------------------------
def save(learn, name, with_opt=True):
    """Save the learner's full state to path/model_dir/name.pth (or to `name` when it ends in .pth), atomically:
    model, optimizer (unless with_opt=False), the Recorder's history, the RNG states and, during a fit, the
    position and the callbacks' state. Returns the file's path. `learn.load` reads the weights (and optimizer);
    torch.load(file, weights_only=True)['model'] is the model's state dict.

    In distributed training call it on every rank: rank 0 writes, and outside a fit the others wait until the
    file is there (so a `learn.load` on any rank then finds it)."""
    file = learn.model_file(name)
    # a finished state only after a fit that completed; during a fit, or after one that stopped on an error or
    # an interrupt, the file holds no point a fit can resume from (Checkpoint writes those)
    in_fit = learn.hooks is not None
    if learn.is_main:
        done = not in_fit and learn.exception is None
        atomic_save(training_state(learn, 'end' if done else None, with_opt=with_opt), file)
    if not in_fit:
        learn.dist.barrier()
    return file


def load(learn, name, with_opt=None, strict=True):
    """Load path/model_dir/name.pth (a file from learn.save, a Checkpoint file, or a plain state dict) into the
    model, and into the optimizer unless with_opt=False. A file that does not match leaves the learner
    untouched; files are read with torch's weights-only loader (no code in a file runs). Returns the learner."""
    load_into(learn, learn.model_file(name), with_opt, strict)
    return learn


def unwrapped(sd, model):
    """`sd` without the key prefix of a wrapper it was saved from (DDP/DataParallel's 'module.', torch.compile's
    '_orig_mod.'), when every key has it and the model's keys do not: learn.model is always the plain module."""
    if not isinstance(sd, dict) or not sd:
        return sd
    own = model.state_dict().keys()
    stripped = True
    while stripped:  # wrappers nest: torch.compile of a DDP model saves '_orig_mod.module.'
        stripped = False
        for prefix in ('module.', '_orig_mod.'):
            if all(isinstance(k, str) and k.startswith(prefix) for k in sd) and \
                    not any(k.startswith(prefix) for k in own):
                sd, stripped = {k[len(prefix):]: v for k, v in sd.items()}, True
    return sd


def load_into(learn, file, with_opt=None, strict=True):
    """Learner.load: `file`'s weights into the model, and its optimizer state unless with_opt=False; a file that
    does not match leaves the learner untouched."""
    state = load_state(file, learn.device)
    model_sd = unwrapped(model_state(state), learn.model)
    check_state_dict(learn.model, model_sd, file, strict)
    opt_sd = state.get('opt') if isinstance(state, dict) and model_sd is not state else None
    if opt_sd is not None and with_opt is not False:
        if learn.opt is None:
            learn.create_opt()
        before = learn.opt.state_dict()
        try:  # torch checks the groups before changing anything, so a mismatch leaves the optimizer as it was
            learn.opt.load_state_dict(opt_sd)
        except (ValueError, KeyError) as e:
            raise ValueError(f'{os.fspath(file)}: optimizer state does not match this learner: {e}') from e
        # another optimizer's state (AdamW's in an SGD) loads, and the next step fails on a setting it lacks
        lacking = lacking_settings(learn.opt)
        if lacking:
            learn.opt.load_state_dict(before)
            raise ValueError(f'{os.fspath(file)}: its optimizer state is not one of this learner\'s '
                             f'{type(learn.opt).__name__} (it lacks the settings {lacking}); the learner was left '
                             f'unchanged. load(..., with_opt=False) loads the weights only')
    learn.model.load_state_dict(model_sd, strict=strict)
