"""Cost of the interpretable-gradient loss: a plain training step vs a regularised one (CE + λ·L_R).

Times, in one process and interleaved, the CIFAR ResNet-18 (or MobileNet-V2) training step on the CPU (or
``--device cuda``), plain and regularised **in the same precision and layout** (``--amp``: bf16 autocast around
forward and loss; ``--channels-last``: model and inputs in channels-last), and prints both times and their
ratio, and each step's peak memory (measured in a fresh child process per variant: peak RSS growth over one
step, so the numbers do not mix; skipped on a GPU and with ``--no-memory``). ``--reg-fraction ρ`` adds the
sub-batch regulariser (``L_R`` on ``⌈ρ n⌉`` samples). ``--naive`` adds the "straightforward" reference (a second
forward with an autograd.Function swapped in for every ReLU/ReLU6 module, guided gradient from it, standard
gradient with ``create_graph`` from an eval-mode forward). ``--per-call`` prints the engine's per-call
overhead: how many calls one recorded forward intercepts, and the extra time per call over a plain forward.

    python benchmarks/train_step.py --width 0.5 --amp --channels-last --reg-fraction 0.25
    python benchmarks/train_step.py --width 0.125 --batch 8 --naive --per-call --no-memory   # launch-bound regime
"""

from __future__ import annotations

import argparse
import contextlib
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
from common import sync
from igrad.rules import BackwardRules


def _precision(args):
    """The autocast context of ``--amp`` (bf16 on the device's type), else a no-op."""
    return torch.autocast(args.device, dtype=torch.bfloat16) if args.amp else contextlib.nullcontext()


def make_plain_step(args):
    def step(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        with _precision(args):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    return step


def make_reg_step(args, fraction=1.0, lam=0.75):
    crit = igrad.GradientAlignmentLoss(stats=args.stats, fraction=fraction)
    gen = torch.Generator().manual_seed(0)

    def step(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        with _precision(args):
            l_r, logits = crit(model, x, y, generator=gen)
            loss = F.cross_entropy(logits.float(), y) + lam * l_r
        loss.backward()
        opt.step()

    return step


class _GuidedRectifier(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, upper):
        out = z.clamp(min=0, max=upper)
        ctx.save_for_backward(out)
        ctx.upper = upper
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        mask = (out > 0) if ctx.upper is None else (out > 0) & (out < ctx.upper)
        return g.clamp(min=0) * mask, None


class _Swap(nn.Module):
    def __init__(self, upper):
        super().__init__()
        self.upper = upper

    def forward(self, z):
        return _GuidedRectifier.apply(z, self.upper)


def make_naive_step(args, lam=0.75):
    """The straightforward version: two forwards (module swap for the guided one), eval-mode BN for both."""

    def step(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        with _precision(args):
            logits = model(x)
            rect = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU | nn.ReLU6)]
            model.eval()
            xg = x.detach().requires_grad_(True)
            y_std = model(xg).gather(1, y[:, None]).sum()
            (g,) = torch.autograd.grad(y_std, xg, create_graph=True)
            saved = []
            for n, m in rect:
                parent = model.get_submodule(n.rpartition(".")[0]) if "." in n else model
                saved.append((parent, n.rpartition(".")[2], m))
                setattr(parent, n.rpartition(".")[2], _Swap(6.0 if isinstance(m, nn.ReLU6) else None))
            try:
                xg2 = x.detach().requires_grad_(True)
                (gg,) = torch.autograd.grad(model(xg2).gather(1, y[:, None]).sum(), xg2)
            finally:
                for parent, attr, m in saved:
                    setattr(parent, attr, m)
                model.train()
            l_r = (1 - F.cosine_similarity(g.flatten(1).float(), gg.flatten(1).float(), dim=1)).mean()
            loss = F.cross_entropy(logits.float(), y) + lam * l_r
        loss.backward()
        opt.step()

    return step


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
    model = igrad.create_model(args.model, num_classes=100, width=args.width).train().to(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 100, (args.batch,), device=args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return model, opt, x, y


def variants(args):
    v = {"plain": make_plain_step(args), f"igrad[{args.stats}]": make_reg_step(args)}
    if args.reg_fraction < 1:
        v[f"igrad[{args.stats}, ρ={args.reg_fraction:g}]"] = make_reg_step(args, args.reg_fraction)
    if args.naive:
        v["straightforward"] = make_naive_step(args)
    return v


class _Counter(BackwardRules):
    """The engine, counting the calls it intercepts."""

    calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        _Counter.calls += 1
        return super().__torch_function__(func, types, args, kwargs)


def per_call(args, model, x, repeats=20):
    """Intercepted calls per recorded forward, and the median extra time per call over a plain forward."""
    model.eval()
    xg = x.detach().requires_grad_(True)
    _Counter.calls = 0
    with _precision(args), _Counter(double_backward=True):
        model(xg)
    calls = _Counter.calls
    times = {"plain": [], "igrad": []}
    for _ in range(repeats):
        for name in times:
            t0 = time.perf_counter()
            with _precision(args), torch.enable_grad():
                if name == "plain":
                    model(xg)
                else:
                    rules = BackwardRules(double_backward=True)
                    rules.input = xg
                    with rules:
                        model(xg)
            sync()
            times[name].append(time.perf_counter() - t0)
    model.train()
    plain, ours = statistics.median(times["plain"]), statistics.median(times["igrad"])
    return calls, plain, ours


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar_resnet18", choices=["cifar_resnet18", "cifar_mobilenet_v2"])
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32, help="image side (small: host-bound, as small kernels on a GPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stats", default=igrad.DEFAULT_STATS, choices=igrad.STATS_MODES)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast around forward and loss")
    ap.add_argument("--channels-last", action="store_true", help="model and inputs in channels-last")
    ap.add_argument("--reg-fraction", type=float, default=1.0, help="also time L_R on this fraction of the batch")
    ap.add_argument("--naive", action="store_true", help="also time the straightforward reference")
    ap.add_argument("--per-call", action="store_true", help="also measure the engine's cost per intercepted call")
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
            sync()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    no_memory = args.no_memory or args.device != "cpu"
    mem = {} if no_memory else {k: peak_memory(args, k) for k in steps}
    precision = ("bf16" if args.amp else "fp32") + ("+CL" if args.channels_last else "")
    print(
        f"{args.model} width={args.width} batch={args.batch} threads={args.threads} {precision} "
        f"device={args.device} torch={torch.__version__} (median of {args.repeats}; load {os.getloadavg()[0]:.2f})"
    )
    for name in steps:
        t = statistics.median(times[name])
        line = f"  {name:28s} {t * 1000:9.1f} ms/step  time ratio {t / base:5.2f}x"
        if mem:
            line += f"  peak +{mem[name] / 2**20:8.1f} MiB  memory ratio {mem[name] / mem['plain']:5.2f}x"
        print(line)
    if args.per_call:
        calls, plain, ours = per_call(args, model, x)
        print(
            f"  per call: {calls} intercepted calls per forward; forward {plain * 1e3:.2f} ms plain, "
            f"{ours * 1e3:.2f} ms recorded: {(ours - plain) / calls * 1e6:.1f} µs per call"
        )


if __name__ == "__main__":
    main()
