"""The training augmentation of docs/method.md §Networks and recipes, drawn per sample and applied to a whole batch at
once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import IgradError
from ..images import to_unit

__all__ = ["augment"]


def augment(
    images: torch.Tensor,
    *,
    padding: int = 4,
    flip: bool = True,
    rotation: float = 15.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The augmentation of docs/method.md §Networks and recipes, independently per sample, on a uint8 (or uint16) batch
    ``[B, C, H, W]``;
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
        # each sample's columns, reversed where it flips, read by indexing as the crop above (torch.where has
        # no CPU kernel for uint16 in some torch versions, 2.11 among them)
        ar = torch.arange(w, device=dev)
        cols = torch.where(flips[:, None], ar.flip(0), ar)  # [B, W]
        batch = torch.arange(b, device=dev)[:, None, None]
        rows = torch.arange(h, device=dev)[None, :, None]
        x = x.permute(0, 2, 3, 1)[batch, rows, cols[:, None, :]].permute(0, 3, 1, 2)
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
