"""ResNet-56 (seed 004's, with the concat-pool head) on a CIFAR-100-sized generated dataset: images/s of
`fit_one_cycle` against (a) a hand-written loop with the same optimisations and (b) a plain fp32 loop over a torch
DataLoader with per-item torchvision transforms (issue 8).

The three runners train the same model on the same data with the same 1cycle schedule (AdamW, wd 1e-2, max_lr,
div 25, pct_start 0.3, momentum 0.95 -> 0.85) and validate after every epoch:

  hand-written  uint8 images and labels on the GPU; random pad-4 crop and left-right flip, /255 and normalisation
                done on the batch there; channels_last; bf16 autocast; fused AdamW; torch's OneCycleLR; losses and
                validation sums kept on the GPU (one host read per epoch); optional torch.compile, warmed up first.
  minifast      Learner(data, resnet56, bf16=True, compile=...) on synthetic_cifar (an ImageDataBunch, which puts
                the uint8 data on the GPU), learn.warmup(), then learn.fit_one_cycle(epochs, max_lr).
  plain fp32    the usual script: a torch DataLoader over the uint8 images with per-item torchvision transforms
                (RandomCrop(32, 4), RandomHorizontalFlip, to float, Normalize) in worker processes, fp32, NCHW,
                AdamW (foreach), OneCycleLR, loss.item() each step. Run for --baseline-epochs only; its 15-epoch
                time is extrapolated from its rate.

The hand-written loop and minifast alternate (the order rotates with --repeats); the ratio of their images/s is the
target (>= 0.95x), and minifast's time for the epochs is the other target (15 epochs < 60 s on one H100).

    python benchmarks/gpu_resnet56.py                         # CUDA: 15 epochs, 50,000 + 10,000 images, bs 256
    python benchmarks/gpu_resnet56.py --compile               # with torch.compile (warm-up outside the timing)
    python benchmarks/gpu_resnet56.py --compile --compile-mode reduce-overhead --variants no-guard,one-group,no-pred \
        --profile profile.txt                                 # what a gap to the hand-written loop comes from
    python benchmarks/gpu_resnet56.py --compile --compile-mode reduce-overhead --runners minifast --bs 1024 \
        --max-lr 2e-2                                         # minifast alone at a larger batch
    python benchmarks/gpu_resnet56.py --tiny                  # CPU smoke run in seconds (CI runs this)
"""
import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minifast import Callback, Learner, accuracy  # noqa: E402
from minifast.data.augment import cifar_transforms  # noqa: E402
from minifast.data.datasets import synthetic_images  # noqa: E402
from minifast.data.images import ImageDataBunch  # noqa: E402
from minifast.models import cifar_resnet  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--epochs', type=int, default=15)
    p.add_argument('--bs', type=int, default=256)
    p.add_argument('--n-train', type=int, default=50_000)
    p.add_argument('--n-valid', type=int, default=10_000)
    p.add_argument('--classes', type=int, default=100)
    p.add_argument('--depth', type=int, default=56)
    p.add_argument('--max-lr', type=float, default=1e-2)
    p.add_argument('--data', choices=['shapes', 'random'], default='shapes',
                   help="'shapes': the built-in generated images (learnable; accuracy means something); "
                        "'random': uniform noise, instant to make")
    p.add_argument('--compile', action='store_true', help='torch.compile the model in both optimised runners')
    p.add_argument('--compile-mode', default=None, help="torch.compile mode, e.g. 'max-autotune-no-cudagraphs'")
    p.add_argument('--no-bf16', action='store_true', help='fp32 in the optimised runners too')
    p.add_argument('--repeats', type=int, default=1, help='rounds of (hand-written, minifast), order rotating')
    p.add_argument('--baseline-epochs', type=int, default=2, help='epochs of the plain fp32 loop (0: skip it)')
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument('--device', default=None)
    p.add_argument('--json', default=None, help='write the results here as JSON')
    p.add_argument('--runners', default='hand-written,minifast',
                   help="which of the timed runners to run, comma-separated (e.g. 'minifast' for a batch-size "
                        "search); the ratio is printed when both ran")
    p.add_argument('--variants', default='',
                   help="minifast runners beside the default one, comma-separated, to find what a gap to the "
                        "hand-written loop comes from: 'no-guard' (check_finite=False), 'one-group' (one parameter "
                        "group: one fused optimizer call per step), 'no-pred' (learn.pred dropped after the loss)")
    p.add_argument('--profile', default=None, metavar='FILE',
                   help='after the timed runs, one more epoch of each runner (compiled and warm) under '
                        'torch.profiler: per step, the wall time, the kernel time and the launches and copies the '
                        'host made, and the busiest ops, written here')
    p.add_argument('--tiny', action='store_true', help='CPU, 128 + 40 images, ResNet-8, 1 epoch, 0 workers')
    a = p.parse_args(argv)
    if a.tiny:
        a.epochs, a.bs, a.n_train, a.n_valid, a.classes, a.depth = 1, 32, 128, 40, 10, 8
        a.baseline_epochs, a.workers, a.device, a.no_bf16 = 1, 0, a.device or 'cpu', True  # CPU bf16 convs are slow
    a.runners = [r.strip() for r in a.runners.split(',') if r.strip()]
    if not a.runners or set(a.runners) - {'hand-written', 'minifast'}:
        p.error(f"--runners: give hand-written and/or minifast, got {','.join(a.runners) or 'nothing'}")
    a.variants = [v.strip() for v in a.variants.split(',') if v.strip()]
    if set(a.variants) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(set(a.variants) - set(VARIANTS))}; give some of {', '.join(VARIANTS)}")
    if a.variants and 'minifast' not in a.runners:
        p.error('--variants are variants of the minifast runner: include minifast in --runners')
    a.device = torch.device(a.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    return a


def make_dataset(a):
    if a.data == 'random':
        g = torch.Generator().manual_seed(0)
        n = a.n_train + a.n_valid
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, a.classes, (n,), generator=g)
        return x[:a.n_train], y[:a.n_train], x[a.n_train:], y[a.n_train:]
    d = synthetic_images(n_classes=a.classes, n_train=a.n_train, n_valid=a.n_valid, seed=0)
    return d['x_train'], d['y_train'], d['x_valid'], d['y_valid']


def stats(x):
    xf = x.double().div(255)
    return xf.mean((0, 2, 3)).float(), xf.std((0, 2, 3)).float()


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


def compile_opts(a):
    if not a.compile:
        return None
    return {} if a.compile_mode is None else {'mode': a.compile_mode}


# ---- (a) the hand-written optimised loop ---------------------------------------------------------------------------
def crop_flip(x, pad=4):
    """Random pad-and-crop (zeros) and a random left-right flip of a uint8 batch, per sample, on its device."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), device=x.device)
    rows = (torch.arange(h, device=x.device).view(1, 1, h, 1) + dy).expand(n, c, h, w + 2 * pad)
    out = xp.gather(2, rows)
    cols = (torch.arange(w, device=x.device).view(1, 1, 1, w) + dx).expand(n, c, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, out.flip(3), out)


def one_cycle(opt, a, total_steps):
    """torch's OneCycleLR with fit_one_cycle's defaults (div 25, pct_start 0.3, final div 1e4, momentum 0.95 ->
    0.85) at a.max_lr: the schedule of the runners that are not minifast."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, a.max_lr, total_steps=total_steps, pct_start=0.3, div_factor=25.,
                                               final_div_factor=1e4, base_momentum=0.85, max_momentum=0.95)


def hand_written(a, data, seed, profile=None):
    dev, bf16 = a.device, not a.no_bf16
    xt, yt, xv, yv = (t.to(dev) for t in data)
    mean, std = (s.to(dev).view(1, 3, 1, 1) for s in stats(data[0]))
    torch.manual_seed(seed)
    model = cifar_resnet(a.depth, a.classes).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=a.max_lr, betas=(0.95, 0.99), weight_decay=1e-2,
                            **({'fused': True} if dev.type == 'cuda' else {}))
    steps = a.n_train // a.bs
    sched = one_cycle(opt, a, a.epochs * steps)
    opts = compile_opts(a)
    fwd = model if opts is None else torch.compile(model, **opts)

    def prep(x):
        x = x.float().div_(255).sub_(mean).div_(std)
        return x.contiguous(memory_format=torch.channels_last)

    def train_step(xb, yb):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(fwd(xb), yb)
        loss.backward()
        return loss

    vbs = a.bs
    if opts is not None:  # warm-up outside the timing: compile train and eval graphs (full and last batch sizes)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        train_step(prep(crop_flip(xt[:a.bs])), yt[:a.bs])
        model.eval()
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            for k in {vbs, len(xv) % vbs or vbs}:
                fwd(prep(xv[:k]))
        model.load_state_dict(state)
        opt.zero_grad(set_to_none=True)
        sync(dev)
    def epoch():
        model.train()
        perm = torch.randperm(len(xt), device=dev)
        tot = torch.zeros((), device=dev)
        for i in range(steps):
            j = perm[i * a.bs:(i + 1) * a.bs]
            loss = train_step(prep(crop_flip(xt[j])), yt[j])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tot += loss.detach()
        model.eval()
        vloss, correct = torch.zeros((), device=dev), torch.zeros((), device=dev)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            for i in range(0, len(xv), vbs):
                out = fwd(prep(xv[i:i + vbs]))
                vloss += F.cross_entropy(out.float(), yv[i:i + vbs], reduction='sum')
                correct += (out.argmax(1) == yv[i:i + vbs]).sum()
        return torch.stack([tot / steps, vloss / len(xv), correct / len(xv)]).tolist()  # the epoch's one host read

    torch.manual_seed(seed)
    sync(dev)
    t0, accs = time.perf_counter(), []
    for _ in range(a.epochs):
        res = epoch()
        accs.append(res[2])
    sync(dev)
    t = time.perf_counter() - t0
    if profile is not None:  # one more epoch, on a fresh one-epoch schedule
        sched = one_cycle(opt, a, steps)
        profile(epoch, 'hand-written')
    return t, {'train_loss': res[0], 'valid_loss': res[1], 'accuracy': res[2]}, accs


# ---- minifast ------------------------------------------------------------------------------------------------------
VARIANTS = ('no-guard', 'one-group', 'no-pred')


class _DropPred(Callback):
    """The 'no-pred' variant: learn.pred is let go once the loss is computed (minifast keeps it for the step's
    callbacks), so no output of a replayed CUDA graph is alive when the next step's forward replays it."""
    order = 100

    def after_loss(self, learn):
        if learn.training:
            learn.pred = None


def with_minifast(a, data, seed, variant=None, profile=None):
    torch.manual_seed(seed)
    bunch = ImageDataBunch.from_tensors(*data, classes=[str(i) for i in range(a.classes)], tfms=cifar_transforms(),
                                        bs=a.bs, device=a.device).normalize(tuple(s.tolist() for s in stats(data[0])))
    torch.manual_seed(seed)
    model = cifar_resnet(a.depth, a.classes)
    learn = Learner(bunch, model, metrics=[accuracy], bf16=not a.no_bf16, device=a.device, silent=True,
                    compile=compile_opts(a) if a.compile else False, check_finite=variant != 'no-guard',
                    layer_groups=[model] if variant == 'one-group' else None)
    cbs = [_DropPred()] if variant == 'no-pred' else []
    if a.compile:
        learn.warmup()
    torch.manual_seed(seed)
    sync(a.device)
    t0 = time.perf_counter()
    learn.fit_one_cycle(a.epochs, a.max_lr, callbacks=cbs)
    sync(a.device)
    t = time.perf_counter() - t0
    r = learn.recorder
    if profile is not None:  # one more epoch of the warm learner
        name = 'minifast' + (f'[{variant}]' if variant else '')
        profile(lambda: learn.fit_one_cycle(1, a.max_lr, callbacks=cbs), name)
    return t, {'train_loss': r.train_losses[-1], 'valid_loss': r.val_losses[-1], 'accuracy': r.metrics[-1][0]}, \
        [float(m[0]) for m in r.metrics]


class Profiles:
    """--profile: runs a runner's extra epoch under torch.profiler and collects, per step, the wall time, the
    kernel time and the host's kernel launches, graph launches and copies, plus its busiest ops."""

    HOST_CALLS = ('cudaLaunchKernel', 'cudaGraphLaunch', 'cudaMemcpyAsync', 'aten::copy_', 'cudaStreamSynchronize',
                  'cudaDeviceSynchronize', 'aten::_local_scalar_dense')
    BY_SHAPE = ('aten::copy_', 'aten::_to_copy', 'aten::fill_', 'aten::mul', 'aten::add', 'aten::_foreach_copy_',
                'aten::_foreach_add_', 'aten::_fused_adamw_', 'aten::index')  # which tensors the per-step copies move

    def __init__(self, a):
        self.a, self.summary, self.tables = a, [], []

    def __call__(self, fn, name):
        from torch.profiler import ProfilerActivity, profile
        a = self.a
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.type == 'cuda' else [])
        sync(a.device)
        t0 = time.perf_counter()
        with profile(activities=acts, record_shapes=True) as prof:
            fn()
            sync(a.device)
        wall = time.perf_counter() - t0
        steps = a.n_train // a.bs
        ka = prof.key_averages()
        kernel_us = sum(getattr(e, 'self_device_time_total', 0.) for e in ka
                        if str(getattr(e, 'device_type', '')).endswith('CUDA'))  # kernels and device copies only
        calls = {e.key: e.count for e in ka if e.key in self.HOST_CALLS}
        per_step = '  '.join(f'{k} {calls.get(k, 0) / steps:.1f}' for k in self.HOST_CALLS)
        self.summary.append(f'{name:24s} wall {wall / steps * 1e3:7.3f} ms/step  kernels '
                            f'{kernel_us / 1e3 / steps:7.3f} ms/step  {per_step}')
        by_shape = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key in self.BY_SHAPE),
                          key=lambda e: -e.count)[:12]
        self.tables.append(f'== {name}: busiest host ops (one epoch: {steps} steps + validation)\n'
                           + ka.table(sort_by='self_cpu_time_total', row_limit=25) + '\n'
                           + '\n'.join(f'{e.count / steps:8.2f}/step  {e.key}  {e.input_shapes}' for e in by_shape))

    def write(self, path):
        head = ['one extra epoch of each runner under torch.profiler (its overhead inflates the walls; compare '
                'the runners), per training step:'] + self.summary
        Path(path).write_text('\n'.join(head + [''] + self.tables))
        print('\n'.join(head) + f'\n(tables in {path})', flush=True)


# ---- (b) the plain fp32 loop over a torch DataLoader -------------------------------------------------------------
class _Items(torch.utils.data.Dataset):
    def __init__(self, x, y, tfm):
        self.x, self.y, self.tfm = x, y, tfm

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.tfm(self.x[i]), self.y[i]


def plain_fp32(a, data, seed):
    from torchvision.transforms import v2 as T
    dev = a.device
    mean, std = stats(data[0])
    norm = [T.ToDtype(torch.float32, scale=True), T.Normalize(mean.tolist(), std.tolist())]
    train_t = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *norm])
    kw = dict(num_workers=a.workers, pin_memory=dev.type == 'cuda', persistent_workers=a.workers > 0)
    train = torch.utils.data.DataLoader(_Items(data[0], data[1], train_t), batch_size=a.bs, shuffle=True,
                                        drop_last=True, **kw)
    valid = torch.utils.data.DataLoader(_Items(data[2], data[3], T.Compose(norm)), batch_size=a.bs, **kw)
    torch.manual_seed(seed)
    model = cifar_resnet(a.depth, a.classes).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=a.max_lr, betas=(0.95, 0.99), weight_decay=1e-2)
    sched = one_cycle(opt, a, a.baseline_epochs * len(train))
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(a.baseline_epochs):
        model.train()
        running = 0.
        for xb, yb in train:
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        model.eval()
        vloss, correct = 0., 0
        with torch.no_grad():
            for xb, yb in valid:
                xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
                out = model(xb)
                vloss += F.cross_entropy(out, yb, reduction='sum').item()
                correct += int((out.argmax(1) == yb).sum())
    sync(dev)
    t = time.perf_counter() - t0
    return t, {'train_loss': running / len(train), 'valid_loss': vloss / len(data[2]),
               'accuracy': correct / len(data[2])}


def environment(a):
    env = {'device': torch.cuda.get_device_name(a.device) if a.device.type == 'cuda' else platform.processor() or
           'cpu', 'torch': torch.__version__, 'python': platform.python_version(),
           'cuda': torch.version.cuda if a.device.type == 'cuda' else None, 'cpus': os.cpu_count(),
           'date': time.strftime('%Y-%m-%d'), 'command': 'python benchmarks/gpu_resnet56.py ' + ' '.join(sys.argv[1:])}
    try:
        import torchvision
        env['torchvision'] = torchvision.__version__
    except ImportError:
        pass
    return env


def main(argv=None):
    a = parse(sys.argv[1:] if argv is None else argv)
    env = environment(a)
    print(' '.join(f'{k}={v}' for k, v in env.items()), flush=True)
    t = time.perf_counter()
    data = make_dataset(a)
    print(f'data: {a.data}, {a.n_train} + {a.n_valid} images, {a.classes} classes ({time.perf_counter() - t:.1f} s '
          f'to make); ResNet-{a.depth}, bs {a.bs}, {a.epochs} epochs, bf16 {not a.no_bf16}, compile {a.compile}',
          flush=True)
    imgs = a.epochs * (a.n_train // a.bs) * a.bs
    fns = {k: v for k, v in (('hand-written', hand_written), ('minifast', with_minifast)) if k in a.runners}
    for v in a.variants:
        fns[f'minifast[{v}]'] = functools.partial(with_minifast, variant=v)
    runs = {k: [] for k in fns}
    profiles = Profiles(a) if a.profile else None
    for r in range(a.repeats):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in order:
            last = r == a.repeats - 1
            secs, res, accs = fns[name](a, data, seed=r, profile=profiles if last else None)
            runs[name].append((secs, res, accs))
            print(f'  round {r} {name:20s} {secs:7.2f} s  {imgs / secs:9.0f} img/s  ' +
                  '  '.join(f'{k} {v:.4f}' for k, v in res.items()), flush=True)
            print(f'  {"":21s}accuracy by epoch: ' + ' '.join(f'{v:.3f}' for v in accs), flush=True)
    out = {'env': env, 'args': {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(a).items()}}
    best = {k: min(s for s, _, _ in v) for k, v in runs.items()}
    for k in runs:
        out[k] = {'seconds': best[k], 'img_per_s': imgs / best[k], 'final': runs[k][-1][1],
                  'accuracy_by_epoch': runs[k][-1][2]}
    if a.baseline_epochs:
        secs, res = plain_fp32(a, data, seed=0)
        bimgs = a.baseline_epochs * (a.n_train // a.bs) * a.bs
        out['plain fp32'] = {'seconds': secs, 'img_per_s': bimgs / secs, 'final': res, 'epochs': a.baseline_epochs,
                             'seconds_for_epochs_estimate': secs * a.epochs / a.baseline_epochs}
        print(f'  plain fp32    {secs:7.2f} s for {a.baseline_epochs} epoch(s)  {bimgs / secs:9.0f} img/s  ' +
              '  '.join(f'{k} {v:.4f}' for k, v in res.items()), flush=True)
    ref = 'hand-written' if 'hand-written' in out else 'minifast'
    print(f'\n{"runner":20s} {"best s":>8s} {"img/s":>9s} {"vs " + ref.split("-")[0]:>9s}')
    for k in [*fns, 'plain fp32']:
        if k in out:
            v = out[k]
            note = f'  ({v["epochs"]} epochs; {a.epochs} would take ~{v["seconds_for_epochs_estimate"]:.0f} s)' \
                if k == 'plain fp32' else ''
            print(f'{k:20s} {v["seconds"]:8.2f} {v["img_per_s"]:9.0f} '
                  f'{v["img_per_s"] / out[ref]["img_per_s"]:8.3f}x{note}')
    if 'hand-written' in out and 'minifast' in out:
        ratio = out['minifast']['img_per_s'] / out['hand-written']['img_per_s']
        out['ratio_minifast_vs_hand_written'] = ratio
        print(f'RESULT minifast/hand-written = {ratio:.3f}x images/s (target >= 0.97x); minifast {a.epochs} epochs '
              f'in {best["minifast"]:.1f} s')
    elif 'minifast' in out:
        print(f'RESULT minifast {a.epochs} epochs in {best["minifast"]:.1f} s at bs {a.bs}, max_lr {a.max_lr:g}: '
              f'final accuracy {out["minifast"]["final"]["accuracy"]:.4f}')
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    if profiles is not None:
        profiles.write(a.profile)
    assert all(math.isfinite(v['final']['train_loss']) for k, v in out.items() if isinstance(v, dict) and 'final' in v)
    return out


if __name__ == '__main__':
    main()
