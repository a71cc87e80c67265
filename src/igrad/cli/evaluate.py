"""Measure saliency methods on a trained checkpoint with the metrics of docs/method.md §Metrics (AD, AG, AI, insertion,
deletion), on a fixed seeded subset of the test split, and write results.json, results.csv,
results.md and curves.png into --out. With --compare BASELINE REGULARISED, both checkpoints are
evaluated on the same images and compare.md puts them side by side (docs/method.md §The reproduction table), the better
value of each
cell in bold. Every evaluation setting (igrad.evaluate.EvalConfig) is a flag. Finished chunks are kept
in OUT/.partial/ until the end: a killed evaluation started again with the same arguments continues
where it stopped.

examples:
  igrad evaluate --checkpoint runs/r18/last.pt --data $IGRAD_DATA --limit 1000 --out eval/r18
  igrad evaluate --compare runs/base/last.pt runs/reg/last.pt --methods gradcam,gradient --out eval/cmp
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..images import MAX_PIXELS
from ..validate import positive_int
from .config_flags import add_config_flags, config_values

HELP = "evaluate saliency methods with AD/AG/AI/insertion/deletion and write the tables"


def _choices() -> dict[str, tuple[str, ...]]:
    from ..evaluate import CIS, TARGET_SOURCES
    from ..metrics import SCORES, SUBSTRATES

    return {
        "target": TARGET_SOURCES,
        "ci": CIS,
        "insertion_substrate": tuple(SUBSTRATES),
        "deletion_substrate": tuple(SUBSTRATES),
        "score": tuple(SCORES),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``igrad evaluate``: what to evaluate, --out, and one flag per
    :class:`igrad.evaluate.EvalConfig` field (its default and help)."""
    from ..evaluate import EvalConfig

    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="checkpoint to evaluate (e.g. RUN/last.pt)")
    which.add_argument(
        "--compare", nargs=2, type=Path, metavar=("BASELINE", "REGULARISED"), help="two checkpoints side by side"
    )
    parser.add_argument(
        "--data", help="image-folder root (train/, test/) or cifar10/cifar100; default: the checkpoint's data"
    )
    parser.add_argument("--split", default="test", choices=("test", "val", "train"), help="data split (default test)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        metavar="N",
        help="refuse an image file of a data folder whose header declares more than N pixels, before decoding "
        f"it (default {MAX_PIXELS:,})",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    add_config_flags(parser.add_argument_group("evaluation settings"), EvalConfig, choices=_choices())


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the reports, print the table."""
    from ..evaluate import EvalConfig, evaluate_checkpoint
    from ..report import LABELS, compare_table, write_comparison, write_report

    settings = EvalConfig.from_dict(config_values(args, EvalConfig))
    common = dict(
        split=args.split,
        progress=not args.no_progress,
        resume_dir=args.out / ".partial",
        max_pixels=positive_int("--max-pixels", args.max_pixels),
    )
    if args.compare:
        baseline, regularised = (evaluate_checkpoint(path, args.data, settings, **common) for path in args.compare)
        paths = write_comparison(baseline, regularised, args.out, labels=LABELS)
        print(compare_table(baseline, regularised, labels=LABELS))
        print(f"wrote {paths['compare.md']} and {args.out}/{LABELS[0]}, {args.out}/{LABELS[1]}")
        return 0
    results = evaluate_checkpoint(args.checkpoint, args.data, settings, **common)
    paths = write_report(results, args.out)
    print(paths["md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
