"""The `minifast` command: `minifast smith` runs Leslie Smith's hyper-parameter workflow (LR range test, 1cycle vs
constant lr, momentum, weight decay, final fit, interpolation) and writes a report; `minifast demo` is one short fit."""
import argparse
import contextlib
import sys
import warnings

from .options import add_arguments, add_demo_arguments, add_search_arguments

__all__ = ['main']

INTERRUPTED = {
    'smith': 'interrupted; run the same command again to resume (finished steps, grid runs and checkpoints are kept)',
    'demo': 'interrupted; nothing was saved (the demo saves its plots and weights at the end)',
    'search': 'interrupted; run the same command again to go on (finished trials are kept in the storage; with an '
              'in-memory study, without --storage or --workers, they are lost)',
}


def smith_doc():
    return ("Leslie Smith's hyper-parameter workflow (seed 004): data -> LR range test -> 1cycle vs constant lr -> "
            "momentum -> weight decay (coarse, then half-decade) -> final fit_one_cycle (checkpointed) -> "
            "interpolation between two snapshots. Writes PNGs, runs.jsonl and report.md to --out; running it again "
            "skips what is done. Default: the built-in set and a ResNet-8, a few minutes on a CPU.")


def search_doc():
    return ('A hyper-parameter search on Optuna over the data and models of minifast smith: --trials trials of '
            '--epochs epochs each (the random, grid or TPE sampler over --space), hopeless trials pruned after an '
            'epoch, every trial run exactly once by whichever worker claims it. --storage shares the study between '
            'processes (--workers N) and machines (a PostgreSQL URL); the same command again trains only what is '
            'missing. Prints the table and writes search.md, search.png and runs.jsonl (an export) to --out.')


def parser():
    """The argparse parser of `minifast` and its subcommands."""
    p = argparse.ArgumentParser(prog='minifast', description=__doc__)
    sub = p.add_subparsers(dest='cmd', required=True)
    add_arguments(sub.add_parser('smith', description=smith_doc(),
                                 help="Leslie Smith's workflow end to end, with plots and report.md (the main job)"))
    add_demo_arguments(sub.add_parser('demo', help='one short fit on the built-in image set'))
    add_search_arguments(sub.add_parser('search', description=search_doc(),
                                        help='a hyper-parameter search on Optuna, with pruning and many workers'))
    return p


def main(argv=None):
    """Entry point of the `minifast` console script: parses the arguments before anything imports torch."""
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # --workers starts more processes with the same line
    with _one_line_warnings(args.cmd, args.debug):
        try:
            # imported here, after parsing: they import torch and matplotlib (seconds), which --help and a refused
            # flag never need
            from . import demo, searchjob, smith
            return {'demo': demo.run, 'smith': smith.run, 'search': searchjob.run}[args.cmd](args)
        except KeyboardInterrupt:
            if args.debug:
                raise
            print(f'{args.cmd}: {INTERRUPTED[args.cmd]}', file=sys.stderr, flush=True)
            return 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped


@contextlib.contextmanager
def _one_line_warnings(cmd, debug):
    """While the command runs, a warning prints as `cmd: warning: message` (not file:line and the source line)."""
    old = warnings.formatwarning
    if not debug:
        warnings.formatwarning = lambda message, *a, **k: f'{cmd}: warning: {message}\n'
    try:
        yield
    finally:
        warnings.formatwarning = old


if __name__ == '__main__':
    sys.exit(main())
