"""The options of the `minifast` command's subcommands, and their checks: argparse only, no torch, so that
`minifast --help` (and a refused flag) answers at once."""

__all__ = ['add_arguments', 'add_demo_arguments', 'refuse_small']


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
