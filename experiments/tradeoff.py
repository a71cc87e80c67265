"""The accuracy / interpretability trade-off study: a resumable runner.

Every run trains with ``igrad train``'s library (:func:`igrad.train.fit_or_resume`, preset ``--preset``,
default ``cpu``) on real CIFAR-100 with a 10 % validation split held out of the training set (seeded,
stratified; the study chooses on it, never on the test set). Groups:

* ``baseline``: the preset's full budget at λ = 0 (the trained model the fine-tuning runs start from);
* ``scratch``: from scratch for ``--epochs`` (default: a third of the preset's), λ ∈ ``--lams`` (0 is
  their baseline);
* ``warmup``: from scratch, λ ∈ ``--warmup-lams`` with ``--lam-warmup`` epochs of λ warm-up;
* ``finetune``: from the ``baseline`` run's final weights (``--init``: fresh optimiser and schedule) for
  ``--ft-epochs`` at ``--ft-lr``, λ ∈ ``--ft-lams`` (λ = 0 is the control, the same steps), and at
  ``--ft-lr2`` for λ ∈ ``--ft-lr2-lams``;
* ``width``: from scratch for ``--width-epochs`` at the widths ``--widths``, λ ∈ ``--width-lams``;
* ``score``: from scratch like ``scratch``, λ ∈ ``--score-lams``, with the regulariser's gradients taken of
  the softmax probability instead of the logit (``reg_score=prob``; docs/method.md §The loss uses the logit), each
  beside its
  logit twin (``score-logit-lam<λ>``: the same run with the logit). The pair is trained by the same call, so
  the ablation stays paired when ``--set`` changes the precision or the machine differs from the ``scratch``
  group's (with no ``--set`` the twin repeats ``scratch-lam<λ>``).

After a run finishes, its small results go to ``RESULTS/<run>.json`` (atomically, with provenance): final
and best validation accuracy, eval-mode mean cos(δx, δᴳx) on the validation split, test accuracy (recorded,
not used for choices), and :func:`igrad.evaluate.evaluate_model` on the same validation images as the cos
(the seeded subset of ``--eval-images``, 500): Grad-CAM and gradient saliency with every metric (AD, AG,
AI, insertion, deletion), the subset's cos and accuracy. A run whose results file exists is skipped (a
file written with another config is refused); a run killed mid-training resumes from its ``last.pt``.
Run folders go to ``--runs``.

    IGRAD_DATA=/path/to/cifar100 python experiments/tradeoff.py --results results/tradeoff
    python experiments/tradeoff.py --smoke        (the whole pipeline on generated images, < 1 minute)

``--set FIELD=VALUE`` (repeatable) overrides any :class:`igrad.train.TrainConfig` field of every run
(e.g. ``--set device=cuda --set amp=false``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from igrad.atomic import atomic_write_json
from igrad.data import data_root_from_env, match_classes
from igrad.evaluate import EvalConfig, evaluate_model
from igrad.provenance import provenance
from igrad.train import RunResult, TrainConfig, fit_or_resume, prepare_data


@dataclass(frozen=True)
class Run:
    """One training run of the study: its name (the results file's), group and config."""

    name: str
    group: str
    config: TrainConfig


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="CIFAR-100 image folder (default: $IGRAD_DATA)")
    ap.add_argument("--preset", default="cpu", help="training preset of every run")
    ap.add_argument("--model", default="cifar_resnet18")
    ap.add_argument("--width", type=float, default=None, help="width of the study's runs (default: the preset's)")
    ap.add_argument(
        "--epochs", type=int, default=None, help="epochs of the runs from scratch (default: a third of the preset's)"
    )
    ap.add_argument("--steps-per-epoch", type=int, default=0, help="cap on the steps of an epoch (0: full epochs)")
    ap.add_argument("--lams", type=_floats, default=[0, 0.025, 0.075, 0.25, 0.75, 2.5])
    ap.add_argument("--warmup-lams", type=_floats, default=[0.75, 2.5])
    ap.add_argument("--lam-warmup", type=float, default=3.0, help="λ warm-up epochs of the warmup group")
    ap.add_argument("--ft-lams", type=_floats, default=[0, 0.25, 0.75, 2.5, 7.5])
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--ft-lr", type=float, default=0.01, help="peak learning rate of the fine-tuning runs")
    ap.add_argument("--ft-lr2", type=float, default=0.001, help="a second fine-tuning learning rate")
    ap.add_argument("--ft-lr2-lams", type=_floats, default=[0, 2.5], help="λ values fine-tuned at --ft-lr2")
    ap.add_argument("--widths", type=_floats, default=[0.25, 0.5, 1.0])
    ap.add_argument("--width-lams", type=_floats, default=[0, 0.75])
    ap.add_argument("--width-epochs", type=int, default=3, help="epochs of the width group")
    ap.add_argument(
        "--score-lams", type=_floats, default=[0.075], help="λ of the probability-score ablation (the chosen λ)"
    )
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--eval-images", type=int, default=500, help="validation images of the cos and the metrics")
    ap.add_argument("--methods", default="gradcam,gradient", help="saliency methods evaluated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="TrainConfig override")
    ap.add_argument("--runs", default="runs/tradeoff", help="folder of the run folders")
    ap.add_argument("--results", default="results/tradeoff", help="folder of the results files")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated groups or run names to run (default: all): two processes, one core each, can "
        "share a group by name",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny budget on generated images (checks the pipeline)")
    args = ap.parse_args(argv)
    if args.smoke:
        _smoke_settings(args)
    return args


def _smoke_settings(args: argparse.Namespace) -> None:
    """A tiny budget on a generated 10-class image folder, one or two values per group."""
    root = Path(args.runs if args.runs != "runs/tradeoff" else "runs/tradeoff-smoke")
    args.runs = str(root)
    args.results = str(root / "results") if args.results == "results/tradeoff" else args.results
    args.data = str(write_smoke_data(root / "data"))
    args.width, args.epochs, args.steps_per_epoch, args.ft_epochs, args.width_epochs = 0.125, 1, 2, 1, 1
    args.set = ["epochs=2", *args.set]  # the baseline group's (the preset's) budget
    args.lams, args.warmup_lams, args.ft_lams, args.ft_lr2_lams = [0, 0.75], [2.5], [0, 2.5], [2.5]
    args.widths, args.width_lams, args.eval_images, args.score_lams = [0.25], [0.75], 40, [0.75]
    args.set = ["batch_size=32", "eval_batch_size=200", *args.set]


def write_smoke_data(root: Path, n_train: int = 40, n_test: int = 10, size: int = 32) -> Path:
    """A learnable 10-class image folder (class c brightens channel c % 3 in one of 4 image quadrants)."""
    if (root / "test").is_dir():
        return root
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
                q, h = c % 4, size // 2
                img[(q // 2) * h : (q // 2 + 1) * h, (q % 2) * h : (q % 2 + 1) * h, c % 3] += 120
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def plan(args: argparse.Namespace) -> list[Run]:
    """The study's runs, the full-budget baseline first (the fine-tuning runs start from it)."""
    overrides = dict(item.split("=", 1) for item in args.set)
    common: dict[str, Any] = {
        "model": args.model,
        "data": str(args.data),
        "val_fraction": args.val_fraction,
        "cos_samples": args.eval_images,
        "steps_per_epoch": args.steps_per_epoch,
        "seed": args.seed,
        **({"width": args.width} if args.width is not None else {}),
        **overrides,
    }
    preset = TrainConfig.preset_config(args.preset, **common)
    epochs = args.epochs if args.epochs is not None else max(1, round(preset.epochs / 3))

    def run(name: str, group: str, **kw: Any) -> Run:
        values = {**common, **kw, "out": str(Path(args.runs) / name)}
        return Run(name, group, TrainConfig.preset_config(args.preset, **values))

    baseline = run("baseline-lam0", "baseline", lam=0.0)
    runs = [baseline]
    runs += [run(f"scratch-lam{lam:g}", "scratch", lam=lam, epochs=epochs) for lam in [0.0, *args.lams]]
    runs += [
        run(f"warmup-lam{lam:g}-warm{args.lam_warmup:g}", "warmup", lam=lam, lam_warmup=args.lam_warmup, epochs=epochs)
        for lam in args.warmup_lams
    ]
    init = str(Path(baseline.config.out) / "last.pt")  # its final weights
    for lr, lams in ((args.ft_lr, args.ft_lams), (args.ft_lr2, args.ft_lr2_lams)):
        suffix = "" if lr == args.ft_lr else f"-lr{lr:g}"
        ft = {"init": init, "epochs": args.ft_epochs, "lr": lr}
        runs += [run(f"ft-lam{lam:g}{suffix}", "finetune", lam=lam, **ft) for lam in lams]
    runs += [
        run(f"width{w:g}-lam{lam:g}", "width", lam=lam, width=w, epochs=args.width_epochs)
        for w in args.widths
        for lam in args.width_lams
    ]
    runs += [
        run(f"score-{score}-lam{lam:g}", "score", lam=lam, reg_score=score, epochs=epochs)
        for lam in args.score_lams
        for score in ("logit", "prob")
    ]
    unique = {r.name: r for r in runs}
    only = {g for g in args.only.split(",") if g}
    if "finetune" in only:
        only.add("baseline")  # the fine-tuning runs start from it
    return [r for r in unique.values() if not only or r.group in only or r.name in only]


def evaluate_run(result: RunResult, config: TrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Saliency metrics, cos and accuracy on the seeded validation subset the trainer's ``val_cos`` uses
    (:func:`igrad.evaluate.evaluate_model`'s result, per-image values included)."""
    data = prepare_data(config)
    if data.val is None:
        raise SystemExit("the study needs a validation split (--val-fraction > 0)")
    val = match_classes(data.val, result.config["classes"], int(result.config["num_classes"]), source="validation")
    settings = EvalConfig(
        methods=args.methods,
        metrics="all",
        limit=min(args.eval_images, len(val)),
        seed=config.split_seed,  # the cos subset's seed: the same images (igrad.data.cos_subset)
        accuracy=False,
    )
    # the whole evaluation (per-image values and indices included: the report's paired intervals need them)
    return evaluate_model(
        result.model, val, settings, normalization=data.normalization, config=result.config, progress=False
    )


def run_one(run: Run, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Train (or resume, or reuse) one run, evaluate it, write its results file."""
    started = time.time()
    result = fit_or_resume(run.config, quiet=True)
    train_s = time.time() - started
    final = result.final
    row = {
        "run": run.name,
        "group": run.group,
        "recipe": run.config.preset,
        "val_acc": final.get("val_acc"),
        "val_cos": final.get("val_cos"),
        "best": result.best,
        "test_acc": final.get("test_acc"),
        "test_cos": final.get("cos"),
        "epochs": len(result.history),
        "evaluation": evaluate_run(result, run.config, args),
        "wall_s": {"train": round(train_s, 1), "total": round(time.time() - started, 1)},
        "run_dir": str(result.run_dir),
        "init_sha256": result.config.get("init_sha256"),
        "config": run.config.to_dict(),
        "sessions": result.sessions,  # each process that trained it, with the commit of its code
        "smoke": bool(args.smoke),
        "provenance": provenance(result.config, run.config.seed),
    }
    atomic_write_json(path, row)
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.data = args.data or data_root_from_env()
    if args.data is None:
        raise SystemExit("set IGRAD_DATA or --data to the CIFAR-100 image folder")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for run in plan(args):
        path = results / f"{run.name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("config") != run.config.to_dict():
                raise SystemExit(f"{path} holds a run with another config; move it away or choose --results")
            print(f"{run.name:28s} done earlier ({path})", flush=True)
            continue
        row = run_one(run, args, path)
        ev = row["evaluation"]
        gc = ev["results"].get("gradcam", {})
        print(
            f"{run.name:28s} val acc {row['val_acc']:7.2%}  val cos {row['val_cos']:6.3f} "
            f"(eval {ev['model']['cos']['mean']:6.3f})  gradcam AD {gc.get('ad', {}).get('mean', float('nan')):6.2f}  "
            f"{row['wall_s']['total']:7.1f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
