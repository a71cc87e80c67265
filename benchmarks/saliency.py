"""Saliency speed: igrad vs pytorch-grad-cam, per method, on the CIFAR ResNet-18 (batch 64).

Both libraries explain the same images (``--images``, default 64) of the same model at ``layer4`` with the same
target classes, in one process, alternating, best of ``--repeats``; a warm-up call of each comes first. igrad
runs with the options that reproduce pytorch-grad-cam's definitions (``gradcam++`` eps=1e-6, ``scorecam``
mask_align_corners=True; the defaults cost the same), and the maps of both are compared (max |difference|).
pytorch-grad-cam runs with its own batch sizes (ScoreCAM 16, AblationCAM 32) unless ``--their-batch`` is given;
igrad with ``--batch`` (default 64) for scorecam and 256 (its default) for ablationcam.

Issue targets (ratio = igrad images/s ÷ pytorch-grad-cam images/s): every method >= 1, ablationcam >= 10,
scorecam >= 1.5.

    python benchmarks/saliency.py                       # full width: slow on a CPU (Score-CAM: 64·512 forwards)
    python benchmarks/saliency.py --width 0.25 --images 16 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import time

import torch

import igrad
from common import load_images, sync
from igrad.saliency import create_method

PAIRS = {
    "gradcam": ("GradCAM", {}),
    "gradcam++": ("GradCAMPlusPlus", {"eps": 1e-6}),
    "xgradcam": ("XGradCAM", {}),
    "layercam": ("LayerCAM", {}),
    "scorecam": ("ScoreCAM", {"mask_align_corners": True}),
    "ablationcam": ("AblationCAM", {}),
}
TARGETS = {"ablationcam": 10.0, "scorecam": 1.5}


def run_igrad(model, name, x, t, batch):
    kw = dict(PAIRS[name][1])
    if name in ("scorecam", "ablationcam"):
        kw["progress"] = False
    if name == "scorecam":
        kw["batch_size"] = batch
    with create_method(name, model, "layer4", **kw) as m:
        return m(x, t)


def run_theirs(model, name, x, t, their_batch):
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = getattr(pgc, PAIRS[name][0])
    targets = [ClassifierOutputTarget(int(c)) for c in t]
    with contextlib.redirect_stderr(io.StringIO()), cls(model, [model.layer4]) as cam:  # their tqdm bars
        if their_batch:
            cam.batch_size = their_batch
        return torch.from_numpy(cam(x, targets))


def best_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0, help="CIFAR ResNet-18 width multiplier (default 1)")
    p.add_argument("--images", type=int, default=64, help="images explained per call (default 64)")
    p.add_argument("--batch", type=int, default=64, help="igrad scorecam forward batch (default 64)")
    p.add_argument("--their-batch", type=int, default=0, help="pytorch-grad-cam batch (default: theirs)")
    p.add_argument("--methods", default=",".join(PAIRS), help="comma-separated subset")
    p.add_argument("--repeats", type=int, default=2, help="best of N per library (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--checkpoint", help="an igrad checkpoint (a cifar_resnet18) instead of random weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.checkpoint:
        from igrad.checkpoint import load_model

        model, _ = load_model(args.checkpoint)
        desc = f"checkpoint {args.checkpoint}"
    else:
        model = igrad.create_model("cifar_resnet18", num_classes=100, width=args.width).eval()
        desc = f"cifar_resnet18 width {args.width}, random weights"
    x, _, what = load_images(args.images, args.seed)
    desc += f"; {what}"
    model, x = model.to(args.device), x.to(args.device)
    desc += f"; device {args.device}"
    with torch.no_grad():
        t = model(x).argmax(1)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {desc}; {args.images} images 32x32; layer4; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'method':<12} {'igrad img/s':>12} {'pgc img/s':>10} {'ratio':>7} {'target':>7} {'max|diff|':>10}")
    failed = []
    for name in methods:
        run_igrad(model, name, x[:2], t[:2], args.batch)  # warm-up
        run_theirs(model, name, x[:2], t[:2], args.their_batch)
        ours_s = theirs_s = float("inf")
        for _ in range(args.repeats):  # alternate, so that a noisy neighbour hurts both
            s, ours = best_time(lambda n=name: run_igrad(model, n, x, t, args.batch), 1)
            ours_s = min(ours_s, s)
            s, theirs = best_time(lambda n=name: run_theirs(model, n, x, t, args.their_batch), 1)
            theirs_s = min(theirs_s, s)
        ratio = theirs_s / ours_s
        target = TARGETS.get(name, 1.0)
        ok = ratio >= target
        failed += [] if ok else [name]
        diff = float((ours.cpu() - theirs.cpu()).abs().max())
        print(
            f"{name:<12} {args.images / ours_s:>12.1f} {args.images / theirs_s:>10.1f} {ratio:>6.1f}x "
            f"{'>=' + format(target, 'g'):>7} {diff:>10.1e}{'' if ok else '  BELOW TARGET'}",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
