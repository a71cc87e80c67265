"""Input validation shared by the library, the metrics and the command line: one home per check, so that
every entry point refuses the same bad input with the same :class:`~igrad.errors.IgradError`.

* :func:`check_images`: a batch of images ``[B, C, H, W]``, floating, finite;
* :func:`check_target` / :func:`resolve_target`: the one target resolver (``None``, an ``int``, one class
  per sample; :data:`TargetLike`), checked against a batch size and then against the logits;
* :func:`positive_int`: a positive integer (optionally ``None``);
* :func:`parse_names`: ``"all"``, a comma-separated list or a sequence of registry names (the saliency
  methods, the metrics).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, overload

import torch

from .errors import IgradError, unknown_name

__all__ = ["TargetLike", "check_images", "check_target", "resolve_target", "positive_int", "parse_names"]

#: What may name the class explained: ``None`` (each sample's arg-max class), one ``int`` for every sample,
#: or one class per sample (a LongTensor ``[B]`` or a sequence of ints).
TargetLike = int | torch.Tensor | Sequence[int] | None


def check_images(x: object, name: str = "x") -> torch.Tensor:
    """Validate a batch of images: a floating tensor ``[B, C, H, W]`` with finite values."""
    if not isinstance(x, torch.Tensor):
        raise IgradError(f"{name} must be a torch.Tensor of shape [B, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise IgradError(
            f"{name} must have shape [B, C, H, W] (a batch of images), got shape {tuple(x.shape)}"
            + (" (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else "")
        )
    if not x.is_floating_point():
        raise IgradError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise IgradError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise IgradError(f"{name} contains non-finite values (NaN or inf)")
    return x


def check_target(target: object, batch: int, device: torch.device) -> torch.Tensor | None:
    """``target`` as class indices ``[batch]`` (long, on ``device``), or ``None`` (the prediction, known
    only after a forward). Checks the kind, dtype and shape; the range is :func:`resolve_target`'s."""
    if target is None:
        return None
    if isinstance(target, bool):
        raise IgradError("target must be a class index, an index per sample or None, got a bool")
    if isinstance(target, int):
        return torch.full((batch,), target, dtype=torch.long, device=device)
    try:
        t = torch.as_tensor(target, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise IgradError(f"target must be class indices, got {type(target).__name__}") from exc
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise IgradError(f"target must hold integer class indices, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if tuple(t.shape) != (batch,):
        raise IgradError(f"target must have shape [{batch}] (one class per sample), got {tuple(t.shape)}")
    return t.long()


def resolve_target(target: object, logits: torch.Tensor) -> torch.Tensor:
    """Turn ``target`` into a LongTensor ``[B]`` of class indices for ``logits`` ``[B, K]``.

    ``None`` gives the arg-max class of each sample; an ``int`` is used for every sample; a tensor or
    sequence gives one class per sample (:func:`check_target`). Out-of-range classes raise
    :class:`IgradError`. ``logits`` come from :func:`igrad.output.model_logits`, which has checked their shape.
    """
    batch, num_classes = logits.shape
    t = check_target(target, batch, logits.device)
    if t is None:
        return logits.detach().argmax(dim=1)
    if t.is_inference():  # made under torch.inference_mode(): autograd may not save it
        t = t.clone()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)][0].item()
        raise IgradError(f"target class {bad} is out of range for a model with {num_classes} classes")
    return t


@overload
def positive_int(name: str, value: object, *, optional: Literal[False] = False) -> int: ...


@overload
def positive_int(name: str, value: object, *, optional: bool) -> int | None: ...


def positive_int(name: str, value: object, *, optional: bool = False) -> int | None:
    """``value`` when it is a positive ``int`` (or ``None`` where ``optional``); else an :class:`IgradError`
    naming ``name`` (a setting, a keyword or a command-line flag)."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise IgradError(f"{name} must be a positive integer{' (or None)' if optional else ''}, got {value!r}")
    return value


def parse_names(spec: str | Iterable[str], known: Iterable[str], kind: str, *, fold_case: bool = False) -> list[str]:
    """Names of ``known`` (a registry, in its order) from ``"all"``, a comma-separated string or a sequence:
    stripped, repeats dropped (first kept). Unknown names raise :func:`~igrad.errors.unknown_name` (all of them) for
    ``kind``; nothing given raises too. ``fold_case``: names are matched in lower case."""
    registry = list(known)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if names == ["all"]:
        return registry
    if not names:
        raise IgradError(f"no {kind} given; choose from {', '.join(registry)} or 'all'")
    keys = [n.lower() if fold_case else n for n in names]
    unknown = [key for key in keys if key not in registry]  # as matched (folded), so the hints match too
    if unknown:
        raise unknown_name(kind, unknown, registry)
    return list(dict.fromkeys(keys))
