"""Speed of RISE insertion + deletion (igrad.metrics) against the straightforward per-image loop.

Over N CIFAR images (256 by default: the test split of $IGRAD_DATA when set, else random tensors; the
line "data:" says which) with the CIFAR ResNet-18 (full width by default, untrained: the cost does not
depend on the weights), times in one process

* igrad: ``insertion`` + ``deletion`` on all images, forwards packed ``--batch-size`` at a time;
* baseline: RISE's ``CausalMetric.single_run`` as published, one image and one step at a time (one
  forward of one image per curve point), for insertion and deletion;

interleaved in blocks of images so that a change of machine load hits both alike, checks that both
give the same curves, and prints both times and their ratio. With ``--amp`` igrad
runs in bf16 autocast (``--channels-last``: the model and the images in channels-last; both on a copy of
the model) while the baseline stays the float32 per-image loop; the ratio is
printed with the deviation from float32 beside it: the largest curve-point difference and the largest and
mean AUC differences (x100 scale). With
``--evaluate N`` it also saves the untrained model as a checkpoint and times ``igrad evaluate`` (all
methods, all metrics) on N test images of $IGRAD_DATA, per method, extrapolated to 1,000 images.

    python benchmarks/metrics.py                       # 256 images, full width
    python benchmarks/metrics.py --width 0.25 --n 64
    IGRAD_DATA=/work/shared/data/cifar100 python benchmarks/metrics.py --n 64 --baseline-images 32 --amp
    IGRAD_DATA=/work/shared/data/cifar100 python benchmarks/metrics.py --evaluate 16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import igrad
from common import load_images
from igrad.data import data_root_from_env
from igrad.metrics import deletion, insertion
from igrad.normalization import NORMALIZATIONS
from igrad.precision import autocast, to_channels_last


def rise_single_run(model, img, sal, target, mode, step, blur_kernel):
    """RISE ``CausalMetric.single_run``: one image, one step at a time (ties by position, docs/method.md §Metrics)."""
    _, c, h, w = img.shape
    n = (h * w + step - 1) // step
    order = torch.sort(sal.reshape(-1), descending=True, stable=True).indices
    if mode == "del":
        start, finish = img.clone(), torch.zeros_like(img)
    else:
        start, finish = F.conv2d(img, blur_kernel, padding=5, groups=c), img.clone()
    scores = torch.empty(n + 1)
    for i in range(n + 1):
        with torch.no_grad():
            scores[i] = torch.softmax(model(start), 1)[0, target]
        if i < n:
            coords = order[step * i : step * (i + 1)]
            start.view(1, c, -1)[0, :, coords] = finish.view(1, c, -1)[0, :, coords]
    return scores


def _auc(curves):
    """RISE AUC x100 of curves ``[n+1]`` (trapezoid, spacing 1/n), as igrad.metrics computes it."""
    c = curves.double()
    return float((c.sum() - c[0] / 2 - c[-1] / 2) / (len(c) - 1) * 100)


def bench_curves(args):
    torch.manual_seed(args.seed)
    model = igrad.create_model("cifar_resnet18", num_classes=100, width=args.width).eval().to(args.device)
    # igrad's model: the same weights, channels-last if asked (the baseline keeps the float32 contiguous one)
    fast = to_channels_last(copy.deepcopy(model)) if args.channels_last else model
    layout = to_channels_last if args.channels_last else (lambda t: t)
    precision = ("bf16 autocast" if args.amp else "float32") + (" + channels-last" if args.channels_last else "")
    x, y, what = load_images(args.n, args.seed)
    maps = torch.rand(args.n, 32, 32, generator=torch.Generator().manual_seed(args.seed + 1))
    x, y, maps = x.to(args.device), y.to(args.device), maps.to(args.device)
    what += f"; device {args.device}"
    step = 32
    n_points = math.ceil(32 * 32 / step) + 1
    print(f"data: {what}; {args.n} images 3x32x32; model: cifar_resnet18 width {args.width} (untrained)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpus = f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load:.1f}"
    print(f"torch {torch.__version__}, {cpus}")
    print(f"step {step} px, {n_points} points/curve; igrad in {precision}, baseline in float32")
    print(f"forwards per method: {2 * args.n * n_points} (insertion + deletion)")
    k = igrad.metrics.blur_kernel().float()[None, None].repeat(3, 1, 1, 1).to(args.device)
    t_igrad = t_base = 0.0
    n_base = min(args.baseline_images, args.n)
    block = max(1, math.ceil(args.n / args.blocks))
    per_block = math.ceil(n_base / math.ceil(args.n / block))
    n_base = 0
    max_diff = 0.0
    auc_diffs = []
    for lo in range(0, args.n, block):
        sl = slice(lo, lo + block)
        t0 = time.perf_counter()
        with autocast(args.device, args.amp) if args.amp else contextlib.nullcontext():
            ins = insertion(fast, layout(x[sl]), maps[sl], y[sl], step=step, batch_size=args.batch_size)
            dele = deletion(fast, layout(x[sl]), maps[sl], y[sl], step=step, batch_size=args.batch_size)
        t_igrad += time.perf_counter() - t0
        base_idx = list(range(lo, min(lo + block, args.n)))[:per_block]  # spread over the blocks
        t0 = time.perf_counter()
        ref = [
            (rise_single_run(model, x[i : i + 1], maps[i], int(y[i]), "ins", step, k),
             rise_single_run(model, x[i : i + 1], maps[i], int(y[i]), "del", step, k))
            for i in base_idx
        ]  # fmt: skip
        t_base += time.perf_counter() - t0
        n_base += len(base_idx)
        for j, (ri, rd) in zip(base_idx, ref, strict=True):
            max_diff = max(max_diff, (ins.curves[j - lo] - ri).abs().max().item())
            max_diff = max(max_diff, (dele.curves[j - lo] - rd).abs().max().item())
            auc_diffs += [abs(float(ins.auc[j - lo]) - _auc(ri)), abs(float(dele.auc[j - lo]) - _auc(rd))]
        hi = min(lo + block, args.n) - 1
        print(f"  images {lo}..{hi}: igrad {t_igrad:.1f} s, baseline {t_base:.1f} s (cumulative)", flush=True)
    base_total = t_base * args.n / n_base
    note = "" if n_base == args.n else f" (measured on {n_base} images, scaled x{args.n / n_base:.2f})"
    print(f"largest |igrad - baseline| over all curve points: {max_diff:.2e}")
    auc = torch.tensor(auc_diffs)
    deviation = f"largest |dAUC| {auc.max():.3f}, mean |dAUC| {auc.mean():.4f} (AUC x100), curve points {max_diff:.1e}"
    print(f"deviation from float32 ({len(auc_diffs)} AUCs on {n_base} images): {deviation}")
    print(f"igrad    (batch {args.batch_size}): {t_igrad:8.1f} s  ({2 * args.n * n_points / t_igrad:.0f} forwards/s)")
    print(f"baseline (per image, per step): {base_total:8.1f} s{note}")
    target = ">= 5x" if args.amp else ">= 10x"
    print(f"ratio baseline / igrad: {base_total / t_igrad:.2f}x  (target {target}); igrad in {precision}: {deviation}")


def bench_evaluate(args):
    from igrad.checkpoint import save_checkpoint
    from igrad.evaluate import evaluate_checkpoint

    root = data_root_from_env()
    if root is None:
        print("--evaluate needs real data: set IGRAD_DATA (skipped)")
        return
    torch.manual_seed(args.seed)
    model = igrad.create_model("cifar_resnet18", num_classes=100, width=args.width)
    mean, std = NORMALIZATIONS["cifar100"].mean, NORMALIZATIONS["cifar100"].std
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "untrained.pt"
        config = {"model": "cifar_resnet18", "model_kwargs": {"width": args.width}, "num_classes": 100}
        save_checkpoint(ckpt, {"model": model.state_dict(), "config": {**config, "mean": mean, "std": std}})
        t0 = time.perf_counter()
        res = evaluate_checkpoint(
            ckpt, root, limit=args.evaluate, seed=args.seed, batch_size=args.batch_size, accuracy=False
        )
        total = time.perf_counter() - t0
    n = args.evaluate
    print(f"igrad evaluate, all methods x all metrics, {n} CIFAR-100 test images, width {args.width}: {total:.1f} s")
    for m, s in res["timing"]["method_s"].items():
        sal, met = s["saliency"], s["metrics"]
        print(
            f"  {m:15s} saliency {sal:7.1f} s ({sal / n:5.2f} s/image), metrics {met:7.1f} s ({met / n:5.2f} s/image)"
        )
    print(f"extrapolated to 1000 images: {total / n * 1000 / 60:.0f} min (+ accuracy over the 10k test images)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="images (default 256)")
    p.add_argument("--width", type=float, default=1.0, help="ResNet-18 width multiplier (default 1: full width)")
    p.add_argument("--batch-size", type=int, default=64, help="igrad forward batch (default 64)")
    p.add_argument(
        "--baseline-images", type=int, default=256, help="time the baseline on K images only (spread over the blocks)"
    )
    p.add_argument("--blocks", type=int, default=8, help="interleaving blocks (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--amp", action="store_true", help="igrad in bf16 autocast (the baseline stays float32)")
    p.add_argument("--channels-last", action="store_true", help="igrad's model and images in channels-last")
    p.add_argument("--evaluate", type=int, default=0, metavar="N", help="also time igrad evaluate on N images")
    p.add_argument("--skip-curves", action="store_true", help="only the --evaluate timing")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_curves:
        bench_curves(args)
    if args.evaluate:
        bench_evaluate(args)


if __name__ == "__main__":
    main()
