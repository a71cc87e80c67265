"""Exceptions raised by igrad. All derive from :class:`IgradError` (a ``ValueError``), so a caller can
catch every input problem igrad diagnoses with one ``except`` clause."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch


class IgradError(ValueError):
    """Base class of every error igrad raises on bad input."""


class UnsupportedActivationError(IgradError):
    """A non-linearity without a guided-backprop rule was met on the gradient path."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> IgradError:
    """An error for an unknown registry name, listing the known names and the closest matches."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return IgradError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}.")


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


def resolve_target(target: object, logits: torch.Tensor) -> torch.Tensor:
    """Turn ``target`` into a LongTensor ``[B]`` of class indices for ``logits`` ``[B, K]``.

    ``None`` gives the arg-max class of each sample; an ``int`` is used for every sample; a tensor or
    sequence gives one class per sample. Out-of-range classes raise :class:`IgradError`. ``logits``
    come from :func:`igrad.output.model_logits`, which has checked their shape.
    """
    batch, num_classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    if isinstance(target, bool):
        raise IgradError("target must be a class index, an index per sample or None, got a bool")
    if isinstance(target, int):
        t = torch.full((batch,), target, dtype=torch.long, device=logits.device)
    else:
        try:
            t = torch.as_tensor(target, device=logits.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise IgradError(f"target must be class indices, got {type(target).__name__}") from exc
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise IgradError(f"target must hold integer class indices, got dtype {t.dtype}")
        t = t.long().reshape(-1) if t.dim() == 0 and batch == 1 else t.long()
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise IgradError(f"target must have shape [{batch}] (one class per sample), got {tuple(t.shape)}")
    if t.is_inference():  # made under torch.inference_mode(): autograd may not save it
        t = t.clone()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        bad = t[(t < 0) | (t >= num_classes)][0].item()
        raise IgradError(f"target class {bad} is out of range for a model with {num_classes} classes")
    return t
