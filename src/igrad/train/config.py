"""The config of a training run: :class:`TrainConfig` (every choice, with the paper recipe's defaults),
the presets, checking and coercion of plain values (TOML, JSON, CLI strings), and TOML files.

A run's ``config.toml`` holds the effective config (reload it with ``igrad train --config``); a
checkpoint holds it as a plain dict (:func:`saved_config` reads it back).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import TrainData, load_train_data
from ..errors import IgradError, unknown_name
from ..gradients import SCORES
from ..images import MAX_PIXELS
from ..loss import DEFAULT_LAMBDA, DEFAULT_STATS, ERRORS
from ..models import model_info
from ..normalization import NORMALIZATIONS, Normalization
from ..rules import STATS_MODES

__all__ = [
    "TrainConfig",
    "PRESETS",
    "SCHEDULES",
    "RESUME_OVERRIDES",
    "RESOURCE_FIELDS",
    "NORMALIZATION_CHOICES",
    "config_from_toml",
    "config_to_toml",
    "saved_config",
    "prepare_data",
]

#: Learning-rate schedules (after a linear warm-up of ``warmup_epochs``).
SCHEDULES = ("multistep", "cosine", "constant")

#: Values of ``normalization``: a named one (:data:`igrad.normalization.NORMALIZATIONS`) or ``data``
#: (computed from the training split).
NORMALIZATION_CHOICES = (*NORMALIZATIONS, "data")

#: Config fields that may differ from the saved config when resuming a run.
RESUME_OVERRIDES = frozenset(
    {
        "epochs",
        "device",
        "threads",
        "checkpoint_every",
        "data",
        "download",
        "data_root",
        "eval_batch_size",
        "max_pixels",
        "out",
    }
)
#: Config fields that say where and how fast a run goes, not what it computes (device, thread count,
#: checkpoint interval, evaluation batch, download, data root, the image files' pixel limit): the resume
#: overrides but the budget (``epochs``) and the run's own paths (``data``, ``out``), which callers compare
#: in their own way.
RESOURCE_FIELDS = RESUME_OVERRIDES - {"epochs", "data", "out"}


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every choice of a training run. Defaults are the paper-scale recipe (docs/method.md §Networks and recipes,
    preset ``paper``);
    :meth:`preset` gives the reduced-budget ``cpu`` one. Lists are written comma-separated on the CLI."""

    preset: str = _f("paper", "recipe the defaults come from (paper: the paper-scale recipe; cpu: reduced budget)")
    # what to train
    model: str = _f("cifar_resnet18", "network: a registered name or tv:<torchvision name>")
    width: float | None = _f(None, "width multiplier of the CIFAR networks (default: the model's, 1.0)")
    weights: str | None = _f(None, "torchvision weights for tv: models (e.g. DEFAULT; needs internet)")
    init: str | None = _f(
        None,
        "fine-tune: start from the weights of this igrad checkpoint (same model, width and classes), with a "
        "fresh optimiser and schedule (torchvision's pretrained weights: --weights)",
    )
    data: str = _f("cifar100", "cifar10, cifar100 (torchvision) or an image folder with train/ and test/ (or val/)")
    data_root: str | None = _f(None, "where torchvision keeps cifar10/cifar100 (default: the igrad cache)")
    download: bool = _f(False, "let torchvision download cifar10/cifar100")
    val_fraction: float = _f(0.0, "hold out this fraction of the training set (per class, seeded) as validation")
    split_seed: int = _f(0, "seed of the validation split and of the fixed cos subset")
    max_pixels: int = _f(
        MAX_PIXELS, "refuse an image file whose header declares more pixels than this (checked before decoding)"
    )
    normalization: str = _f(
        "cifar100",
        "normalisation of an image folder: cifar100 (docs/method.md), cifar10, imagenet, or data (computed from its "
        "training split); --data cifar10/cifar100 always use their own",
    )
    mean: list[float] | None = _f(None, "normalisation mean per channel (overrides --normalization; with --std)")
    std: list[float] | None = _f(None, "normalisation std per channel (overrides --normalization; with --mean)")
    # the loss
    lam: float = _f(DEFAULT_LAMBDA, "weight λ of the regulariser L_R (0: standard training, L_R not computed)")
    lam_warmup: float = _f(0.0, "λ warm-up in epochs: λ ramps linearly from 0 at the first step (0: none)")
    error: str = _f("cosine", "error function E of L_R")
    stats: str = _f(DEFAULT_STATS, "BatchNorm statistics of the regulariser's gradient passes")
    allow: list[str] = _f([], "non-linearities without a guided rule to let through (e.g. silu)")
    reg_score: str = _f(
        "logit",
        "what L_R's gradients are taken of: logit (docs/method.md) or prob (its softmax probability, an ablation)",
    )
    reg_fraction: float = _f(
        1.0, "fraction ρ of each batch L_R is computed on (L_C on the whole batch; docs/method.md)"
    )
    # optimisation
    epochs: int = _f(200, "number of epochs")
    batch_size: int = _f(128, "global batch size (split between the processes)")
    lr: float = _f(0.1, "peak learning rate of SGD")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "SGD weight decay")
    nesterov: bool = _f(False, "Nesterov momentum")
    label_smoothing: float = _f(
        0.0, "label smoothing ε of L_C: the target puts 1 - ε on the class and ε spread evenly over all (0: none)"
    )
    schedule: str = _f("multistep", "learning-rate schedule after the warm-up")
    milestones: list[int] = _f([60, 120, 160], "epochs at which multistep multiplies the rate by gamma")
    gamma: float = _f(0.2, "multistep factor")
    warmup_epochs: float = _f(1.0, "linear warm-up length in epochs (per step)")
    steps_per_epoch: int = _f(0, "cap on the steps of an epoch (0: one full pass over the training set)")
    # augmentation (docs/method.md §Networks and recipes)
    crop_padding: int = _f(4, "RandomCrop padding (0: no crop)")
    flip: bool = _f(True, "random horizontal flip")
    rotation: float = _f(15.0, "RandomRotation range in degrees (0: none)")
    # evaluation
    eval_batch_size: int = _f(500, "batch size of evaluation")
    cos_samples: int = _f(500, "test images (a fixed seeded subset) for the mean cos(δx, δᴳx) diagnostic; 0: off")
    # runtime
    seed: int = _f(0, "seed of initialisation, data order, augmentation and dropout")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    amp: bool = _f(False, "bf16 autocast (CPU: native with AVX512-BF16/AMX, else warned slow; CUDA: Ampere+)")
    channels_last: bool = _f(False, "channels-last memory layout for the model and its inputs")
    threads: int = _f(0, "torch CPU threads per process (0: torch's default)")
    checkpoint_every: int = _f(0, "also write last.pt every this many steps (0: only at the end of each epoch)")
    out: str = _f("", "run folder (default: runs/<model>-lam<λ>-seed<seed>)")

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> TrainConfig:
        """The config of preset ``name`` (see :data:`PRESETS`) with ``overrides``."""
        if name not in PRESETS:
            raise unknown_name("preset", name, PRESETS)
        return cls.from_dict({**PRESETS[name], "preset": name, **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build a config from plain values (TOML, JSON, CLI), checking names and types. Exactly these
        values over the paper defaults: a ``preset`` key is recorded, not applied (use
        :meth:`preset_config`, as the CLI does)."""
        known = {f.name for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            if name not in known:
                raise unknown_name("config field", name, known)
            kwargs[name] = _coerce(name, value, hints[name])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready values (lists copied)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` (checked like :meth:`from_dict`)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`igrad.create_model` besides ``num_classes``."""
        kw: dict[str, Any] = {}
        if self.width is not None:
            kw["width"] = self.width
        if self.weights is not None:
            kw["weights"] = self.weights
        return kw

    def validate(self) -> None:
        """Raise :class:`IgradError` for values no run can use (before anything is loaded or written)."""
        if self.preset not in PRESETS:
            raise unknown_name("preset", self.preset, PRESETS)
        if self.error not in ERRORS:
            raise unknown_name("error function", self.error, ERRORS)
        if self.stats not in STATS_MODES:
            raise unknown_name("statistics mode", self.stats, STATS_MODES)
        if self.reg_score not in SCORES:
            raise unknown_name("score", self.reg_score, SCORES)
        if self.schedule not in SCHEDULES:
            raise unknown_name("schedule", self.schedule, SCHEDULES)
        model_info(self.model)  # an unknown model is named as such before anything compares it (e.g. with init)
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (math.isfinite(self.lam) and self.lam >= 0, "lam must be a finite number >= 0"),
            (math.isfinite(self.lam_warmup) and self.lam_warmup >= 0, "lam_warmup must be a finite number >= 0"),
            (math.isfinite(self.lr) and self.lr > 0, "lr must be a finite number > 0"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.gamma > 0, "gamma must be > 0"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.max_pixels >= 1, "max_pixels must be >= 1"),
            (self.steps_per_epoch >= 0, "steps_per_epoch must be >= 0"),
            (self.crop_padding >= 0, "crop_padding must be >= 0"),
            (0 <= self.rotation <= 180, "rotation must be in [0, 180] degrees"),
            (self.cos_samples >= 0, "cos_samples must be >= 0"),
            (0 < self.reg_fraction <= 1, "reg_fraction must be in (0, 1]"),
            (self.threads >= 0, "threads must be >= 0"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.width is None or self.width > 0, "width must be > 0"),
            (all(m >= 0 for m in self.milestones), "milestones must be epochs >= 0"),
            (not (self.nesterov and self.momentum == 0), "nesterov needs momentum > 0"),
            ((self.mean is None) == (self.std is None), "give both mean and std, or neither"),
        ]
        for ok, message in checks:
            if not ok:
                raise IgradError(f"bad config: {message}")
        if self.normalization not in NORMALIZATION_CHOICES:
            raise unknown_name("normalization", self.normalization, NORMALIZATION_CHOICES)
        if self.mean is not None and self.std is not None:
            try:
                Normalization.of(self.mean, self.std)
            except IgradError as exc:
                raise IgradError(f"bad config: {exc}") from exc
        if self.reg_fraction < 1 and self.stats == "coupled":
            raise IgradError("bad config: reg_fraction < 1 needs stats batch-frozen or running (not coupled)")
        self._validate_init()

    def _validate_init(self) -> None:
        """``init`` names an igrad checkpoint; torchvision's pretrained weights are ``weights``."""
        if self.init is None:
            return
        if self.init == "" or self.init == "tv" or self.init.startswith("tv:"):
            raise IgradError(
                f"bad config: init {self.init!r} is not a checkpoint path; --init takes an igrad checkpoint "
                "(e.g. runs/NAME/last.pt). To start a tv: model from torchvision's pretrained weights use "
                "--weights DEFAULT (downloaded by torchvision)"
            )
        if self.weights is not None:
            raise IgradError(
                f"bad config: init ({self.init}) and weights ({self.weights}) both set the starting weights; give one"
            )


#: Presets: overrides of the :class:`TrainConfig` defaults. ``paper`` is the paper-scale recipe (docs/method.md
#: §Networks and recipes);
#: ``cpu`` the reduced budget for machines without an accelerator: the same optimiser (SGD 0.1,
#: momentum 0.9, weight decay 5e-4, batch 128), augmentation and one-epoch warm-up, then 24 epochs of a
#: cosine schedule (the schedule that gets most out of a short budget), label smoothing 0.1 (the usual
#: short-schedule CIFAR aid: about a point of top-1, it touches only L_C), networks at 1/2 width (1/4 width
#: stalled near 45 % in 6 epochs; 1/2 width is 2.7x the step cost and the capacity a 60 % ResNet-18 needs),
#: bf16 autocast + channels-last (the regularised step 2.2x (ResNet-18) and 3.5x (MobileNet-V2) faster
#: than float32 on an AVX512-BF16 CPU; ``--no-amp`` where the CPU has no bf16 units) and the regulariser on
#: a quarter of each batch (ρ = 0.25 kept the alignment of ρ = 1 on real CIFAR-100: eval cos 0.88 vs 0.84;
#: results/fraction_bf16.json). One thread per run (AVX512-BF16 CPU), ResNet-18 takes about 52 (λ = 0) and
#: 78 (λ > 0) minutes; MobileNet-V2 52 minutes for λ = 0 (measured, results/preset/) and, from step times,
#: 55-90 for λ > 0 (its ρ = 0.25 step costs about what its plain step does: results/recipe_steps.md).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {
        "epochs": 24,
        "schedule": "cosine",
        "label_smoothing": 0.1,
        "width": 0.5,
        "amp": True,
        "channels_last": True,
        "reg_fraction": 0.25,
    },
}


# --- config files -------------------------------------------------------------------------------------


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field type ``hint`` (``float`` accepts integers)."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise IgradError(f"config field {name!r} must be a list, got {value!r}")
        return [_coerce(name, v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif hint is int:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise IgradError(f"config field {name!r} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def config_to_toml(config: TrainConfig | Mapping[str, Any], header: str = "") -> str:
    """TOML text of a config (fields set to ``None`` are left out: they mean "the default")."""
    values = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def config_from_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The values of a TOML config file (checked by :meth:`TrainConfig.from_dict` when used)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError as exc:
        raise IgradError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise IgradError(f"config file {path} is not valid TOML: {exc}") from exc
    nested = [k for k, v in values.items() if isinstance(v, dict)]
    if nested:
        raise IgradError(f"config file {path}: tables are not used, put the keys at the top level ({nested[0]!r})")
    return values


def saved_config(state: Mapping[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` saved in a checkpoint (the extra keys of its config dict left out)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in state["config"].items() if k in names})


def prepare_data(config: TrainConfig) -> TrainData:
    """The splits of ``config.data`` (:func:`igrad.data.load_train_data`): training, test and, with
    ``val_fraction > 0``, the validation split held out of the training set with ``split_seed``;
    normalised with ``mean``/``std`` when given, else by ``normalization``."""
    explicit = Normalization.of(config.mean, config.std) if config.mean is not None and config.std is not None else None
    return load_train_data(
        config.data,
        root=config.data_root,
        download=config.download,
        val_fraction=config.val_fraction,
        split_seed=config.split_seed,
        normalization=explicit if explicit is not None else config.normalization,
        max_pixels=config.max_pixels,
    )
