"""interpolate_losses over the bare evaluation passes it must do: the same alphas, batches and forward passes.

A tiny CNN with BatchNorm on generated images; two snapshots from a short fit. For bn='interpolate' and
bn='recompute', minifast's analysis (100 alphas plus the two endpoints it adds) alternates in one run with a
hand-written loop doing the same work in the simplest way: torch.lerp(w2, w1, alpha, out=p) per tensor (running
stats too for 'interpolate'; reset + train-mode passes with momentum=None for 'recompute'), then eval-mode forward
passes, cross-entropy and accuracy over the same pre-drawn batches, summed on device and read once at the end.

    python benchmarks/interpolation.py                    # target: analysis / bare <= 1.2x
    python benchmarks/interpolation.py --rounds 1 --alphas 10   # smoke run
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from minifast import DataBunch, Learner, accuracy  # noqa: E402
from minifast.callbacks.snapshots import state_dict_copy  # noqa: E402
from minifast.landscape import interpolate_losses  # noqa: E402


def tiny_cnn(c=10):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, c))


def make_data(n_train, n_valid, bs, size, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_valid, 3, size, size, generator=g)
    y = (x.mean((2, 3)) @ torch.randn(3, 10, generator=g)).argmax(1)
    x, y = x.to(device), y.to(device)
    return DataBunch.from_tensors(x[:n_train], y[:n_train], x[n_train:], y[n_train:], bs=bs)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def bare(model, w1, w2, alphas, batches, bn_batches, bn, device):
    """The hand-written loop: lerp every tensor, (re-estimate BN), evaluate; one read at the end."""
    params = dict(model.state_dict(keep_vars=True))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    stats = {id(t) for m in bns for t in (m.running_mean, m.running_var)}
    pairs = [(p.detach(), w2[k].to(device), w1[k].to(device)) for k, p in params.items() if p.is_floating_point()
             and (bn == 'interpolate' or id(p) not in stats)]
    out = torch.zeros(len(alphas), len(batches), 2, device=device)
    with torch.no_grad():
        for i, a in enumerate(alphas):
            for p, s, e in pairs:
                torch.lerp(s, e, float(a), out=p)
            if bn == 'recompute':
                for m in bns:
                    m.reset_running_stats()
                    m.momentum = None
                model.train()
                for xb, _ in bn_batches:
                    model(xb)
            model.eval()
            for j, b in enumerate(batches):
                n = 0
                for xb, yb in b:
                    pred = model(xb)
                    out[i, j, 0] += F.cross_entropy(pred, yb) * len(yb)
                    out[i, j, 1] += accuracy(pred, yb) * len(yb)
                    n += len(yb)
                out[i, j] /= n
    for m in bns:
        m.momentum = 0.1
    return out.cpu().numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--alphas', type=int, default=100)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--n-train', type=int, default=256)
    p.add_argument('--n-valid', type=int, default=128)
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--size', type=int, default=8)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    data = make_data(args.n_train, args.n_valid, args.bs, args.size, device)
    learn = Learner(data, tiny_cnn(), metrics=[accuracy], silent=True, device=device)
    learn.fit(1, 1e-2)
    w2 = state_dict_copy(learn.model)
    learn.fit(1, 1e-2)
    w1 = state_dict_copy(learn.model)
    alphas = np.union1d(np.linspace(-0.5, 1.5, args.alphas), [0., 1.])  # what interpolate_losses evaluates
    # both draw their batches after torch.manual_seed(1), so they see the same shuffled training batches
    print(f'device {device}; tiny CNN ({sum(p.numel() for p in learn.model.parameters())} parameters), '
          f'{len(alphas)} alphas, {len(data.train_dl)} train + {len(data.valid_dl)} valid batches of {args.bs} '
          f'({args.size}x{args.size})')
    for bn in ('interpolate', 'recompute'):
        times = {'analysis': [], 'bare': []}
        for r in range(args.rounds + 1):  # round 0 warms up
            for name in (('analysis', 'bare') if r % 2 else ('bare', 'analysis')):
                torch.manual_seed(1)
                if name == 'bare':
                    valid = [(x, y) for x, y in data.valid_dl]
                    train = [(x, y) for x, y in data.train_dl]
                    saved = state_dict_copy(learn.model)
                    sync(device)
                    t0 = time.perf_counter()
                    ref = bare(learn.model, w1, w2, alphas, [valid, train], train, bn, device)
                    sync(device)
                    dt = time.perf_counter() - t0
                    learn.model.load_state_dict(saved)
                else:
                    sync(device)
                    t0 = time.perf_counter()
                    res = interpolate_losses(learn, w1, w2, alphas=np.linspace(-0.5, 1.5, args.alphas), bn=bn)
                    sync(device)
                    dt = time.perf_counter() - t0
                if r:
                    times[name].append(dt)
        diff = max(np.nanmax(np.abs(res.values['valid'] - ref[:, 0])),
                   np.nanmax(np.abs(res.values['train'] - ref[:, 1])))
        ta, tb = statistics.median(times['analysis']), statistics.median(times['bare'])
        print(f"bn={bn!r:13} analysis {ta * 1e3:8.1f} ms  bare loop {tb * 1e3:8.1f} ms  ratio {ta / tb:.3f}x  "
              f"(median of {args.rounds}; max |loss/acc difference| {diff:.2e})")


if __name__ == '__main__':
    main()
