"""How the CAM family reads a target layer's output that is not ``[B, K, h, w]``.

A layout (:data:`igrad.models.LAYOUTS`) names the shape of a layer's output:

* ``"BCHW"``: feature maps ``[B, K, h, w]`` (CNNs);
* ``"BHWC"``: channels-last maps ``[B, h, w, K]`` (torchvision's Swin);
* ``"tokens"``: a class token then ``h·w`` patch tokens in row-major order, ``[B, 1 + h·w, K]``
  (torchvision's ViT; pytorch-grad-cam's ``vit_reshape_transform``). The grid ``h×w`` is the one with
  the input's aspect ratio (``h/w = H/W``); the class token is not part of the map.

:func:`to_bchw` gives the ``[B, K, h, w]`` view of an activation or of its gradient (the same
reshape for both); the methods that change the layer's output (Ablation-CAM) work on the output as it
is, along :func:`channel_dim`.
"""

from __future__ import annotations

import math

import torch

from ..errors import IgradError
from ..models import LAYOUTS

__all__ = ["check_layout", "channel_dim", "output_dims", "to_bchw"]


def check_layout(layout: str | None) -> str | None:
    """``layout`` when it is one of :data:`~igrad.models.LAYOUTS` (or ``None``: unknown), else an error."""
    if layout is not None and layout not in LAYOUTS:
        raise IgradError(f"layout must be one of {', '.join(repr(v) for v in LAYOUTS)} or None, got {layout!r}")
    return layout


def output_dims(layout: str) -> int:
    """How many dimensions an output of ``layout`` has (4 for maps, 3 for tokens)."""
    return 3 if layout == "tokens" else 4


def channel_dim(layout: str) -> int:
    """The dimension of the channels ``K`` in an output of ``layout``."""
    return 1 if layout == "BCHW" else -1


def _token_grid(n: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """``(h, w)`` with ``h·w = n`` and ``h/w`` the input's aspect ratio ``size``, or ``None``."""
    if n < 1:
        return None
    h = max(1, round(math.sqrt(n * size[0] / size[1])))
    if n % h or not math.isclose(h / (n // h), size[0] / size[1], rel_tol=0.25):
        return None
    return h, n // h


def to_bchw(t: torch.Tensor, layout: str, size: tuple[int, ...], what: str = "the layer") -> torch.Tensor:
    """The ``[B, K, h, w]`` view of a layer output (or its gradient) ``t`` of ``layout``, for an input
    of spatial ``size``; the class token of ``"tokens"`` is dropped. ``what`` names the layer in errors."""
    if layout == "BCHW":
        return t
    if layout == "BHWC":
        return t.permute(0, 3, 1, 2)
    grid = _token_grid(t.shape[1] - 1, (size[0], size[1]))
    if grid is None:
        raise IgradError(
            f"{what} outputs {tuple(t.shape)}: {t.shape[1]} tokens are not a class token and a patch grid "
            f"with the input's aspect ratio {size[0]}×{size[1]}; layout='tokens' needs [B, 1 + h·w, K]"
        )
    return t[:, 1:].reshape(t.shape[0], *grid, t.shape[2]).permute(0, 3, 1, 2)
