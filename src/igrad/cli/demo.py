"""Train a small CIFAR ResNet-18 for a few epochs, fine-tune it briefly with the interpretable-gradient loss,
and print the test accuracy and eval-mode mean cos(standard, guided gradient) of both (a few minutes on a
CPU). The training half of `igrad reproduce --preset demo`, with the same budget and λ;
`igrad reproduce --preset demo` (`make demo`) also evaluates the saliency maps and writes a report.

examples:
  igrad demo --data /path/to/cifar100            (an image folder with train/ and test/)
  igrad demo --data cifar100 --download          (torchvision's CIFAR-100, needs internet)
"""

from __future__ import annotations

import argparse
import os

from ..data import data_root_from_env
from ..errors import IgradError

HELP = "short demonstration: baseline vs regularised training, accuracy and cos(δx, δᴳx)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``igrad demo``."""
    p.add_argument("--data", default=None, help="image folder or cifar100 (default: $IGRAD_DATA)")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-100")
    p.add_argument("--out", default="runs/demo", help="folder for the two runs and demo.json")
    from ..demo import DEMO_LAMBDA

    p.add_argument("--lam", type=float, default=DEMO_LAMBDA, help=f"λ of the regularised run (default {DEMO_LAMBDA:g})")
    p.add_argument("--model", default="cifar_resnet18")
    p.add_argument("--width", type=float, default=None, help="width multiplier (default: the demo's)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the baseline (default: the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its table."""
    from ..demo import run_demo

    data = args.data or (os.fspath(p) if (p := data_root_from_env()) else None)
    if data is None:
        raise IgradError("no data: pass --data FOLDER, set IGRAD_DATA, or use --data cifar100 --download")
    overrides = {k: v for k, v in (("width", args.width), ("epochs", args.epochs)) if v is not None}
    result = run_demo(
        data,
        args.out,
        lam=args.lam,
        model=args.model,
        download=args.download,
        seed=args.seed,
        quiet=args.quiet,
        **overrides,
    )
    print()
    print(result.table())
    print(f"\nwritten: {args.out}/demo.json")
    return 0
