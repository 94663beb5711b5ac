"""What pruning saves in a search (issue 20: 20 trials with pruning on the built-in set should cost clearly less than
20 full runs).

The same search is run twice in one process, side by side: 20 trials of `fit_one_cycle(epochs, max_lr)` on the
built-in 32x32 shapes set with a ResNet-8, the random sampler (so both searches train the very same 20 configs, drawn
from the space by `--sampler-seed`), once without a pruner and once with Optuna's median pruner (a trial stops after
an epoch whose validation loss is worse than the median of earlier trials at that epoch). The machine is shared and
noisy, so with --rounds 2 (default) the searches run in the order A B B A and each keeps its best time (noise only
adds time); the epochs trained are the same in every round. Printed: per search the trials done and pruned, the
epochs trained, the best wall time, the best trial and its valid loss; then the time ratio and whether the pruned
search found the same best config.

    python benchmarks/search.py                       # default: 20 trials of 4 epochs, 1000 training images
    python benchmarks/search.py --trials 4 --epochs 2 --n-train 128 --n-valid 64    # smoke run
"""
import argparse
import contextlib
import io
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from minifast import Learner, accuracy, cifar_resnet, synthetic_cifar  # noqa: E402
from minifast.search import Choice, LogUniform, search  # noqa: E402

SPACE = {'max_lr': LogUniform(1e-4, 1.0), 'moms': Choice([(0.95, 0.85), (0.99, 0.9)]), 'wd': LogUniform(1e-6, 1e-2)}


def one_search(data, pruner, args):
    def make_learner():
        return Learner(data, cifar_resnet(8, data.c), metrics=[accuracy], silent=True, channels_last=True)

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        res = search(make_learner, SPACE, n_trials=args.trials, sampler='random', pruner=pruner, epochs=args.epochs,
                     sampler_seed=args.sampler_seed, seed=0)
    secs = time.perf_counter() - t0
    epochs = sum(len(r['epochs']) for r in res.runs)
    best = res.best()
    return {'res': res, 'seconds': secs, 'epochs': epochs, 'best': best['name'],
            'best_loss': best['final']['valid_loss']}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--trials', type=int, default=20)
    p.add_argument('--epochs', type=int, default=4)
    p.add_argument('--n-train', type=int, default=1000)
    p.add_argument('--n-valid', type=int, default=500)
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--sampler-seed', type=int, default=0)
    p.add_argument('--rounds', type=int, default=2, help='rounds of both searches, alternating which goes first')
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = synthetic_cifar(n_classes=10, n_train=args.n_train, n_valid=args.n_valid, seed=0, bs=args.bs)
    print(f'{args.trials} trials of fit_one_cycle({args.epochs}) on the built-in set ({args.n_train} training, '
          f'{args.n_valid} validation images), ResNet-8, random sampler (seed {args.sampler_seed}), '
          f'{torch.get_num_threads()} threads', flush=True)
    with contextlib.redirect_stdout(io.StringIO()):  # torch's first-fit warm-up, outside both timings
        Learner(data, cifar_resnet(8, data.c), silent=True, channels_last=True).fit(1, 1e-3)
    out, variants = {}, [('no pruner', None), ('median pruner', 'median')]
    for i in range(args.rounds):
        for name, pruner in variants if i % 2 == 0 else variants[::-1]:
            r = one_search(data, pruner, args)
            res = r['res']
            print(f"round {i + 1} {name:14s}: {res.n_complete} done, {res.n_pruned} pruned, {r['epochs']} of "
                  f"{args.trials * args.epochs} epochs trained, {r['seconds']:.1f} s; best {r['best']} "
                  f"(valid_loss {r['best_loss']:.4f})", flush=True)
            if name not in out or r['seconds'] < out[name]['seconds']:
                out[name] = r
    full, pruned = out['no pruner'], out['median pruner']
    print(f"RESULT best of {args.rounds} round(s): pruned/unpruned wall time {pruned['seconds'] / full['seconds']:.3f}, epochs "
          f"{pruned['epochs']}/{full['epochs']} = {pruned['epochs'] / full['epochs']:.3f}; same best config: "
          f"{pruned['best'] == full['best']}", flush=True)
    print(pruned['res'].table())
    return out


if __name__ == '__main__':
    main()
