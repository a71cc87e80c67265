"""Short real-data runs: the sub-batch regulariser's fraction ρ, and bf16 + channels-last vs float32.

Trains CIFAR ResNet-18 (``--width``) on real CIFAR-100 with igrad's public loss in a plain loop (SGD with
Nesterov momentum, linear warm-up then cosine decay, random crop and flip), the same seed, data order and
number of steps for every arm:

* ``baseline``: λ = 0;  ``rho=1``, ``rho=0.5``, ``rho=0.25``: λ > 0 with ``GradientAlignmentLoss(fraction=ρ)``
  (``batch-frozen``), float32;  ``rho=1,bf16``: ρ = 1 with bf16 autocast and channels-last.

Each arm reports test accuracy and the eval-mode mean cos(δx, δᴳx) on fixed test subsets (both measured in
float32), and its training time. On the float32 ``rho=1`` and baseline models it also measures bf16's effect
on the gradients themselves: per-sample cos(δx in bf16 + channels-last, δx in float32) and the same for δᴳx.
Writes JSON with provenance.

    IGRAD_DATA=/path/to/cifar100 python experiments/fraction_bf16.py --steps 300 --results results/fraction_bf16.json
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import igrad
from igrad.atomic import atomic_write_json
from igrad.data import data_root_from_env, eval_tensors, load_split
from igrad.gradients import cosine_similarity, input_gradients
from igrad.normalization import NORMALIZATIONS
from igrad.provenance import provenance


def batches(n_train: int, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    """The data order, shared by every arm: ``steps`` index batches from seeded permutations."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n_train, generator=g) for _ in range(math.ceil(steps * batch / n_train) + 1)])
    return [order[i * batch : (i + 1) * batch] for i in range(steps)]


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (padding 4) and horizontal flip of uint8 images ``[B, 3, 32, 32]``."""
    b = images.shape[0]
    padded = F.pad(images, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (b,), generator=gen), torch.randint(0, 9, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.stack([padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(b)])
    out[flip] = out[flip].flip(-1)
    return out


def train_arm(arm: dict[str, Any], args: argparse.Namespace, data: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = igrad.create_model("cifar_resnet18", num_classes=100, width=args.width).train()
    cl = torch.channels_last if arm["bf16"] else torch.contiguous_format
    model = model.to(memory_format=cl)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    crit = igrad.GradientAlignmentLoss(fraction=arm["rho"]) if arm["lam"] > 0 else None
    warm = max(1, args.steps // 10)
    for step, idx in enumerate(data["order"]):
        decay = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))
        factor = (step + 1) / warm if step < warm else decay
        for group in opt.param_groups:
            group["lr"] = args.lr * factor
        gen = torch.Generator().manual_seed(args.seed * 100003 + step)  # augmentation and subset of this step
        x = data["norm"].apply(augment(data["train"].images[idx], gen)).contiguous(memory_format=cl)
        y = data["train"].labels[idx]
        opt.zero_grad(set_to_none=True)
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if arm["bf16"] else contextlib.nullcontext()
        with amp:
            if crit is not None:
                l_r, logits = crit(model, x, y, generator=gen)
                loss = F.cross_entropy(logits.float(), y) + arm["lam"] * l_r
            else:
                loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return sum(int((model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum()) for i in range(0, len(y), 500)) / len(y)


def mean_cos(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    chunks = range(0, len(y), 250)
    return sum(float(igrad.gradient_cosine(model, x[i : i + 250], y[i : i + 250]).sum()) for i in chunks) / len(y)


def bf16_fidelity(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Per-sample cos between each gradient computed in bf16 + channels-last and in float32 (eval mode)."""
    ref = input_gradients(model, x, y)
    cl = model.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = input_gradients(cl, x.contiguous(memory_format=torch.channels_last), y)
    model.to(memory_format=torch.contiguous_format)
    out = {}
    for kind in ("standard", "guided"):
        c = cosine_similarity(getattr(low, kind).float(), getattr(ref, kind))
        out[f"{kind}_mean"], out[f"{kind}_min"] = float(c.mean()), float(c.min())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lam", type=float, default=0.75)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--test-acc", type=int, default=2000, help="test images for accuracy")
    ap.add_argument("--test-cos", type=int, default=500, help="test images for cos and the bf16 fidelity")
    ap.add_argument("--arms", default="baseline,rho=1,rho=0.5,rho=0.25,rho=1+bf16")
    ap.add_argument("--results", default="results/fraction_bf16.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = data_root_from_env()
    if root is None:
        raise SystemExit("set IGRAD_DATA to the CIFAR-100 image folder")
    train, test = load_split(root, "train"), load_split(root, "test")
    norm = NORMALIZATIONS["cifar100"]
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(1))
    x_acc, y_acc = eval_tensors(test, norm, pick[: args.test_acc])
    x_cos, y_cos = eval_tensors(test, norm, pick[: args.test_cos])
    data = {"train": train, "norm": norm, "order": batches(len(train), args.steps, args.batch, args.seed)}
    results: dict[str, Any] = {}
    for name in args.arms.split(","):
        rho = float(name.split("=")[1].split("+")[0]) if name.startswith("rho") else 1.0
        arm = {"lam": 0.0 if name == "baseline" else args.lam, "rho": rho, "bf16": name.endswith("+bf16")}
        t0 = time.perf_counter()
        model = train_arm(arm, args, data)
        res = {**arm, "train_s": round(time.perf_counter() - t0, 1)}
        res["test_acc"], res["cos"] = accuracy(model, x_acc, y_acc), mean_cos(model, x_cos, y_cos)
        if not arm["bf16"] and rho == 1:
            res["bf16_vs_fp32_gradient_cos"] = bf16_fidelity(model, x_cos, y_cos)
        results[name] = res
        print(name, res, flush=True)
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.results, {"runs": results, "provenance": provenance(vars(args), args.seed)})


if __name__ == "__main__":
    main()
