"""Cost of the interpretable-gradient loss: a plain training step vs a regularised one (CE + λ·L_R).

Times, in one process and interleaved, the CIFAR ResNet-18 (or MobileNet-V2) training step at batch 128
on the CPU, and prints both times, their ratio, and each step's peak memory (measured in a fresh child process
per variant: peak RSS growth over one step, so the numbers do not mix). Issue target:
time ratio <= 2.5 and memory ratio <= 2.5 at equal batch. Also times the "straightforward"
reference the issue quotes (a second forward with an autograd.Function swapped in for every ReLU,
guided gradient from it, standard gradient with create_graph from the first forward).

    python benchmarks/train_step.py --width 0.5 --stats batch-frozen
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import statistics
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

import igrad


def plain_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def make_reg_step(stats, lam=0.75):
    crit = igrad.GradientAlignmentLoss(stats=stats)

    def step(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        l_r, logits = crit(model, x, y)
        loss = F.cross_entropy(logits, y) + lam * l_r
        loss.backward()
        opt.step()

    return step


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        out = z.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return g.clamp(min=0) * (out > 0)


class _SwapReLU(nn.Module):
    def forward(self, z):
        return _GuidedReLU.apply(z)


def naive_step(model, opt, x, y, lam=0.75):
    """The straightforward version: two forwards (module swap for the guided one), eval-mode BN for both."""
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    relus = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    model.eval()
    xg = x.detach().requires_grad_(True)
    y_std = model(xg).gather(1, y[:, None]).sum()
    (g,) = torch.autograd.grad(y_std, xg, create_graph=True)
    saved = {}
    for n, m in relus:
        parent = model.get_submodule(n.rpartition(".")[0]) if "." in n else model
        saved[n] = (parent, n.rpartition(".")[2], m)
        setattr(parent, n.rpartition(".")[2], _SwapReLU())
    try:
        xg2 = x.detach().requires_grad_(True)
        (gg,) = torch.autograd.grad(model(xg2).gather(1, y[:, None]).sum(), xg2)
    finally:
        for parent, attr, m in saved.values():
            setattr(parent, attr, m)
        model.train()
    l_r = (1 - F.cosine_similarity(g.flatten(1), gg.flatten(1), dim=1)).mean()
    (F.cross_entropy(logits, y) + lam * l_r).backward()
    opt.step()


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_child(args, which, conn):
    """In a fresh process: peak RSS growth over one step (after model, optimizer and data exist),
    sampled every 0.2 ms by a thread (the kernels release the GIL)."""
    torch.set_num_threads(args.threads)
    model, opt, x, y = setup(args)
    for p in model.parameters():  # optimizer state exists before measuring, as in a running job
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    gc.collect()
    before = _rss_bytes()
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    t = threading.Thread(target=sample)
    t.start()
    variants(args)[which](model, opt, x, y)
    done.set()
    t.join()
    conn.send(peak[0] - before)
    conn.close()


def peak_memory(args, which):
    ctx = mp.get_context("spawn")  # a fresh interpreter: no peak inherited from this process
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_peak_child, args=(args, which, child))
    p.start()
    value = parent.recv()
    p.join()
    return value


def setup(args):
    torch.manual_seed(0)
    kw = {"width": args.width}
    model = igrad.create_model(args.model, num_classes=100, **kw).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 100, (args.batch,))
    return model, opt, x, y


def variants(args):
    v = {"plain": plain_step, f"igrad[{args.stats}]": make_reg_step(args.stats)}
    if args.naive:
        v["straightforward"] = naive_step
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar_resnet18", choices=["cifar_resnet18", "cifar_mobilenet_v2"])
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--stats", default=igrad.DEFAULT_STATS, choices=igrad.STATS_MODES)
    ap.add_argument("--naive", action="store_true", help="also time the straightforward reference")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, opt, x, y = setup(args)
    steps = variants(args)
    for step in steps.values():  # warm-up
        step(model, opt, x, y)
    times = {k: [] for k in steps}
    for _ in range(args.repeats):  # interleaved, so drift and contention hit every variant alike
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(model, opt, x, y)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    mem = {} if args.no_memory else {k: peak_memory(args, k) for k in steps}
    print(
        f"{args.model} width={args.width} batch={args.batch} threads={args.threads} "
        f"torch={torch.__version__} (median of {args.repeats})"
    )
    for name in steps:
        t = statistics.median(times[name])
        line = f"  {name:24s} {t * 1000:9.1f} ms/step  time ratio {t / base:5.2f}x"
        if mem:
            line += f"  peak +{mem[name] / 2**20:8.1f} MiB  memory ratio {mem[name] / mem['plain']:5.2f}x"
        print(line)


if __name__ == "__main__":
    main()
