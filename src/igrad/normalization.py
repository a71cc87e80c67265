"""Per-channel input normalisation as one object: ``x = (raw − mean) / std`` and back.

A model sees normalised images; the masking metrics (docs/method.md §Metrics) and the figures need the raw [0, 1]
pixels.
:class:`Normalization` holds the per-channel ``mean`` and ``std`` (validated once), turns stored images
(uint8, uint16 or float in [0, 1]) into the model's input (:meth:`Normalization.apply`) and normalised
images back into raw pixels (:meth:`Normalization.invert`). A checkpoint stores it as ``config["mean"]``
and ``config["std"]`` (:meth:`Normalization.to_config`), read back with :meth:`Normalization.from_config`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import IgradError
from .images import to_unit

__all__ = ["Normalization", "NORMALIZATIONS", "resolve_normalization"]


@dataclass(frozen=True)
class Normalization:
    """``apply(raw) = (raw − mean) / std`` per channel; ``invert(x) = x · std + mean``.

    ``mean`` and ``std`` have one value per channel (``std > 0``, all finite). Raises
    :class:`~igrad.errors.IgradError` on anything else, and when images of another channel count are
    given to :meth:`apply` / :meth:`invert`.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean, std = tuple(map(float, self.mean)), tuple(map(float, self.std))
        if not mean or len(mean) != len(std):
            raise IgradError(f"normalisation needs one mean and one std per channel, got {mean} and {std}")
        if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise IgradError(f"normalisation needs finite means and positive stds, got mean {mean}, std {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def channels(self) -> int:
        """The number of channels this normalisation is for."""
        return len(self.mean)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "the checkpoint") -> Normalization:
        """The normalisation a run stored (``config["mean"]``, ``config["std"]``); a clear error naming
        ``source`` where it is missing."""
        if "mean" not in config or "std" not in config:
            raise IgradError(f"{source} has no normalisation (config['mean'] and config['std'])")
        return cls(tuple(config["mean"]), tuple(config["std"]))

    def to_config(self) -> dict[str, list[float]]:
        """``{"mean": [...], "std": [...]}``, as stored in a run's config and checkpoint."""
        return {"mean": list(self.mean), "std": list(self.std)}

    def _tensors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 3 or x.shape[-3] != self.channels:
            raise IgradError(
                f"images of shape {tuple(x.shape)} do not have the {self.channels} channels of the normalisation "
                f"(mean {self.mean}, std {self.std}); expected [B, {self.channels}, H, W]"
            )
        shape = (self.channels, 1, 1)
        m = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        s = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return m, s

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """The model's input ``(raw − mean) / std`` of stored images ``[..., C, H, W]``: uint8 (``/255``),
        uint16 (``/65535``) or floating raw pixels in [0, 1] (not modified); float32, or float64 for float64
        pixels (:func:`igrad.images.to_unit`)."""
        x = to_unit(images)
        m, s = self._tensors(x)
        return x.sub_(m).div_(s) if x is not images else (x - m) / s

    def invert(self, x: torch.Tensor, *, clamp: bool = False) -> torch.Tensor:
        """Raw pixels ``x · std + mean`` of normalised images ``[..., C, H, W]``; ``clamp=True`` clips them to
        [0, 1] (for display)."""
        m, s = self._tensors(x)
        raw = x * s + m
        return raw.clamp(0, 1) if clamp else raw

    @classmethod
    def of(cls, mean: Sequence[float], std: Sequence[float]) -> Normalization:
        """``Normalization(mean, std)`` from any sequences (lists from a config, tensors)."""
        return cls(tuple(float(v) for v in mean), tuple(float(v) for v in std))


#: The training sets' per-channel normalisations (docs/method.md §Networks and recipes).
NORMALIZATIONS: dict[str, Normalization] = {
    "cifar100": Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def resolve_normalization(
    normalization: Normalization | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Normalization:
    """``normalization``, or ``Normalization(mean, std)`` from the older pair of keywords; exactly one
    of the two forms, else :class:`~igrad.errors.IgradError`."""
    if normalization is not None and (mean is not None or std is not None):
        raise IgradError("give either normalization= or mean=/std=, not both")
    if normalization is not None:
        if not isinstance(normalization, Normalization):
            raise IgradError(f"normalization must be an igrad Normalization, got {type(normalization).__name__}")
        return normalization
    if mean is None or std is None:
        raise IgradError("the model's normalisation is needed: normalization=Normalization(mean, std)")
    return Normalization.of(torch.as_tensor(mean).reshape(-1).tolist(), torch.as_tensor(std).reshape(-1).tolist())
