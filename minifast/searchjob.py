"""`minifast search`: a hyper-parameter search on Optuna (minifast.search) over the data and models of `minifast
smith`, with pruning, one study shared by any number of workers (processes here with --workers, machines with the
same --storage URL), an optional tracker, and the results table read from the storage."""
import json
import time
from pathlib import Path

import matplotlib

from .grid import FIT_KEYS, append_record, logged_runs
from .lock import FolderLockedError, acquire, release
from .options import refuse_small
from .search import Choice, IntRange, LogUniform, Uniform, search
from .smith import SIZES, learner_factory, local_workers, make_data, make_tracker, model_fn, replace_with, save_plot

__all__ = ['run', 'parse_space', 'DEFAULT_SPACE']

DEFAULT_SPACE = ['max_lr=log:1e-3:1e-1', 'moms=choice:0.95,0.85/0.99,0.9', 'wd=log:1e-6:1e-2']
KINDS = {'log': LogUniform, 'uniform': Uniform, 'int': IntRange}


def _say(*a):
    print('search:', *a, flush=True)


def _number(text, spec):
    try:
        return int(text) if text.lstrip('+-').isdigit() else float(text)
    except ValueError:
        raise SystemExit(f'search: --space {spec!r}: {text!r} is not a number') from None


def parse_space(specs):
    """{key: distribution} from --space strings 'key=kind:args' (see `minifast search --help`); SystemExit naming
    the string for a bad one."""
    space = {}
    for spec in specs:
        key, eq, rest = spec.partition('=')
        kind, colon, args = rest.partition(':')
        if not eq or not colon or not key:
            raise SystemExit(f'search: --space {spec!r}: expected KEY=KIND:ARGS, e.g. lr=log:1e-3:1e-1')
        if key not in FIT_KEYS or key == 'policy':
            raise SystemExit(f"search: --space {spec!r}: {key!r} is not a setting the search trains with; the keys are "
                             f"{', '.join(k for k in FIT_KEYS if k != 'policy')}")
        if key in space:
            raise SystemExit(f'search: --space {spec!r}: {key!r} is given twice')
        if kind == 'choice':
            values = [tuple(_number(x, spec) for x in v.split(',')) if ',' in v else _number(v, spec)
                      for v in args.split('/')]
            dim = Choice(values)
        elif kind in KINDS:
            bounds = args.split(':')
            if len(bounds) != 2:
                raise SystemExit(f'search: --space {spec!r}: {kind} takes two bounds, LOW:HIGH')
            low, high = (_number(b, spec) for b in bounds)
            dim = KINDS[kind](low, high)
        else:
            raise SystemExit(f"search: --space {spec!r}: unknown kind {kind!r}; use log, uniform, int or choice")
        try:  # the constructors check nothing: bad bounds (low >= high, ...) would fail later, as a traceback
            dim.check(key)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"search: --space {spec!r}: {str(e).removeprefix('search: ')}") from None
        space[key] = dim
    return space


def _export(res, log):
    """Append to the JSONL `log` the study's records it does not hold yet (the storage is the source of truth;
    runs.jsonl is its export, in slot order)."""
    have = logged_runs(log)
    for r in res.runs:
        if json.dumps(r.get('key'), sort_keys=True) not in have:
            append_record(log, r)


def _sizes(args):
    """The data and model sizes of `minifast smith` (built-in, --quick or a real dataset), the options given, and
    the epochs per trial (4; 2 with --quick)."""
    mode = 'quick' if args.quick else 'real' if args.data else 'default'
    s = {k: SIZES[mode][k] for k in ('n_train', 'n_valid', 'bs', 'arch')}
    s.update({k: getattr(args, k) for k in s if getattr(args, k, None) is not None})
    s['epochs'] = args.epochs if args.epochs is not None else 2 if args.quick else 4
    refuse_small('search', s, epochs=1, bs=1, n_train=1, n_valid=1)
    return s


def run(args):
    """`minifast search`: train the study's trials (with the other workers), then print and save its table."""
    matplotlib.use('Agg')
    s = _sizes(args)
    refuse_small('search', {'trials': args.trials, 'workers': args.workers, 'folds': args.folds}, trials=1,
                 workers=1, folds=(2, 'cross-validation needs two folds at least'))
    space = parse_space(args.space or DEFAULT_SPACE)
    out = Path(args.out).resolve()
    try:
        acquire(out, 'minifast search --out')
    except FolderLockedError as e:
        raise SystemExit(str(e)) from None
    try:
        return _run(args, s, space, out)
    finally:
        release(out)


def _run(args, s, space, out):
    storage = args.storage or (f"sqlite:///{out / 'study.db'}" if args.workers > 1 else None)
    data, what = make_data(args, s, cmd='search')
    make_learner = learner_factory(data, model_fn(s['arch'], data.c, 'search'), out, args.quiet)
    _say(f"{what}; {s['arch']}, bs {s['bs']}, {data.device}; {args.trials} trials of {s['epochs']} epochs, sampler "
         f"{args.sampler}, pruner {args.pruner}" + (f', {args.folds}-fold cross-validation' if args.folds else '')
         + f"; storage {storage or 'in memory'}, study {args.study!r}; run folder {out}")
    # before the other workers start: a missing tracker library exits here, not after they began training
    tracker = make_tracker(args.tracker, out, f'search {args.study}', cmd='search')
    t0 = time.perf_counter()
    # this process is worker 0; an error or Ctrl-C here stops the others too (their trials go stale and run again in
    # the next invocation, resumed from their checkpoints)
    with local_workers(getattr(args, 'argv', None), args.workers, storage, out) as helpers:
        if helpers:
            _say(f'started {len(helpers)} more worker(s) on this machine: PIDs {[p.pid for p in helpers]}')
        res = search(make_learner, space, n_trials=args.trials, sampler=args.sampler,
                     pruner=None if args.pruner == 'none' else args.pruner, epochs=s['epochs'], seed=args.seed,
                     monitor=args.monitor, storage=storage, study_name=args.study,
                     tracker=tracker, folds=args.folds, data=data if args.folds else None,
                     checkpoints=out / 'checkpoints', silent=args.quiet or None)
    codes = [p.returncode for p in helpers]
    if any(codes):
        _say(f'warning: worker exit codes {codes}: their trials, if any were cut short, are retried by the next run')
    _export(res, out / 'runs.jsonl')
    print(res.table(), flush=True)
    print(res.verdicts(), flush=True)
    save_plot(res.plot(args.monitor), out / 'search.png', f'{args.monitor} per epoch, one line per trial')
    text = (f"# minifast search {args.study}\n\n```\n{res!r}\n```\n\n```\n{res.verdicts()}\n```\n\n"
            f"![search](search.png)\n")
    replace_with(out / 'search.md', lambda tmp: Path(tmp).write_text(text))  # never half a report
    if tracker is not None:
        tracker.log_artifact(out / 'search.md')
        tracker.log_artifact(out / 'search.png')
        tracker.close()
    best = res.best()
    _say(f"best: {best['name']} ({args.monitor} {best['final'][args.monitor]:.4f}); {res.n_complete} trials done, "
         f"{res.n_pruned} pruned, {res.n_failed} failed; took {time.perf_counter() - t0:.1f} s; table in "
         f"{out / 'search.md'}")
    return 0
