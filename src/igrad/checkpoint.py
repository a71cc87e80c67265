"""Checkpoints: one format for training, evaluation, explanation and reproduction.

A checkpoint is a dict saved with :func:`igrad.atomic.atomic_save` (temp file, then rename) and
loaded with ``torch.load(..., weights_only=True)``, so a checkpoint holding pickled code is refused:

* ``"model"``: the model's ``state_dict`` (never a DDP-wrapped one: keys have no ``module.`` prefix);
* ``"config"``: a plain dict; :func:`load_model` needs ``model`` (registry name), ``model_kwargs``
  (e.g. ``{"width": 0.5}``), ``num_classes``; ``mean``/``std`` are the normalisation
  (:meth:`igrad.normalization.Normalization.from_config` reads them back), ``data`` the data source;
* anything else the trainer needs to resume (``optimizer``, ``scheduler``, ``epoch``, ``step``,
  ``rng``, ...), plus ``"format": FORMAT_VERSION`` and ``"provenance"``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_save
from .errors import IgradError
from .models import create_model

__all__ = ["FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "load_model"]

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` (with ``"format"`` added) atomically to ``path``."""
    atomic_save({**state, "format": FORMAT_VERSION}, path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; clear :class:`IgradError` when the file is
    missing, truncated/corrupt, holds pickled code, or is not an igrad checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise IgradError(f"checkpoint {path} is a folder; give a checkpoint file in it (e.g. {path / 'last.pt'})")
    if not path.is_file():
        raise IgradError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save's format is a zip archive
        raise IgradError(
            f"checkpoint {path} is truncated or corrupt, or not a checkpoint at all (it is not the zip archive "
            "torch.save writes)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise IgradError(
            f"checkpoint {path} was refused by torch.load(weights_only=True): it holds objects other than "
            "tensors and plain containers (possibly code). Not loading it."
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise IgradError(f"checkpoint {path} is truncated or corrupt ({str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise IgradError(f"{path} is not an igrad checkpoint (expected a dict with 'model' and 'config')")
    if state.get("format", FORMAT_VERSION) > FORMAT_VERSION:
        raise IgradError(f"checkpoint {path} has format {state['format']}, newer than this igrad ({FORMAT_VERSION})")
    return state


def load_model(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint, in eval mode, and return it with the checkpoint's config."""
    state = load_checkpoint(path, map_location)
    config = state["config"]
    try:
        model = create_model(config["model"], num_classes=int(config["num_classes"]), **config.get("model_kwargs", {}))
    except KeyError as exc:
        raise IgradError(f"checkpoint {path} config lacks {exc.args[0]!r}") from exc
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise IgradError(f"checkpoint {path} does not match model {config['model']!r}: {exc}") from exc
    return model.to(map_location).eval(), config
