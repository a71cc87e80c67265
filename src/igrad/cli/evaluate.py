"""Measure saliency methods on a trained checkpoint with the metrics of SPEC 4 (AD, AG, AI, insertion,
deletion), on a fixed seeded subset of the test split, and write results.json, results.csv,
results.md and curves.png into --out. With --compare BASELINE OURS, both checkpoints are evaluated on
the same images and compare.md puts them side by side (SPEC 5), the better value of each cell in bold.

examples:
  igrad evaluate --checkpoint runs/r18/best.pt --data $IGRAD_DATA --limit 1000 --out eval/r18
  igrad evaluate --compare runs/base/best.pt runs/ours/best.pt --methods gradcam,gradient --out eval/cmp
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..metrics import METRICS

HELP = "evaluate saliency methods with AD/AG/AI/insertion/deletion and write the tables"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``igrad evaluate``."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="checkpoint to evaluate (e.g. RUN/best.pt)")
    which.add_argument(
        "--compare", nargs=2, type=Path, metavar=("BASELINE", "OURS"), help="evaluate two checkpoints side by side"
    )
    parser.add_argument(
        "--data", help="image-folder root (train/, test/) or cifar10/cifar100; default: the checkpoint's data"
    )
    parser.add_argument("--split", default="test", choices=("test", "val", "train"), help="data split (default test)")
    parser.add_argument("--methods", default="all", help="'all' or comma-separated saliency methods (default all)")
    parser.add_argument(
        "--metrics", default="all", help=f"'all' or comma-separated metrics from {','.join(METRICS)} (default all)"
    )
    parser.add_argument("--limit", type=int, help="evaluate a fixed seeded subset of N images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of noisy methods (default 0)")
    parser.add_argument("--target", choices=("gt", "pred"), default="gt", help="class explained: label or prediction")
    parser.add_argument("--batch-size", type=int, default=64, help="images per saliency batch and per forward")
    parser.add_argument("--step", type=int, help="insertion/deletion pixels per step (default: the image width)")
    parser.add_argument("--target-layer", help="CAM target layer (default: the model's last convolutional stage)")
    parser.add_argument("--ci", choices=("normal", "bootstrap"), default="normal", help="95%% interval method")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the top-1 accuracy over the whole split")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the reports, print the table."""
    from ..evaluate import compare_table, evaluate_checkpoint, write_comparison, write_report

    kwargs = dict(
        split=args.split,
        device=args.device,
        methods=args.methods,
        metrics=args.metrics,
        limit=args.limit,
        seed=args.seed,
        target=args.target,
        batch_size=args.batch_size,
        step=args.step,
        target_layer=args.target_layer,
        ci=args.ci,
        accuracy=not args.no_accuracy,
        progress=not args.no_progress,
    )
    if args.compare:
        baseline, ours = (evaluate_checkpoint(path, args.data, **kwargs) for path in args.compare)
        paths = write_comparison(baseline, ours, args.out)
        print(compare_table(baseline, ours))
        print(f"wrote {paths['compare.md']} and {args.out}/baseline, {args.out}/ours")
        return 0
    results = evaluate_checkpoint(args.checkpoint, args.data, **kwargs)
    paths = write_report(results, args.out)
    print(paths["md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
