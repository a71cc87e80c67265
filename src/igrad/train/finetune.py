"""Fine-tuning (docs/method.md §Networks and recipes): a run that starts from the weights of a trained igrad checkpoint
(``TrainConfig.init``, ``igrad train --init CKPT``).

Only the checkpoint's model state is taken (parameters and BatchNorm buffers), loaded with
``weights_only=True`` (:func:`igrad.checkpoint.load_checkpoint`). Everything else starts as in a new
run: the optimiser (no momentum), the learning-rate schedule (warm-up included) and λ warm-up from
step 0, the epoch count, the history and best epoch, the RNG streams of ``seed``. The checkpoint must
be of the run's network: the same ``model`` and model arguments (``width``; torchvision's ``weights``
aside, which only chose where that checkpoint started) and the same classes, matched by name as
:func:`igrad.data.match_classes` does (the run's labels are renumbered to the checkpoint's class order
when the two orders differ). Anything else is refused with an :class:`~igrad.errors.IgradError` naming
the difference. The run's config records the file's SHA-256 (``init_sha256``), so its provenance says
exactly which weights it started from.

torchvision's pretrained weights are not an ``init``: a ``tv:`` model starts from them with
``weights`` (``--weights DEFAULT``, downloaded by torchvision where the machine can reach it; the head
is replaced for another class count), which is the same fresh-optimiser fine-tuning.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_checkpoint
from ..data import TrainData, match_classes
from ..errors import IgradError
from ..provenance import file_sha256
from .config import TrainConfig

__all__ = ["InitWeights", "load_init", "match_data_classes"]


@dataclass(frozen=True)
class InitWeights:
    """The starting point of a fine-tuning run: the checkpoint file, its SHA-256, its model state, and
    the run's data with labels numbered in the checkpoint's class order."""

    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    data: TrainData

    def load_into(self, model: nn.Module) -> None:
        """Copy the weights into ``model`` (strict: every key, every shape)."""
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise IgradError(
                f"cannot fine-tune from --init checkpoint {self.path}: its weights do not fit the network "
                f"({str(exc).splitlines()[0]})"
            ) from exc


def load_init(config: TrainConfig, data: TrainData) -> InitWeights:
    """Read ``config.init`` (weights only) and check it against the run: network and classes.

    ``data`` are the run's splits; the returned :class:`InitWeights` holds them with their labels in
    the checkpoint's class order. Raises :class:`IgradError` for a missing, corrupt or unsafe file, or a
    checkpoint of another network, class count or class set.
    """
    if config.init is None:
        raise IgradError("load_init needs a config with init set")
    path = Path(config.init)
    what = f"--init checkpoint {path}"
    state = load_checkpoint(path)
    saved = state["config"]
    try:
        num_classes = int(saved["num_classes"])
        _check_network(config, saved["model"], saved.get("model_kwargs", {}), what)
    except KeyError as exc:
        raise IgradError(f"{what}: its config lacks {exc.args[0]!r}") from exc
    matched = match_data_classes(data, saved.get("classes"), num_classes, source=config.data, model=what)
    _warn_normalization(saved, matched, what)
    return InitWeights(path, file_sha256(path), state["model"], matched)


def _check_network(config: TrainConfig, model: str, model_kwargs: Mapping[str, Any], what: str) -> None:
    """Refuse a checkpoint of another network: model name or model arguments (``weights`` aside)."""
    differences = []
    if model != config.model:
        differences.append(f"model {model!r}, this run's {config.model!r}")
    theirs = {k: v for k, v in model_kwargs.items() if k != "weights"}
    ours = {k: v for k, v in config.model_kwargs.items() if k != "weights"}
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) != ours.get(key):
            differences.append(f"{key} {theirs.get(key)!r}, this run's {ours.get(key)!r}")
    if differences:
        raise IgradError(
            f"cannot fine-tune from {what}: it holds another network ({'; '.join(differences)}). "
            "Train with the checkpoint's --model/--width, or choose a checkpoint of this network"
        )


def match_data_classes(
    data: TrainData, classes: Sequence[str] | None, num_classes: int, *, source: str, model: str
) -> TrainData:
    """``data`` with every split's labels numbered in a checkpoint's class order (``classes``, its
    ``num_classes`` outputs), matched by name (:func:`igrad.data.match_classes`). Refuses data whose
    class count differs (the head would not fit) or that holds a class the checkpoint does not know."""
    if len(data.classes) != num_classes:
        raise IgradError(
            f"cannot start from {model}: it has {num_classes} classes but {source} has {len(data.classes)}; "
            "its head does not fit this run"
        )

    def match(split: Any, name: str) -> Any:
        return match_classes(split, classes, num_classes, source=f"the {name} split of {source}", model=model)

    val = match(data.val, "validation") if data.val is not None else None
    return dataclasses.replace(data, train=match(data.train, "training"), test=match(data.test, "test"), val=val)


def _warn_normalization(saved: Mapping[str, Any], data: TrainData, what: str) -> None:
    ours = data.normalization.to_config()
    theirs = {k: saved.get(k) for k in ours}
    if all(v is not None for v in theirs.values()) and theirs != ours:
        warnings.warn(
            f"{what} was trained with normalisation mean {theirs['mean']}, std {theirs['std']}, this run uses "
            f"mean {ours['mean']}, std {ours['std']} (set --mean/--std to the checkpoint's to keep its inputs)",
            stacklevel=3,
        )
