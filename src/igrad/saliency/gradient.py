"""The gradient family (docs/method.md §Saliency methods), on the core engine :func:`igrad.gradient` /
:func:`igrad.input_gradients`.

Each method has a signed attribution ``[B, C, H, W]`` (:meth:`~SaliencyMethod.attribute`), shown with a
diverging colour map; its saliency map (for display and metrics) is ``max_channel |attribution|``,
min-max normalised per image.

* ``gradient``: ``δx = ∂y_c/∂x``.
* ``guided``: ``δᴳx``, guided backpropagation (ReLU and ReLU6 rules of docs/method.md §The loss), exactly the core
engine's.
* ``smoothgrad``: ``(1/n) Σ_j δx(x + ε_j)``, ``ε_j ~ N(0, σ²)``, ``σ = 0.15 · (max x − min x)`` per image;
  the class is resolved once on the clean image; each image's noise is seeded by its own values
  (:func:`noise_seed`), so its map does not depend on the rest of its batch.
* ``guided-gradcam``: ``δᴳx ⊙ gradcam`` (Grad-CAM upsampled to ``H×W``, broadcast over channels).

Gradients use the running BatchNorm statistics (``stats="running"``) in eval mode, and refuse
non-linearities other than ReLU/ReLU6 unless named in ``allow`` (see :func:`igrad.gradient`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch
from torch import nn

from ..errors import IgradError
from ..gradients import gradient
from ..output import model_logits
from ..validate import TargetLike, positive_int, resolve_target
from .base import SaliencyMethod, finish_maps, progress_bar, register_method
from .cam import GradCAM

__all__ = ["GradientMethod", "Gradient", "Guided", "SmoothGrad", "GuidedGradCAM", "signed_map", "noise_seed"]


def signed_map(attribution: torch.Tensor) -> torch.Tensor:
    """A signed display map ``[B, H, W]`` in [-1, 1] of an attribution ``[B, C, H, W]``: at each pixel the
    channel value of largest magnitude (sign kept), divided by the image's largest magnitude (0 if all zero)."""
    idx = attribution.abs().argmax(dim=1, keepdim=True)
    m = attribution.gather(1, idx)[:, 0]
    peak = m.abs().flatten(1).amax(1)[:, None, None]
    return torch.where(peak > 0, m / torch.where(peak > 0, peak, 1.0), 0.0)


class GradientMethod(SaliencyMethod):
    """A method with a signed input attribution; its map is ``max_channel |attribution|``."""

    signed = True
    uses_layer = False

    def __init__(
        self, model: nn.Module, target_layer: nn.Module | str | None = None, *, allow: Iterable[str] = ()
    ) -> None:
        super().__init__(model, target_layer)
        self.allow = tuple(allow)

    def _raw_maps(self, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
        return self._attribute(x, target).abs().amax(dim=1)


@register_method("gradient")
class Gradient(GradientMethod):
    """The standard input gradient ``δx = ∂y_c/∂x`` (the logit, pre-softmax)."""

    def _attribute(self, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
        return gradient(self.model, x, target, allow=self.allow)


@register_method("guided")
class Guided(GradientMethod):
    """The guided-backpropagation input gradient ``δᴳx`` of docs/method.md §The loss (:func:`igrad.gradient` with
    ``guided=True``)."""

    def _attribute(self, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
        return gradient(self.model, x, target, guided=True, allow=self.allow)


@register_method("smoothgrad")
class SmoothGrad(GradientMethod):
    """SmoothGrad: the mean of ``δx`` over ``n_samples`` noisy copies ``x + ε``, ``ε ~ N(0, σ²)``,
    ``σ = noise_level · (max x_i − min x_i)`` per image (``noise_level = 0.15``).

    The copies of all images are packed into batches of ``batch_size``. Each image's noise, one
    ``[n, C, H, W]`` block, is drawn from its own ``torch.Generator`` (on ``x``'s device) seeded with
    :func:`noise_seed` ``(seed, image)``, a hash of the seed and the image's own values: an image gets the
    same noise, so the same map, alone or anywhere in any batch (``igrad explain`` and ``igrad evaluate``
    agree, whatever their batch sizes), and a call is reproducible and does not depend on ``batch_size``.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | str | None = None,
        *,
        n_samples: int = 50,
        noise_level: float = 0.15,
        batch_size: int = 64,
        seed: int = 0,
        progress: bool | None = None,
        allow: Iterable[str] = (),
    ) -> None:
        super().__init__(model, target_layer, allow=allow)
        self.n_samples = positive_int("n_samples", n_samples)
        if not noise_level >= 0:
            raise IgradError(f"noise_level must be >= 0, got {noise_level!r}")
        self.noise_level = float(noise_level)
        self.batch_size = positive_int("batch_size", batch_size)
        self.seed = int(seed)
        self.progress = progress

    def _attribute(self, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
        with torch.no_grad():
            t = resolve_target(target, model_logits(self.model, x))
        b, n = x.shape[0], self.n_samples
        sigma = self.noise_level * (x.flatten(1).amax(1) - x.flatten(1).amin(1))

        def copies() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for i in range(b):
                gen = torch.Generator(device=x.device).manual_seed(noise_seed(self.seed, x[i]))
                noise = torch.randn((n, *x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype)
                yield x[i] + sigma[i] * noise, t[i].expand(n)

        total = torch.zeros_like(x)
        owner = torch.arange(b, device=x.device).repeat_interleave(n)
        batches = (b * n + self.batch_size - 1) // self.batch_size
        done = 0
        with progress_bar(batches, "smoothgrad", self.progress) as bar:
            for xs, ts in _rebatch(copies(), self.batch_size):
                g = gradient(self.model, xs, ts, allow=self.allow)
                total.index_add_(0, owner[done : done + len(xs)], g)
                done += len(xs)
                bar.update()
        return total / n


def noise_seed(seed: int, image: torch.Tensor) -> int:
    """The seed of one image's noise: the first 8 bytes of ``blake2b(seed.to_bytes(8, "little", signed=True)
    + image bytes, digest_size=8)`` read as a little-endian integer, its top bit cleared (``< 2**63``).
    The image bytes are its values as stored in its dtype, C order, copied to the CPU. The same values give
    the same seed wherever the image sits in a batch; another image or another ``seed`` gives another."""
    h = hashlib.blake2b(int(seed).to_bytes(8, "little", signed=True), digest_size=8)
    h.update(image.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def _rebatch(
    blocks: Iterator[tuple[torch.Tensor, torch.Tensor]], size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Regroup a stream of ``(x, t)`` blocks into batches of exactly ``size`` rows (the last may be smaller)."""
    xs: list[torch.Tensor] = []
    ts: list[torch.Tensor] = []
    held = 0
    for x, t in blocks:
        while len(x):
            take = min(size - held, len(x))
            xs.append(x[:take])
            ts.append(t[:take])
            x, t, held = x[take:], t[take:], held + take
            if held == size:
                yield torch.cat(xs), torch.cat(ts)
                xs, ts, held = [], [], 0
    if held:
        yield torch.cat(xs), torch.cat(ts)


@register_method("guided-gradcam")
class GuidedGradCAM(GradCAM):
    """Guided Grad-CAM: ``δᴳx ⊙ gradcam``, with ``gradcam`` the normalised map ``[B, H, W]`` of Grad-CAM
    at the target layer broadcast over channels (its per-image scale does not change the final map)."""

    signed: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | str | None = None,
        *,
        allow: Iterable[str] = (),
        layout: str | None = None,
    ) -> None:
        super().__init__(model, target_layer, layout=layout)
        self.allow = tuple(allow)

    def _attribute(self, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
        ctx = self._forward(x, target)
        cam = finish_maps(self.layer_map(ctx), tuple(x.shape[-2:]))
        guided = gradient(self.model, x, ctx.target, guided=True, allow=self.allow)
        return guided * cam[:, None].to(guided.dtype)

    def _raw_maps(self, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
        return self._attribute(x, target).abs().amax(dim=1)
