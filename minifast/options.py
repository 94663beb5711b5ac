"""The options of the `minifast` command's subcommands, and their checks: argparse only, no torch, so that
`minifast --help` (and a refused flag) answers at once."""
import argparse
import sys

__all__ = ['add_arguments', 'add_demo_arguments', 'add_search_arguments', 'refuse_small', 'worker_argv', 'TRACKERS']

TRACKERS = ('tensorboard', 'mlflow', 'wandb')


def add_arguments(p):
    """The `minifast smith` options on an argparse parser."""
    p.add_argument('--data', default=None,
                   help="'cifar10', 'cifar100', or a folder of class sub-folders (train/ and test/ or valid/ "
                        "sub-folders are used as the split, else a random 20%% is held out); default: the built-in "
                        "32x32 shapes set (10 classes)")
    p.add_argument('--data-root', default='data', help="where cifar10/cifar100 live or are downloaded (default: data)")
    p.add_argument('--ignore-errors', action='store_true',
                   help='with --data FOLDER: skip image files that cannot be read (they are listed in one warning) '
                        'instead of stopping at the first')
    p.add_argument('--arch', default=None,
                   help='resnet8, resnet14, resnet20, resnet32, resnet44, resnet56 or resnet110 (CIFAR ResNets with '
                        'the concat-pool head; default resnet8 on the built-in set, resnet56 otherwise)')
    p.add_argument('--epochs', type=int, default=None,
                   help='epochs of the final 1cycle fit (default 8; 15 with --data)')
    p.add_argument('--grid-epochs', type=int, default=None, help='epochs of each grid run (default 2)')
    p.add_argument('--bs', type=int, default=None, help='batch size (default 64; 256 with --data)')
    p.add_argument('--n-train', type=int, default=None, help='training images of the built-in set (default 4000)')
    p.add_argument('--n-valid', type=int, default=None, help='validation images of the built-in set (default 1000)')
    p.add_argument('--num-it', type=int, default=None, help='steps of the LR range test (default 100)')
    p.add_argument('--max-lr', type=float, default=None, help="use this max_lr instead of lr_find's max_lr")
    p.add_argument('--size', type=int, default=32, help='image size for --data FOLDER (default 32)')
    p.add_argument('--out', default='runs/smith', help='the run folder (default: runs/smith)')
    p.add_argument('--seed', type=int, default=0, help='seed of data, initial weights and data order (default 0)')
    p.add_argument('--seeds', type=int, default=None,
                   help='seeds per grid config (--seed, --seed+1, ...): each config of steps 3-5 is trained once per '
                        'seed, compared by its mean, and differences within the seed-to-seed spread are called a '
                        'tie (default 2; 1 with --quick)')
    p.add_argument('--quiet', action='store_true', help='no progress bars or epoch tables (step lines still print)')
    p.add_argument('--quick', action='store_true',
                   help='tiny sizes, for tests and a first look (seconds on a 2-core CPU)')
    p.add_argument('--compile', action='store_true',
                   help="train with torch.compile, on a GPU with CUDA graphs ('reduce-overhead') and in bf16: compiled "
                        "once (about a minute for a ResNet-56), then every run of the workflow reuses it. For a GPU; "
                        "its runs are recorded apart from those without it")
    _add_scale(p, 'every run of the workflow')
    p.add_argument('--grid-worker', action='store_true',
                   help='with --storage: only help with the grids of steps 3 to 5 (run them, then exit); start it '
                        'on other machines with the same options and --storage as the main invocation')
    _add_debug(p)
    return p


def _add_scale(p, what):
    p.add_argument('--tracker', choices=TRACKERS, default=None,
                   help=f'mirror {what} to TensorBoard (OUT/tensorboard), MLflow (sqlite:///OUT/mlflow.db, or '
                        f'MLFLOW_TRACKING_URI) or W&B (offline unless WANDB_MODE says otherwise)')
    p.add_argument('--storage', default=None,
                   help='an Optuna storage shared by every worker: sqlite:///FILE.db (one machine), a PostgreSQL or '
                        'MySQL URL (several machines), or a journal file FILE.log on a shared file system')
    p.add_argument('--workers', type=int, default=1,
                   help='processes on this machine working on the same storage at once (default 1); with more than '
                        '1 and no --storage, sqlite:///OUT/study.db')


def add_search_arguments(p):
    """The `minifast search` options on an argparse parser: the data and model options of `minifast smith`, the
    space, the engine's sampler and pruner, and the shared storage."""
    p.add_argument('--space', action='append', default=None, metavar='KEY=KIND:ARGS',
                   help="a searched setting, repeatable: lr=log:1e-3:1e-1 (log-uniform), wd=uniform:0:1e-3, "
                        "pct_start=choice:0.25/0.3/0.5, moms=choice:0.95,0.85/0.99,0.9 ('/' between values, ',' "
                        "inside a pair), epochs=int:2:6; keys: max_lr, lr, moms, wd, div_factor, pct_start, "
                        "final_div, epochs (default: max_lr=log:1e-3:1e-1, moms=choice:0.95,0.85/0.99,0.9, "
                        "wd=log:1e-6:1e-2)")
    p.add_argument('--trials', type=int, default=20, help='trials of the study in all, over every worker (default 20)')
    p.add_argument('--sampler', choices=('tpe', 'random', 'grid'), default='tpe', help='default tpe')
    p.add_argument('--pruner', choices=('median', 'hyperband', 'none'), default='median',
                   help='stops hopeless trials after an epoch (default median)')
    p.add_argument('--epochs', type=int, default=None, help='epochs per trial (default 4; 2 with --quick)')
    p.add_argument('--folds', type=int, default=None,
                   help='score each trial by k-fold cross-validation of the training set (mean over folds)')
    p.add_argument('--study', default='minifast-search', help='the study name in the storage (default '
                                                             'minifast-search)')
    p.add_argument('--monitor', default='valid_loss', help='what the search minimises (accuracy: maximises)')
    for flag, kw in (('--data', dict(default=None, help='as minifast smith --data (default: the built-in set)')),
                     ('--data-root', dict(default='data')),
                     ('--arch', dict(default=None, help='as minifast smith --arch (default resnet8)')),
                     ('--bs', dict(type=int, default=None)), ('--n-train', dict(type=int, default=None)),
                     ('--n-valid', dict(type=int, default=None)), ('--size', dict(type=int, default=32)),
                     ('--seed', dict(type=int, default=0)),
                     ('--out', dict(default='runs/search', help='the run folder (default: runs/search)'))):
        p.add_argument(flag, **kw)
    p.add_argument('--ignore-errors', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--quiet', action='store_true', help='no progress bars or epoch tables')
    p.add_argument('--quick', action='store_true', help='tiny sizes, for tests and a first look')
    _add_scale(p, 'every trial')
    _add_debug(p)
    return p


def add_demo_arguments(p):
    """The `minifast demo` options on an argparse parser."""
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--n-train', type=int, default=5000, help='images in the built-in training set')
    p.add_argument('--data', default=None, help='a folder holding cifar-10-batches-py (default: the built-in set)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='runs/demo', help='folder for plots and weights (default: runs/demo)')
    p.add_argument('--quiet', action='store_true', help='no progress bars or epoch table')
    _add_debug(p)
    return p


def _add_debug(p):
    p.add_argument('--debug', action='store_true',
                   help='a full traceback instead of one line for data errors and Ctrl-C (errors that are bugs '
                        'always show one)')


def refuse_small(cmd, values, **least):
    """SystemExit naming the flag when one of `values` (a dict; None: not set) is below its least value (a number, or
    (number, why))."""
    for k, low in least.items():
        low, why = low if isinstance(low, tuple) else (low, '')
        if values[k] is not None and values[k] < low:
            raise SystemExit(f"{cmd}: --{k.replace('_', '-')} {values[k]}: it must be at least {low}"
                             + (f' ({why})' if why else ''))


def worker_argv(argv, storage, folder, extra=()):
    """The command line of one more local worker: this invocation's `argv` (subcommand first) with one worker, the
    shared `storage`, its own run folder `folder`, no tracker (the main invocation's tracker shows every run),
    no progress output, and `extra` flags."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.split('=', 1)[0] in ('--workers', '--storage', '--out', '--tracker'):
            skip = '=' not in a
            continue
        out.append(a)
    return [sys.executable, '-m', 'minifast', *out, '--workers', '1', '--storage', str(storage), '--out', str(folder),
            '--quiet', *extra]
