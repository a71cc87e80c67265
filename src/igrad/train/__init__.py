"""Training with the interpretable-gradient loss (docs/method.md §The loss, §Networks and recipes): ``L = L_C + λ L_R``.

One module per concept: :mod:`~igrad.train.config` (:class:`TrainConfig`, presets, TOML),
:mod:`~igrad.train.augment` (the augmentation of docs/method.md §Networks and recipes, per sample),
:mod:`~igrad.train.distributed`
(several processes), :mod:`~igrad.train.finetune` (starting from a checkpoint's weights),
:mod:`~igrad.train.trainer` (:func:`fit`, the run folder, resuming). The data of a
run (splits, validation hold-out, the fixed cos subset) is :mod:`igrad.data`'s; accuracy and mean
``cos(δx, δᴳx)`` are measured by :mod:`igrad.measure`, as in evaluation.
"""

from __future__ import annotations

from ..data import TrainData
from .augment import augment
from .config import (
    NORMALIZATION_CHOICES,
    PRESETS,
    RESOURCE_FIELDS,
    RESUME_OVERRIDES,
    SCHEDULES,
    TrainConfig,
    config_from_toml,
    config_to_toml,
    prepare_data,
    saved_config,
)
from .finetune import InitWeights, load_init
from .trainer import (
    METRIC_KEYS,
    NonFiniteLossError,
    RunResult,
    StepInfo,
    fit,
    fit_or_resume,
    lam_factor,
    lr_factor,
)

__all__ = [
    "TrainConfig",
    "PRESETS",
    "SCHEDULES",
    "METRIC_KEYS",
    "NORMALIZATION_CHOICES",
    "RESUME_OVERRIDES",
    "RESOURCE_FIELDS",
    "RunResult",
    "StepInfo",
    "TrainData",
    "NonFiniteLossError",
    "fit",
    "prepare_data",
    "augment",
    "fit_or_resume",
    "lr_factor",
    "lam_factor",
    "InitWeights",
    "load_init",
    "config_from_toml",
    "config_to_toml",
    "saved_config",
]
