"""Training with the interpretable-gradient loss (SPEC 1-2): ``L = L_C + λ L_R``.

One call, :func:`fit`, trains any registered network on CIFAR-10/100 (torchvision) or an image folder
(``train/`` and ``test/`` or ``val/``), held in memory as uint8 tensors (uint16 for 16-bit images;
:func:`igrad.data.load_split`).
Per step, on a global batch ``B`` of training images:

* augmentation, per sample (SPEC 2): ``RandomCrop(H, padding=4)`` (zero fill), horizontal flip with
  probability 1/2, ``RandomRotation(15)`` (nearest, zero fill); then ``x = (raw/255 − mean) / std``;
* ``L_C`` the cross-entropy of the training-mode logits; ``L_R`` from
  :class:`igrad.GradientAlignmentLoss` (not computed at all when ``λ = 0``);
  ``L = L_C + λ L_R``; SGD step; the learning rate follows the schedule per step.

After each epoch: accuracy on the test split (and on the validation split when ``val_fraction > 0``)
and the mean eval-mode ``cos(δx, δᴳx)`` (:func:`igrad.gradient_cosine`, ground-truth class) on a fixed
subset of ``cos_samples`` test images. Files of a run folder (only rank 0 writes, always atomically):

* ``config.toml``: the effective config (reload with ``igrad train --config``);
* ``metrics.jsonl``: one JSON object per epoch (keys in :data:`METRIC_KEYS`);
* ``run.json``: summary, status and provenance;
* ``last.pt`` (every epoch, and every ``checkpoint_every`` steps) and ``best.pt`` (highest validation
  accuracy, or test accuracy without a validation split), in the format of :mod:`igrad.checkpoint`.

Resuming (``fit(config, resume=RUN_DIR)``) restores model, optimiser, scheduler, RNG states and the
position inside the epoch. All randomness of a step (data order, augmentation, dropout) is derived
from ``(seed, epoch, step, rank)``, so a resumed run ends with the same weights as an uninterrupted
one, and two CPU runs of the same config give identical logs (the ``time`` fields aside).
A NaN or infinite loss (or weight) stops the run with :class:`NonFiniteLossError` naming the step,
before that step's update, leaving the last good checkpoint in place.

Several processes: ``torchrun --nproc_per_node=N -m igrad train ...``. Each global batch is split
between the ranks (rank ``r`` takes samples ``r, r+N, ...``; ``batch_size`` is the global batch),
DistributedDataParallel averages the gradients (gloo on CPU, nccl on GPU), BatchNorm running
statistics are broadcast from rank 0 before each evaluation, and evaluation is sharded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .data import Split, eval_tensors, load_split, normalization_for, normalize
from .errors import IgradError, unknown_name
from .gradients import gradient_cosine
from .images import to_unit
from .loss import DEFAULT_LAMBDA, DEFAULT_STATS, ERRORS, GradientAlignmentLoss
from .models import create_model
from .output import model_logits
from .provenance import atomic_write_json, atomic_write_text, provenance
from .rules import STATS_MODES, eval_mode

__all__ = [
    "TrainConfig",
    "PRESETS",
    "SCHEDULES",
    "METRIC_KEYS",
    "RESUME_OVERRIDES",
    "RunResult",
    "TrainData",
    "NonFiniteLossError",
    "fit",
    "prepare_data",
    "augment",
    "evaluate_accuracy",
    "mean_gradient_cosine",
    "fit_or_resume",
    "lr_factor",
    "config_from_toml",
    "config_to_toml",
    "saved_config",
]

#: Learning-rate schedules (after a linear warm-up of ``warmup_epochs``).
SCHEDULES = ("multistep", "cosine", "constant")

#: Keys of each line of ``metrics.jsonl`` (``val_*`` only with a validation split).
METRIC_KEYS = (
    "epoch",
    "step",
    "lr",
    "loss",
    "l_c",
    "l_r",
    "train_acc",
    "samples",
    "test_acc",
    "cos",
    "val_acc",
    "val_cos",
    "time",
    "train_time",
    "elapsed",
)

#: Config fields that may differ from the saved config when resuming a run.
RESUME_OVERRIDES = frozenset(
    {"epochs", "device", "threads", "checkpoint_every", "data", "download", "data_root", "eval_batch_size", "out"}
)


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every choice of a training run. Defaults are the paper-scale recipe (SPEC 2, preset ``paper``);
    :meth:`preset` gives the reduced-budget ``cpu`` one. Lists are written comma-separated on the CLI."""

    preset: str = _f("paper", "recipe the defaults come from (paper: SPEC 2; cpu: reduced budget)")
    # what to train
    model: str = _f("cifar_resnet18", "network: a registered name or tv:<torchvision name>")
    width: float | None = _f(None, "width multiplier of the CIFAR networks (default: the model's, 1.0)")
    weights: str | None = _f(None, "torchvision weights for tv: models (e.g. DEFAULT; needs internet)")
    data: str = _f("cifar100", "cifar10, cifar100 (torchvision) or an image folder with train/ and test/ (or val/)")
    data_root: str | None = _f(None, "where torchvision keeps cifar10/cifar100 (default: the igrad cache)")
    download: bool = _f(False, "let torchvision download cifar10/cifar100")
    val_fraction: float = _f(0.0, "hold out this fraction of the training set (per class, seeded) as validation")
    split_seed: int = _f(0, "seed of the validation split and of the fixed cos subset")
    mean: list[float] | None = _f(None, "normalisation mean per channel (default: the data set's, SPEC 2)")
    std: list[float] | None = _f(None, "normalisation std per channel (default: the data set's, SPEC 2)")
    # the loss
    lam: float = _f(DEFAULT_LAMBDA, "weight λ of the regulariser L_R (0: standard training, L_R not computed)")
    error: str = _f("cosine", "error function E of L_R")
    stats: str = _f(DEFAULT_STATS, "BatchNorm statistics of the regulariser's gradient passes")
    allow: list[str] = _f([], "non-linearities without a guided rule to let through (e.g. silu)")
    # optimisation
    epochs: int = _f(200, "number of epochs")
    batch_size: int = _f(128, "global batch size (split between the processes)")
    lr: float = _f(0.1, "peak learning rate of SGD")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "SGD weight decay")
    nesterov: bool = _f(False, "Nesterov momentum")
    schedule: str = _f("multistep", "learning-rate schedule after the warm-up")
    milestones: list[int] = _f([60, 120, 160], "epochs at which multistep multiplies the rate by gamma")
    gamma: float = _f(0.2, "multistep factor")
    warmup_epochs: float = _f(1.0, "linear warm-up length in epochs (per step)")
    steps_per_epoch: int = _f(0, "cap on the steps of an epoch (0: one full pass over the training set)")
    # augmentation (SPEC 2)
    crop_padding: int = _f(4, "RandomCrop padding (0: no crop)")
    flip: bool = _f(True, "random horizontal flip")
    rotation: float = _f(15.0, "RandomRotation range in degrees (0: none)")
    # evaluation
    eval_batch_size: int = _f(500, "batch size of evaluation")
    cos_samples: int = _f(500, "test images (a fixed seeded subset) for the mean cos(δx, δᴳx) diagnostic; 0: off")
    # runtime
    seed: int = _f(0, "seed of initialisation, data order, augmentation and dropout")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    amp: bool = _f(False, "bf16 autocast (CUDA only)")
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
        if self.schedule not in SCHEDULES:
            raise unknown_name("schedule", self.schedule, SCHEDULES)
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (math.isfinite(self.lam) and self.lam >= 0, "lam must be a finite number >= 0"),
            (math.isfinite(self.lr) and self.lr > 0, "lr must be a finite number > 0"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.gamma > 0, "gamma must be > 0"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.steps_per_epoch >= 0, "steps_per_epoch must be >= 0"),
            (self.crop_padding >= 0, "crop_padding must be >= 0"),
            (0 <= self.rotation <= 180, "rotation must be in [0, 180] degrees"),
            (self.cos_samples >= 0, "cos_samples must be >= 0"),
            (self.threads >= 0, "threads must be >= 0"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.width is None or self.width > 0, "width must be > 0"),
            (all(m >= 0 for m in self.milestones), "milestones must be epochs >= 0"),
            (not (self.nesterov and self.momentum == 0), "nesterov needs momentum > 0"),
            ((self.mean is None) == (self.std is None), "give both mean and std, or neither"),
            (self.std is None or all(s > 0 for s in self.std), "std values must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise IgradError(f"bad config: {message}")
        if self.amp and not self.device.startswith("cuda") and not (self.device == "auto" and _cuda()):
            raise IgradError("--amp (bf16 autocast) is for CUDA GPUs; this run is on the CPU")


#: Presets: overrides of the :class:`TrainConfig` defaults. ``paper`` is SPEC 2's paper-scale recipe;
#: ``cpu`` the reduced budget for machines without an accelerator: the same optimiser, augmentation and
#: warm-up, 15 epochs with a cosine schedule, networks at 1/4 width.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {"epochs": 15, "schedule": "cosine", "width": 0.25},
}


def _cuda() -> bool:
    return torch.cuda.is_available()


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


# --- data ---------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    """The splits of a run and their normalisation."""

    train: Split
    test: Split
    val: Split | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def _subset(split: Split, index: torch.Tensor) -> Split:
    return Split(split.images[index], split.labels[index], split.classes)


def _stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held-out): per class, ``round(fraction · n_c)`` samples chosen by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    held = []
    for c in labels.unique().tolist():
        members = perm[labels[perm] == c]
        held.append(members[: round(fraction * len(members))])
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_idx] = False
    return mask.nonzero().squeeze(1), held_idx


def prepare_data(config: TrainConfig) -> TrainData:
    """Load the training and test splits of ``config.data`` and split off the validation part.

    The validation split holds ``round(val_fraction · n_c)`` images of each class ``c``, chosen with
    ``split_seed``: the same for every training seed, λ and network.
    """
    train = load_split(config.data, "train", root=config.data_root, download=config.download)
    test = load_split(config.data, "test", root=config.data_root, download=config.download)
    if train.classes != test.classes:
        raise IgradError(
            f"the train and test splits of {config.data} have different classes "
            f"({len(train.classes)} vs {len(test.classes)}; first difference: "
            f"{next((a, b) for a, b in zip(train.classes + [''], test.classes + [''], strict=False) if a != b)})"
        )
    if train.images.shape[1:] != test.images.shape[1:]:
        raise IgradError(
            f"train images are {tuple(train.images.shape[1:])} but test images {tuple(test.images.shape[1:])}"
        )
    if config.mean is not None and config.std is not None:
        mean, std = tuple(config.mean), tuple(config.std)
    else:
        mean, std = normalization_for(config.data, train)
    if len(mean) != train.images.shape[1] or len(std) != train.images.shape[1]:
        raise IgradError(f"mean/std have {len(mean)} values but the images have {train.images.shape[1]} channels")
    val = None
    if config.val_fraction > 0:
        keep, held = _stratified_holdout(train.labels, config.val_fraction, config.split_seed)
        if len(held) == 0:
            raise IgradError(f"val_fraction {config.val_fraction} holds out no image of {len(train)}")
        train, val = _subset(train, keep), _subset(train, held)
    return TrainData(train, test, val, tuple(float(m) for m in mean), tuple(float(s) for s in std))


def cos_subset(n: int, samples: int, seed: int) -> torch.Tensor:
    """The fixed, seeded subset (sorted indices) of ``min(samples, n)`` images for the cos diagnostic."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: min(samples, n)].sort().values


# --- augmentation -------------------------------------------------------------------------------------


def augment(
    images: torch.Tensor,
    *,
    padding: int = 4,
    flip: bool = True,
    rotation: float = 15.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SPEC 2 augmentation, independently per sample, on a uint8 (or uint16) batch ``[B, C, H, W]``;
    float32 in ``[0, 1]`` out.

    Equal, sample by sample, to torchvision's ``RandomCrop((H, W), padding)`` (zero fill), then
    ``RandomHorizontalFlip()``, then ``RandomRotation(rotation)`` (nearest, zero fill, about the centre),
    then ``ToImage/ToDtype(scale)``. torchvision's v2 transforms draw one set of parameters per call,
    which on a batch tensor means one crop/flip/angle for the whole batch; here the parameters are
    drawn per sample (from ``generator``, on the CPU) and applied in a few batched tensor operations.
    """
    if images.dtype not in (torch.uint8, torch.uint16) or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}"
        raise IgradError(f"augment expects uint8 or uint16 images [B, C, H, W], got {got}")
    b, _, h, w = images.shape
    dev = images.device
    x = images
    if padding > 0:
        top = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        left = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = (top[:, None] + torch.arange(h)).to(dev)  # [B, H]
        cols = (left[:, None] + torch.arange(w)).to(dev)  # [B, W]
        batch = torch.arange(b, device=dev)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        flips = (torch.rand(b, generator=generator) < 0.5).to(dev)
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    out = to_unit(x)  # nearest-neighbour rotation copies values: scaling first changes nothing
    if rotation > 0:
        angle = (torch.rand(b, generator=generator, dtype=torch.float64) * 2 - 1) * rotation
        out = _rotate(out, angle.to(dev))
    return out


def _rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of ``x`` counter-clockwise by its angle about the centre, nearest
    interpolation, zero fill: torchvision's ``rotate`` with one angle per sample.

    Output pixel at centred coordinates ``(u, v)`` reads input ``(cos a·u − sin a·v, sin a·u + cos a·v)``
    (``v`` downwards), i.e. ``affine_grid`` on normalised coordinates with
    ``θ = [[cos a, −sin a·H/W, 0], [sin a·W/H, cos a, 0]]``.
    """
    b, _, h, w = x.shape
    a = torch.deg2rad(degrees)
    cos, sin = a.cos(), a.sin()
    theta = torch.zeros(b, 2, 3, dtype=torch.float64, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    grid = F.affine_grid(theta.to(x.dtype), [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# --- schedule -----------------------------------------------------------------------------------------


def lr_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based) as a fraction of ``config.lr``.

    Linear warm-up ``(step + 1) / W`` over the first ``W = warmup_epochs · steps_per_epoch`` steps, times
    ``multistep``: ``gamma^(number of milestones ≤ epoch)``, ``epoch = step / steps_per_epoch``;
    ``cosine``: ``(1 + cos(π t / T)) / 2`` with ``t = step − W``, ``T = epochs · steps_per_epoch − W``;
    ``constant``: 1.
    """
    warm = round(config.warmup_epochs * steps_per_epoch)
    factor = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    if config.schedule == "multistep":
        epoch = step / steps_per_epoch
        factor *= config.gamma ** sum(1 for m in config.milestones if m <= epoch)
    elif config.schedule == "cosine":
        total = max(1, config.epochs * steps_per_epoch - warm)
        t = min(max(step - warm, 0), total)
        factor *= 0.5 * (1 + math.cos(math.pi * t / total))
    return factor


# --- evaluation ---------------------------------------------------------------------------------------


def _shard(n: int, rank: int, world: int) -> torch.Tensor:
    return torch.arange(rank, n, world)


@torch.no_grad()
def _correct(
    model: nn.Module,
    split: Split,
    index: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    device: torch.device,
    amp: bool,
) -> int:
    correct = 0
    for start in range(0, len(index), batch_size):
        x, y = eval_tensors(split, mean, std, index[start : start + batch_size], device)
        with _autocast(device, amp):
            correct += int((model_logits(model, x).argmax(1) == y).sum())
    return correct


def evaluate_accuracy(
    model: nn.Module,
    split: Split,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    indices: torch.Tensor | Sequence[int] | None = None,
) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` in eval mode on ``split`` (or ``indices`` of it),
    normalised with ``mean``/``std``. The model's training mode is restored afterwards."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    index = torch.arange(len(split)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    if len(index) == 0:
        raise IgradError("evaluate_accuracy: no images to evaluate")
    with eval_mode(model):
        return _correct(model, split, index, mean, std, batch_size, device, False) / len(index)


def mean_gradient_cosine(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 500,
    allow: Sequence[str] = (),
) -> float:
    """Mean over samples of ``cos(δx_i, δᴳx_i)`` for the ground-truth classes ``y`` (SPEC 1 diagnostic),
    with ``model`` in eval mode (restored afterwards)."""
    with eval_mode(model):
        return float(_cos_sum(model, x, y, batch_size, allow)) / len(y)


def _cos_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, allow: Sequence[str]) -> float:
    total = 0.0
    for start in range(0, len(y), batch_size):
        total += float(
            gradient_cosine(model, x[start : start + batch_size], y[start : start + batch_size], allow=allow).sum()
        )
    return total


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- results ------------------------------------------------------------------------------------------


class NonFiniteLossError(IgradError):
    """The training loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


@dataclass
class RunResult:
    """What :func:`fit` returns: the trained model (unwrapped, eval mode), the per-epoch history and
    the run folder."""

    run_dir: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    model: nn.Module
    best: dict[str, Any]

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def test_acc(self) -> float:
        return float(self.final.get("test_acc", float("nan")))

    @property
    def cos(self) -> float:
        return float(self.final.get("cos", float("nan")))

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: final metrics, best epoch, run folder."""
        return {
            "run_dir": str(self.run_dir),
            "epochs": len(self.history),
            "final": dict(self.final),
            "test_acc": self.test_acc,
            "cos": self.cos,
            "val_acc": self.final.get("val_acc"),
            "best": dict(self.best),
        }


# --- distributed --------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls, device_hint: str) -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
        if not dist.is_initialized():
            use_cuda = device_hint.startswith("cuda") or (device_hint == "auto" and _cuda())
            if use_cuda:
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if use_cuda else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), local, owns)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def broadcast_buffers(self, model: nn.Module) -> None:
        if self.world > 1:
            import torch.distributed as dist

            for b in model.buffers():
                dist.broadcast(b, 0)

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


# --- the trainer --------------------------------------------------------------------------------------


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: well mixed, platform independent)."""
    a, b = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2)
    return (int(a) << 31 ^ int(b)) & 0x7FFF_FFFF_FFFF_FFFF


_AUG, _DROPOUT, _ORDER = 1, 2, 3


def _default_out(config: TrainConfig) -> str:
    name = config.model.replace(":", "-").replace("/", "-")
    width = f"-w{config.width:g}" if config.width is not None else ""
    return str(Path("runs") / f"{name}{width}-lam{config.lam:g}-seed{config.seed}")


def _select_device(config: TrainConfig, dist: _Dist) -> torch.device:
    """``auto``: CUDA when available; ``cuda`` means the process's local rank's GPU."""
    name = "cuda" if config.device == "auto" and _cuda() else ("cpu" if config.device == "auto" else config.device)
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise IgradError(f"unknown device {config.device!r}; use cpu, cuda, cuda:N or auto")
    if not _cuda():
        raise IgradError(f"device {config.device!r} asked for, but no CUDA GPU is available")
    try:
        return torch.device("cuda", dist.local_rank) if name == "cuda" else torch.device(name)
    except RuntimeError as exc:
        raise IgradError(f"bad device {config.device!r}: {exc}") from exc


def _stall_hook(global_step: int) -> None:
    """Test hook: ``IGRAD_TEST_STALL="STEP:FILE"`` makes the process write FILE after optimiser step STEP
    and wait there (for a test to kill it at a known point)."""
    spec = os.environ.get("IGRAD_TEST_STALL")
    if not spec:
        return
    step, _, marker = spec.partition(":")
    if int(step) == global_step:
        Path(marker).write_text(str(os.getpid()))
        while True:  # pragma: no cover - killed by the test
            time.sleep(0.05)


class _Trainer:
    def __init__(self, config: TrainConfig, dist: _Dist, quiet: bool) -> None:
        self.config = config
        self.dist = dist
        self.quiet = quiet
        self.device = _select_device(config, dist)

    # -- setup ------------------------------------------------------------------------------------------
    def setup(self, state: dict[str, Any] | None, run_dir: Path | None) -> None:
        c = self.config
        if state is not None and run_dir is not None:
            self.run_dir = run_dir
        else:
            self.run_dir = Path(c.out or _default_out(c))
            if (self.run_dir / "last.pt").exists():
                raise IgradError(
                    f"run folder {self.run_dir} already holds a run (last.pt); continue it with "
                    f"--resume {self.run_dir}, or choose another --out"
                )
        self.data = prepare_data(c)
        d = self.data
        self.num_classes = len(d.classes)
        torch.manual_seed(c.seed)
        model = create_model(c.model, num_classes=self.num_classes, **c.model_kwargs)
        self.model = model.to(self.device)
        self.criterion = GradientAlignmentLoss(c.error, stats=c.stats, allow=c.allow) if c.lam > 0 else None
        self._preflight()
        n = len(d.train)
        if c.batch_size < self.dist.world:
            raise IgradError(f"batch_size {c.batch_size} is smaller than the number of processes {self.dist.world}")
        steps = math.ceil(n / c.batch_size)
        if n - (steps - 1) * c.batch_size < self.dist.world:
            steps -= 1  # a last batch too small to give every process a sample is dropped
        if steps < 1:
            raise IgradError(f"the training split has {n} images, too few for a batch of {c.batch_size}")
        self.steps_per_epoch = min(steps, c.steps_per_epoch) if c.steps_per_epoch else steps
        # on a GPU the uint8 training images (150 MB for CIFAR) live there, and are augmented there
        small = d.train.images.numel() <= 2**31
        self.images = d.train.images.to(self.device) if self.device.type == "cuda" and small else d.train.images
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.config, self.steps_per_epoch)
        )
        self.cos_index = cos_subset(len(d.test), c.cos_samples, c.split_seed)
        self.val_cos_index = cos_subset(len(d.val), c.cos_samples, c.split_seed) if d.val is not None else None
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.sums = torch.zeros(5, dtype=torch.float64)  # Σ loss·n, Σ L_C·n, Σ L_R·n, correct, n
        self.last_lr = c.lr * lr_factor(0, c, self.steps_per_epoch)  # rate of the latest step (for the log)
        self.elapsed = 0.0  # seconds of training before this process (resumed runs)
        self._since = time.perf_counter()
        self.saved = "no checkpoint had been written yet"
        if state is not None:
            self._restore(state)
        self.ddp: nn.Module = self.model
        if self.dist.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def _preflight(self) -> None:
        """One eval-mode forward and gradient pair on two training images: shape, class-count and
        non-linearity problems surface here, before the run folder is created."""
        d, c = self.data, self.config
        x, y = eval_tensors(d.train, d.mean, d.std, torch.arange(min(2, len(d.train))), self.device)
        with eval_mode(self.model):
            try:
                with torch.no_grad():
                    logits = model_logits(self.model, x)
            except RuntimeError as exc:
                raise IgradError(
                    f"model {c.model!r} cannot process the images of {c.data} "
                    f"(shape {tuple(x.shape[1:])}): {str(exc).splitlines()[0]}"
                ) from exc
            if logits.shape[1] != self.num_classes:
                raise IgradError(
                    f"model {c.model!r} returned logits of shape {tuple(logits.shape)} for {self.num_classes} classes"
                )
            if c.lam > 0 or c.cos_samples > 0:
                gradient_cosine(self.model, x, y, allow=c.allow)

    def _config_dict(self) -> dict[str, Any]:
        c, d = self.config, self.data
        return {
            **c.to_dict(),
            "out": str(self.run_dir),
            "model_kwargs": c.model_kwargs,
            "num_classes": self.num_classes,
            "classes": list(d.classes),
            "image_shape": list(d.train.images.shape[1:]),  # [C, H, W]
            "mean": list(d.mean),
            "std": list(d.std),
            "data": str(Path(c.data).resolve()) if Path(c.data).is_dir() else c.data,
            "world_size": self.dist.world,
            "steps_per_epoch_effective": self.steps_per_epoch,
            "train_images": len(d.train),
            "val_images": len(d.val) if d.val is not None else 0,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        saved = state["config"]
        names = saved.get("classes")
        if names is not None and list(names) != list(self.data.classes):
            added = sorted(set(self.data.classes) - set(names))
            gone = sorted(set(names) - set(self.data.classes))
            raise IgradError(
                f"cannot resume: the classes of {self.config.data} changed since the run was trained "
                f"(new: {added or 'none'}; missing: {gone or 'none'}); restore the class folders or start a new run"
            )
        mismatch = [
            k
            for k, v in self.config.to_dict().items()
            if k not in RESUME_OVERRIDES and k in saved and k not in ("mean", "std") and saved[k] != v
        ]
        if mismatch:
            k = mismatch[0]
            raise IgradError(
                f"cannot resume: {k} is {self.config.to_dict()[k]!r} but the run was trained with {saved[k]!r} "
                f"(only {', '.join(sorted(RESUME_OVERRIDES))} may change when resuming)"
            )
        if saved.get("world_size", 1) != self.dist.world:
            print(
                f"note: resuming a run of {saved.get('world_size', 1)} process(es) with {self.dist.world}",
                file=sys.stderr,
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise IgradError(f"checkpoint does not match this run's model/optimiser: {exc}") from exc
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.global_step = int(state["step"])
        self.sums = torch.tensor(state.get("epoch_sums", [0.0] * 5), dtype=torch.float64)
        self.history = list(state.get("history", []))
        self.best = dict(state.get("best", {}))
        self.elapsed = float(state.get("elapsed", 0.0))
        self.saved = f"the checkpoint it resumed from ({self.run_dir / 'last.pt'}) is kept"
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _elapsed(self) -> float:
        return self.elapsed + time.perf_counter() - self._since

    # -- files (rank 0) ---------------------------------------------------------------------------------
    @property
    def writes(self) -> bool:
        return self.dist.rank == 0

    def _checkpoint_state(self) -> dict[str, Any]:
        cfg = self._config_dict()
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaling
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.global_step,
            "epoch_sums": self.sums.tolist(),
            "rng": rng,
            "config": cfg,
            "history": self.history,
            "best": self.best,
            "elapsed": self._elapsed(),
            "provenance": provenance(cfg, self.config.seed),
        }

    def _write_logs(self, status: str) -> None:
        lines = "".join(json.dumps(_finite(h), allow_nan=False) + "\n" for h in self.history)
        atomic_write_text(self.run_dir / "metrics.jsonl", lines)
        cfg = self._config_dict()
        summary = {
            "status": status,
            "recipe": self.config.preset,
            "epochs_done": self.epoch,
            "final": _finite(self.history[-1]) if self.history else None,
            "best": _finite(self.best),
            "provenance": provenance(cfg, self.config.seed),
        }
        atomic_write_json(self.run_dir / "run.json", summary)

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        c = self.config
        if self.writes:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            header = f"igrad train: effective config (recipe {c.preset!r}); rerun with: igrad train --config FILE"
            atomic_write_text(self.run_dir / "config.toml", config_to_toml(self._config_toml_values(), header))
            self._write_logs("running")
        while self.epoch < c.epochs:
            self._train_epoch()
        if self.writes:
            self._write_logs("finished")
        self.model.eval()
        return RunResult(self.run_dir, self._config_dict(), list(self.history), self.model, dict(self.best))

    def _config_toml_values(self) -> dict[str, Any]:
        values = self.config.to_dict()
        values["out"] = str(self.run_dir)
        values["mean"], values["std"] = list(self.data.mean), list(self.data.std)
        return values

    def _train_epoch(self) -> None:
        c, d = self.config, self.data
        epoch = self.epoch  # 0-based; the log calls it epoch + 1
        order = self._epoch_order(epoch)
        self.model.train()
        start = time.perf_counter()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {epoch + 1}/{c.epochs}",
            disable=self.quiet or not self.writes or not sys.stderr.isatty(),
            leave=False,
            dynamic_ncols=True,
        )
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                self._train_step(order, epoch, self.step_in_epoch)
                self.step_in_epoch += 1
                self.global_step += 1
                bar.update(1)
                if self.step_in_epoch % 10 == 0 or self.step_in_epoch == self.steps_per_epoch:
                    s = self.sums
                    bar.set_postfix(loss=f"{s[0] / s[4]:.3f}", acc=f"{100 * s[3] / s[4]:.1f}%")
                _stall_hook(self.global_step)
                if (
                    c.checkpoint_every
                    and self.global_step % c.checkpoint_every == 0
                    and self.step_in_epoch < self.steps_per_epoch
                ):
                    self._save(best=False)
        finally:
            bar.close()
        train_time = time.perf_counter() - start
        record = self._evaluate()
        s = self.sums
        record = {
            "epoch": epoch + 1,
            "step": self.global_step,
            "lr": self.last_lr,
            "loss": float(s[0] / s[4]),
            "l_c": float(s[1] / s[4]),
            "l_r": float(s[2] / s[4]) if c.lam > 0 else None,
            "train_acc": float(s[3] / s[4]),
            "samples": int(s[4]),
            **record,
            "time": round(time.perf_counter() - start, 3),
            "train_time": round(train_time, 3),
            "elapsed": round(self._elapsed(), 3),
        }
        self.history.append(record)
        self.epoch += 1
        self.step_in_epoch = 0
        self.sums = torch.zeros(5, dtype=torch.float64)
        key = "val_acc" if d.val is not None else "test_acc"
        improved = not self.best or record[key] > self.best["value"]
        if improved:
            self.best = {"epoch": epoch + 1, "metric": key, "value": record[key]}
        self._save(best=improved)
        if self.writes:
            self._write_logs("running")
            print(_summary_line(record, c.epochs), flush=True)

    def _batch(self, order: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of global batch ``step``: augmented, normalised images and labels."""
        c, d, dist = self.config, self.data, self.dist
        batch = order[step * c.batch_size : (step + 1) * c.batch_size]
        gen = torch.Generator().manual_seed(_derive_seed(c.seed, epoch, step, _AUG))
        # augmentation parameters are drawn for the global batch, so they do not depend on the world size
        images = self.images[batch.to(self.images.device)]
        x = augment(images, padding=c.crop_padding, flip=c.flip, rotation=c.rotation, generator=gen)
        x = normalize(x[dist.rank :: dist.world].to(self.device, non_blocking=True), d.mean, d.std)
        y = d.train.labels[batch][dist.rank :: dist.world].to(self.device, non_blocking=True)
        return x, y

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The data order of ``epoch`` (the same on every rank)."""
        g = torch.Generator().manual_seed(_derive_seed(self.config.seed, epoch, _ORDER))
        return torch.randperm(len(self.data.train), generator=g)

    def _train_step(self, order: torch.Tensor, epoch: int, step: int) -> None:
        c, dist = self.config, self.dist
        x, y = self._batch(order, epoch, step)
        torch.manual_seed(_derive_seed(c.seed, epoch, step, dist.rank, _DROPOUT))
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, c.amp):
            if self.criterion is not None:
                l_r, logits = self.criterion(self.ddp, x, y)
                l_c = F.cross_entropy(logits.float(), y)
                loss = l_c + c.lam * l_r.float()
            else:
                logits = model_logits(self.ddp, x, probabilities=False)  # checked in _preflight
                l_c = F.cross_entropy(logits.float(), y)
                l_r = torch.zeros((), device=self.device)
                loss = l_c
        n = float(len(y))
        step_sums = torch.stack(
            [
                loss.detach() * n,
                l_c.detach() * n,
                l_r.detach().float() * n,
                (logits.argmax(1) == y).sum().float(),
                torch.tensor(n, device=self.device),
            ]
        ).double()
        step_sums = dist.all_reduce(step_sums).cpu()
        if not bool(torch.isfinite(step_sums[:3]).all()):
            self._non_finite(epoch, step, step_sums)
        loss.backward()
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.sums += step_sums

    def _save(self, best: bool) -> None:
        """Write last.pt (and best.pt) from rank 0, after checking that every weight is finite (all ranks)."""
        bad = [n for n, p in self.model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            self._stop(f"non-finite weights ({bad[0]}) after global step {self.global_step}")
        if self.writes:
            state = self._checkpoint_state()
            save_checkpoint(self.run_dir / "last.pt", state)
            if best:
                save_checkpoint(self.run_dir / "best.pt", state)
        where = f"step {self.step_in_epoch} of epoch {self.epoch + 1}" if self.step_in_epoch else f"epoch {self.epoch}"
        self.saved = f"the last good checkpoint {self.run_dir / 'last.pt'} (end of {where}) is kept"

    def _non_finite(self, epoch: int, step: int, s: torch.Tensor) -> None:
        c = self.config
        self._stop(
            f"non-finite loss at epoch {epoch + 1}, step {step + 1} of {self.steps_per_epoch} "
            f"(global step {self.global_step + 1}): L = {float(s[0] / s[4]):g}, L_C = {float(s[1] / s[4]):g}"
            + (f", L_R = {float(s[2] / s[4]):g}" if c.lam > 0 else "")
        )

    def _stop(self, what: str) -> None:
        message = f"{what}; training stopped, {self.saved}. Try a lower --lr or --lam."
        if self.writes:
            self._write_logs(f"stopped: {message}")
        raise NonFiniteLossError(message)

    def _evaluate(self) -> dict[str, Any]:
        c, d, dist = self.config, self.data, self.dist
        dist.broadcast_buffers(self.model)  # one set of BatchNorm statistics for every rank
        model = self.model
        out: dict[str, Any] = {}
        with eval_mode(model):
            for name, split, cos_index in (("test", d.test, self.cos_index), ("val", d.val, self.val_cos_index)):
                if split is None:
                    continue
                shard = _shard(len(split), dist.rank, dist.world)
                correct = _correct(model, split, shard, d.mean, d.std, c.eval_batch_size, self.device, c.amp)
                sums = [float(correct), 0.0]
                if c.cos_samples > 0 and cos_index is not None:
                    idx = cos_index[dist.rank :: dist.world]
                    if len(idx):
                        x, y = eval_tensors(split, d.mean, d.std, idx, self.device)
                        sums[1] = _cos_sum(model, x, y, c.eval_batch_size, c.allow)
                t = dist.all_reduce(torch.tensor(sums, dtype=torch.float64, device=self.device)).cpu()
                out[f"{name}_acc"] = float(t[0]) / len(split)
                out[f"{name}_cos" if name == "val" else "cos"] = (
                    float(t[1]) / len(cos_index) if c.cos_samples > 0 and cos_index is not None else None
                )
        return out


def _finite(record: Mapping[str, Any]) -> dict[str, Any]:
    """Non-finite floats as strings (JSON results files hold finite numbers only)."""
    return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _summary_line(r: Mapping[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch']}/{epochs}", f"loss {r['loss']:.4f}"]
    if r.get("l_r") is not None:
        parts[-1] += f" (L_C {r['l_c']:.4f}, L_R {r['l_r']:.4f})"
    parts.append(f"acc {100 * r['train_acc']:.2f}%")
    if "val_acc" in r:
        parts.append(f"val {100 * r['val_acc']:.2f}%")
    parts.append(f"test {100 * r['test_acc']:.2f}%")
    if r.get("cos") is not None:
        parts.append(f"cos {r['cos']:.3f}")
    parts += [f"lr {r['lr']:.4g}", f"{r['time']:.1f}s"]
    return "  ".join(parts)


def fit(
    config: TrainConfig | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> RunResult:
    """Train ``config`` (default: ``TrainConfig()``, the paper recipe); return a :class:`RunResult`.

    ``resume``: a run folder (its ``last.pt``) or a checkpoint file; the run continues where that
    checkpoint left off, in the checkpoint's folder. ``config`` may then be ``None`` (the saved
    config) or equal the saved one except :data:`RESUME_OVERRIDES`.

    ``quiet``: no progress bar (there is none either when stderr is not a terminal); the one-line
    epoch summaries are printed by rank 0 in any case. Raises :class:`IgradError` for bad input and
    :class:`NonFiniteLossError` when the loss stops being finite. The process's torch RNG state and
    thread count are restored on return.
    """
    state, run_dir = None, None
    if resume is not None:
        path = Path(resume)
        ckpt = path / "last.pt" if path.is_dir() else path
        state = load_checkpoint(ckpt)
        run_dir = ckpt.parent
        if config is None:
            config = saved_config(state)
    config = config if config is not None else TrainConfig()
    config.validate()
    threads = torch.get_num_threads()
    dist = _Dist.from_env(config.device)
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        trainer = _Trainer(config, dist, quiet)
        devices = [trainer.device.index or 0] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            trainer.setup(state, run_dir)
            del state
            return trainer.run()
    finally:
        torch.set_num_threads(threads)
        dist.close()


def saved_config(state: Mapping[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` saved in a checkpoint (the extra keys of its config dict left out)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in state["config"].items() if k in names})


def fit_or_resume(config: TrainConfig, *, quiet: bool = False) -> RunResult:
    """:func:`fit` ``config`` in its run folder ``config.out``: a finished run is reused (nothing trained),
    an interrupted one resumed from its ``last.pt``, a folder trained with another config refused
    (:class:`IgradError`)."""
    last = Path(config.out) / "last.pt"
    return fit(config, resume=last if last.is_file() else None, quiet=quiet)
