"""Reproduce the paper's experiment (docs/method.md §The reproduction table): for each network, train the baseline (λ =
0) and the
regularised model, evaluate every saliency method with every metric on the same seeded test subset,
and write OUT/report.md (the side-by-side tables, accuracy, mean cos(δx, δᴳx), commands, config,
machine, wall time), OUT/results.json, the insertion/deletion curves and the qualitative figure.
A second call reuses finished runs and evaluations; an interrupted run resumes.

presets: paper (the paper-scale recipe, 200 epochs, full width: a GPU), cpu (one network in about 1.5 to 2
hours on 2 cores with native bf16, AVX512-BF16 or AMX; without them --no-amp, float32, about 5.5-6 hours
for MobileNet-V2: an interrupted call resumes from the run folders under OUT; a third model fine-tunes the
baseline with L_R),
demo (a few minutes). --ablation
trains λ in {0, 7.5e-4, 7.5e-3, 7.5e-2, 0.75} × the error functions at the preset's small budget and
reports validation accuracy, cos and Grad-CAM's metrics (OUT/ablation/).

examples:
  igrad reproduce --preset cpu --data $IGRAD_DATA --out results/cpu --threads 1
  igrad reproduce --preset cpu --data $IGRAD_DATA --out results/cpu --ablation
  igrad reproduce --preset paper --data cifar100 --download --out results/paper --networks cifar_resnet18
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..data import data_root_from_env
from ..errors import IgradError
from ..validate import positive_int

HELP = "the paper's experiment end to end: train, evaluate, report (presets paper, cpu, demo)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``igrad reproduce``."""
    from ..reproduce import EXPERIMENTS, NETWORKS

    p.add_argument("--preset", choices=list(EXPERIMENTS), default="demo", help="budget (default demo)")
    p.add_argument("--data", default=None, help="image folder or cifar100 (default: $IGRAD_DATA)")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-100")
    p.add_argument("--out", required=True, help="report folder (runs, evaluations, report.md, results.json)")
    p.add_argument(
        "--runs",
        help="root of the run folders, RUNS/<network>/<model> (default OUT/runs): keep long runs outside a "
        "checkout that may be replaced (e.g. ~/igrad-work/runs), and give the same RUNS to resume them",
    )
    p.add_argument("--networks", nargs="+", metavar="NAME", help=f"networks (default: {' '.join(NETWORKS)})")
    p.add_argument("--lam", type=float, help="λ of the regularised model (default: the preset's, igrad.DEFAULT_LAMBDA)")
    p.add_argument(
        "--no-finetuned",
        action="store_true",
        help="skip the preset's third model (the baseline fine-tuned with L_R; preset cpu)",
    )
    p.add_argument("--ablation", action="store_true", help="run the λ × error ablation instead (OUT/ablation/)")
    p.add_argument("--limit", type=int, help="evaluated test images (default: the preset's)")
    p.add_argument(
        "--epochs", type=int, help="training epochs of the baseline and regularised models (default: the preset's)"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (e.g. 1 on a busy machine)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train each network's models side by side in this many processes (2 on a 2-core CPU, with "
        "--threads 1): a fine-tuned model starts when its baseline has finished, and each model is evaluated "
        "in a free process as soon as it is trained",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast in training and evaluation (default: the preset's; cpu: on, demo: where the device "
        "has native bf16). --no-amp on a CPU without AVX512-BF16/AMX, where bf16 is emulated and far slower; "
        "a report may hold networks made at different precisions (each network's section says which)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")


def run(args: argparse.Namespace) -> int:
    """Run the reproduction (or the ablation) and print where the report is."""
    import torch

    from ..report import terminal_summary
    from ..reproduce import ablation, reproduce

    data = args.data or (os.fspath(p) if (p := data_root_from_env()) else None)
    if data is None:
        raise IgradError("no data: pass --data FOLDER, set IGRAD_DATA, or use --data cifar100 --download")
    train: dict[str, object] = {}
    if args.download:
        train["download"] = True
    if args.epochs is not None:
        train["epochs"] = args.epochs
    if args.threads is not None:
        train["threads"] = positive_int("--threads", args.threads)
        torch.set_num_threads(args.threads)  # evaluation runs in this process (with --jobs 1)
    evaluation: dict[str, object] = {"limit": args.limit} if args.limit is not None else {}
    if args.amp is not None:
        train["amp"] = evaluation["amp"] = args.amp
    command = "igrad " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["reproduce"] else None
    common = dict(
        networks=args.networks,
        train=train,
        evaluation=evaluation,
        device=args.device,
        quiet=args.quiet,
        progress=not args.quiet,
        command=command,
    )
    if args.ablation:
        report = ablation(args.preset, data, args.out, **common)
        print(f"wrote {args.out}/ablation/report.md and results.json")
        for net, entry in report["networks"].items():
            print(f"{net}: chosen on the validation split: {entry['chosen']}")
        return 0
    jobs = positive_int("--jobs", args.jobs)
    finetuned: dict[str, object] | None = {} if args.no_finetuned else None
    report = reproduce(
        args.preset, data, args.out, lam=args.lam, finetuned=finetuned, jobs=jobs, runs=args.runs, **common
    )
    print(terminal_summary(report, Path(args.out)))
    print(f"wrote {args.out}/report.md and results.json ({report['wall_time_s'] / 60:.1f} min)")
    return 0
