"""Train a network with the interpretable-gradient loss L = L_C + lam * L_R (docs/method.md §The loss, §Networks and
recipes).

The defaults are the paper-scale recipe (--preset paper); --preset cpu is the reduced budget for
machines without a GPU. Every config field is a flag; precedence: preset < --config FILE.toml < flags.
A run folder (--out) receives config.toml, metrics.jsonl, run.json, last.pt and best.pt.

examples:
  igrad train --preset cpu --data /path/to/cifar100 --lam 0 --out runs/r18-baseline
  igrad train --preset cpu --data /path/to/cifar100 --lam 0.75 --val-fraction 0.1
  igrad train --config runs/r18-baseline/config.toml --seed 1 --out runs/r18-seed1
  igrad train --preset cpu --data /path/to/cifar100 --init runs/r18-baseline/last.pt --epochs 3 --lam 0.75
                                            (fine-tune a trained model with L_R: fresh optimiser and schedule)
  igrad train --preset cpu --data /path/to/cifar100 --lam 2.5 --lam-warmup 3   (λ ramps from 0 over 3 epochs)
  igrad train --resume runs/r18-baseline            (continue a killed run; --epochs N extends it)
  torchrun --nproc_per_node=2 -m igrad train --preset cpu --data ...   (DDP: gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing

from ..checkpoint import load_checkpoint
from ..errors import IgradError
from ..loss import ERRORS
from ..rules import STATS_MODES
from ..train import (
    NORMALIZATION_CHOICES,
    PRESETS,
    RESUME_OVERRIDES,
    SCHEDULES,
    TrainConfig,
    config_from_toml,
    fit,
    saved_config,
)
from .config_flags import add_config_flags, config_values

HELP = "train a network with the interpretable-gradient loss (presets, checkpoints, resume, DDP)"

_CHOICES: dict[str, typing.Iterable[str]] = {
    "preset": PRESETS,
    "error": ERRORS,
    "stats": STATS_MODES,
    "schedule": SCHEDULES,
    "normalization": NORMALIZATION_CHOICES,
}
_METAVARS = {"data": "CIFAR|FOLDER", "out": "RUN_DIR", "model": "NAME", "init": "CKPT", "lam_warmup": "EPOCHS"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags: --config, --resume, --quiet, and one per :class:`igrad.train.TrainConfig` field."""
    parser.add_argument("--config", metavar="FILE.toml", help="read config fields from a TOML file")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR|CKPT",
        help=f"continue a run from its last.pt, in that folder (only {', '.join(sorted(RESUME_OVERRIDES))} "
        "may be changed)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group("config fields (defaults: the preset's)")
    add_config_flags(group, TrainConfig, choices=_CHOICES, metavars=_METAVARS, typed=False, note=_preset_values)


def _preset_values(f: dataclasses.Field[typing.Any]) -> str:
    """``(paper: X; cpu: Y)``: a field's value in each preset (none for booleans and ``preset`` itself)."""
    default = getattr(TrainConfig(), f.name)
    if isinstance(default, bool) or f.name == "preset":
        return ""
    values = {"paper": default} | {n: p[f.name] for n, p in PRESETS.items() if f.name in p}
    shown = "; ".join(f"{n}: {_show(v)}" for n, v in values.items() if v not in (None, "", []))
    return f"({shown})" if shown else ""


def _show(value: typing.Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def run(args: argparse.Namespace) -> int:
    """Build the config (or reload it with --resume), train, print the final summary."""
    given = config_values(args, TrainConfig)
    if args.resume:
        if args.config:
            raise IgradError("--resume continues a run with its saved config; do not pass --config with it")
        config = None
        if given:
            path = args.resume
            state = load_checkpoint(os.path.join(path, "last.pt") if os.path.isdir(path) else path)
            config = TrainConfig.from_dict({**saved_config(state).to_dict(), **given})
            del state
        result = fit(config, resume=args.resume, quiet=args.quiet)
    else:
        from_file = config_from_toml(args.config) if args.config else {}
        preset = given.get("preset") or from_file.get("preset") or "paper"
        config = TrainConfig.preset_config(str(preset), **{**from_file, **given})
        result = fit(config, quiet=args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        final = result.final
        cos = f", cos {final['cos']:.3f}" if final.get("cos") is not None else ""
        print(
            f"done: {len(result.history)} epochs, test accuracy {100 * result.test_acc:.2f}%{cos}; "
            f"best {json.dumps(result.best)}; files in {result.run_dir}"
        )
    return 0
