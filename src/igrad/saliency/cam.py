"""The CAM family (docs/method.md §Saliency methods): each method only computes its channel weights ``w [B, K]`` (or
its map).

Notation: ``A_k`` the k-th channel ``[h, w]`` of the target layer's activation, ``g_k = ∂y_c/∂A_k``
(the logit of the target class, pre-softmax), ``S = Σ_k w_k A_k``. Every map except ``cam`` is then
passed through ReLU (as in each method's paper and in pytorch-grad-cam), upsampled and min-max
normalised by :class:`~igrad.saliency.base.SaliencyMethod`.

Differences of definition from pytorch-grad-cam 1.5.7 (``pytorch_grad_cam``), all deliberate:

* min-max normalisation: theirs is ``(S − min) / (max − min + 1e-7)`` (twice: before their cv2 resize
  and after); ours is exact (docs/method.md §Saliency methods), 0 for a constant map. They differ by a relative
  ``1e-7/(max − min)``.
* ``gradcam++``: theirs adds ``1e-6`` to the denominator of ``a_kij`` (it matters: gradients of a
  network are often ~1e-3, so ``g² ≈ 1e-6``); ours is the formula of docs/method.md, ``eps=0`` by default
  (``GradCAMPlusPlus(eps=1e-6)`` reproduces theirs).
* ``scorecam``: theirs upsamples the masks with ``nn.UpsamplingBilinear2d`` (``align_corners=True``)
  and normalises them with ``+1e-8``; ours upsamples like every map (``align_corners=False``)
  (``ScoreCAM(mask_align_corners=True)`` reproduces theirs). They score each image's masks in
  batches of 16 (a Python loop per image); ours packs the masks of all images into full batches.
* ``ablationcam``: theirs replaces an ablated channel by 0 if the minimum of the *whole ablation batch*
  is 0, else by ``min − 1e7``; ours always zeroes it (docs/method.md). Same result for post-ReLU layers. Theirs
  re-runs the whole network for every ablation; ours runs only the layers after the target layer
  (:mod:`igrad.saliency.tracing`).
* ``cam``: not in pytorch-grad-cam; no ReLU (Zhou et al.'s class activation map is signed).

Layers whose output is not ``[B, K, h, w]`` (:mod:`igrad.saliency.layout`): ``layout="BHWC"`` (channels
last) or ``layout="tokens"`` (a vision transformer's ``[B, 1 + h·w, K]``) reads the activation and its
gradient as ``[B, K, h, w]``, as pytorch-grad-cam's ``reshape_transform`` does; torchvision's Swin and
ViT layers get theirs automatically (:func:`igrad.models.layer_layout`). Ablation-CAM zeroes channel
``k`` of the output as it is (the last dimension of ``BHWC``; every token, the class token included, as
pytorch-grad-cam's ``AblationLayerVit``). Any other output that is not 4-D is refused.

In-place operations: every network run by a method (the model, Ablation-CAM's traced head and tail,
Score-CAM's folded copy, and the checks that they reproduce the logits) gets tensors the method does not
read again (a copy where needed), so an in-place operation in the model (DenseNet's
``F.relu(..., inplace=True)`` after ``norm5``, ``x.add_(...)``) cannot alter the recorded activation,
the input or a value that bypasses the layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IgradError
from ..models import layer_layout
from ..output import model_logits
from ..precision import autocast_enabled, full_precision
from ..validate import TargetLike, positive_int, resolve_target
from .base import SaliencyMethod, constant_maps, finish_maps, progress_bar, register_method
from .layout import channel_dim, check_layout, output_dims, to_bchw
from .tracing import LayerTail, TracingError, fold_batchnorm

__all__ = [
    "CAMContext",
    "CAMMethod",
    "CAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "ScoreCAM",
    "AblationCAM",
]


def _reproduces(output: object, logits: torch.Tensor) -> bool:
    """Whether a stand-in network (a traced tail, a BatchNorm-folded copy) gives the model's own
    ``logits``: same shape, ``|out − logits| ≤ 1e-4·max(1, max|logits|) + 1e-4·|logits|``."""
    scale = max(1.0, float(logits.abs().max()))
    return (
        isinstance(output, torch.Tensor)
        and output.shape == logits.shape
        and torch.allclose(output, logits, rtol=1e-4, atol=1e-4 * scale)
    )


def _widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 where it is a narrower float (bf16, float16 under autocast), else as it is."""
    return t.float() if t.is_floating_point() and torch.finfo(t.dtype).bits < 32 else t


@dataclass
class CAMContext:
    """What a CAM method sees: the input, the target layer's activation ``A [B, K, h, w]`` (detached),
    its gradient ``g = ∂y_c/∂A`` (``None`` for gradient-free methods), the logits and the target classes;
    ``output`` is the layer's output as recorded (detached, in its ``layout``; ``A`` is a view of it)."""

    x: torch.Tensor
    activation: torch.Tensor
    gradient: torch.Tensor | None
    logits: torch.Tensor
    target: torch.Tensor
    output: torch.Tensor | None = None
    layout: str = "BCHW"

    def __post_init__(self) -> None:
        if self.output is None:  # built by hand from maps [B, K, h, w]
            self.output, self.layout = self.activation, "BCHW"

    @property
    def grad(self) -> torch.Tensor:
        """``gradient``, for the methods that need it (an error where the method was run without it)."""
        if self.gradient is None:
            raise IgradError("this CAM method needs the target layer's gradient; the context has none")
        return self.gradient

    @property
    def recorded(self) -> torch.Tensor:
        """``output`` (set by :meth:`__post_init__` when not given)."""
        assert self.output is not None
        return self.output


class CAMMethod(SaliencyMethod):
    """A class-activation-map method on a target layer (torch-cam style).

    Owns one forward hook on the target layer that records its output during the method's own forward
    pass (and hands a copy downstream, so that an in-place operation after the layer, e.g.
    DenseNet's ``F.relu(..., inplace=True)``, cannot alter the recorded activation). Subclasses
    implement :meth:`weights` ``(ctx) -> [B, K]``, or :meth:`cam` for maps that are not
    ``Σ_k w_k A_k``.

    ``layout``: how the layer lays out its output (``"BCHW"``, ``"BHWC"``, ``"tokens"``; see
    :mod:`igrad.saliency.layout`); ``None`` takes the model's known layout
    (:func:`igrad.models.layer_layout`), else a 4-D output is read as ``[B, K, h, w]`` and any other is
    refused.
    """

    #: the method needs ``g = ∂y_c/∂A`` (one backward pass)
    layer: nn.Module  # a CAM method always has a target layer
    layer_name: str
    needs_gradient: ClassVar[bool] = True
    #: the map goes through ReLU before upsampling
    relu: ClassVar[bool] = True

    def __init__(
        self, model: nn.Module, target_layer: nn.Module | str | None = None, *, layout: str | None = None
    ) -> None:
        super().__init__(model, target_layer)
        self.layout = check_layout(layout) if layout is not None else layer_layout(self.model, self.layer_name)
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._recording = False
        self._recorded: list[torch.Tensor] = []
        self._warned_single_pixel = False

    def _attach(self) -> None:
        self._handle = self.layer.register_forward_hook(self._hook)

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._clear()

    def _clear(self) -> None:
        self._recorded = []
        self._recording = False

    def _hook(self, module: nn.Module, inputs: object, output: object) -> torch.Tensor | None:
        if not self._recording:
            return None
        layout = self.layout or "BCHW"
        if not isinstance(output, torch.Tensor) or output.dim() != output_dims(layout):
            raise IgradError(self._layout_error(output))
        self._recorded.append(output)
        return output.clone()

    def _layout_error(self, output: object) -> str:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        what = f"target layer {self.layer_name!r} must output"
        if self.layout is not None:
            form = "[B, 1 + h·w, K] tokens" if self.layout == "tokens" else "4-D maps"
            return f"{what} {form} for layout={self.layout!r}, got {shape}"
        return (
            f"{what} feature maps [B, K, h, w] for {self.name}, got {shape}: pass layout='BHWC' (channels-last "
            "[B, h, w, K]) or layout='tokens' (a class token and h·w patch tokens, [B, 1 + h·w, K]) when the "
            "output is one of those, or choose a convolutional target layer"
        )

    def _forward(self, x: torch.Tensor, target: TargetLike) -> CAMContext:
        """One forward (and, if needed, one backward to the target layer) for the whole batch."""
        self._recorded = []
        self._recording = True
        try:
            with torch.enable_grad() if self.needs_gradient else torch.no_grad():
                # a copy (not a leaf): the model may change its input in place; ctx.x stays as given
                logits = model_logits(self.model, x.detach().requires_grad_(self.needs_gradient).clone())
        finally:
            self._recording = False
        if len(self._recorded) != 1:
            what = "not called" if not self._recorded else f"called {len(self._recorded)} times"
            raise IgradError(
                f"target layer {self.layer_name!r} was {what} in the forward pass; choose a layer that runs once"
            )
        act = self._recorded[0]
        t = resolve_target(target, logits)
        grad = None
        if self.needs_gradient:
            with torch.enable_grad():  # also when called under an outer torch.no_grad()
                score = logits.gather(1, t[:, None]).sum()  # samples are independent in eval mode
                if score.requires_grad and act.requires_grad:
                    (grad,) = torch.autograd.grad(score, act, allow_unused=True)
            if grad is None:  # e.g. act.detach(), or the layer run under torch.no_grad() inside forward
                raise IgradError(
                    f"the logits do not depend on the output of target layer {self.layer_name!r} through autograd: "
                    f"the forward of {type(self.model).__name__} cuts the graph there (a .detach(), a block under "
                    "torch.no_grad() or torch.inference_mode()), so its gradient cannot be taken; remove the cut "
                    "from forward, or use a method without gradients (scorecam, ablationcam)"
                )
        layout, size, what = self.layout or "BCHW", tuple(x.shape[-2:]), f"target layer {self.layer_name!r}"
        # the weights and maps are computed in float32 (or the model's float64) also under bf16 autocast
        a = _widened(to_bchw(act.detach(), layout, size, what))
        g = None if grad is None else _widened(to_bchw(grad, layout, size, what))
        self._warn_single_pixel(a, size)
        return CAMContext(x.detach(), a, g, logits.detach(), t, act.detach(), layout)

    def _warn_single_pixel(self, activation: torch.Tensor, size: tuple[int, ...]) -> None:
        """Warn (once per method object) when the target layer's maps are 1×1: every map ``Σ_k w_k A_k`` is
        then constant, and constant maps are 0 (docs/method.md §Saliency methods), whatever the image."""
        if self._warned_single_pixel or activation.shape[-2:].numel() != 1:
            return
        self._warned_single_pixel = True
        warnings.warn(
            f"{self.name}: target layer {self.layer_name!r} outputs 1×1 maps for {size[0]}×{size[1]} inputs, so "
            "every map is constant and given as 0 (blank); choose an earlier layer with a spatial output "
            "(target_layer=...) or give larger images",
            stacklevel=6,  # the caller of the method
        )

    def _reference(self, ctx: CAMContext) -> CAMContext:
        """``ctx`` with float32 logits and activation, for the checks that a stand-in network (the linear head
        of CAM, a traced tail, a BatchNorm-folded copy) computes the model's function: ``ctx`` itself, or,
        under bf16 autocast (whose rounding is no evidence either way), a forward of ``ctx.x`` with autocast
        off. Run the check itself under :func:`igrad.precision.full_precision`."""
        if not autocast_enabled(ctx.x.device):
            return ctx
        with full_precision(ctx.x.device):
            return self._forward(ctx.x, ctx.target)

    def _raw_maps(self, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
        return self.layer_map(self._forward(x, target))

    def layer_map(self, ctx: CAMContext) -> torch.Tensor:
        """The raw map at the layer's resolution: :meth:`cam`, through ReLU where the method uses one."""
        cam = self.cam(ctx)
        return F.relu(cam) if self.relu else cam

    def cam(self, ctx: CAMContext) -> torch.Tensor:
        """The map at the layer's resolution, ``S = Σ_k w_k A_k``, ``[B, h, w]``."""
        w = self.weights(ctx)
        with full_precision(ctx.x.device):  # float32 also under autocast, which would run einsum in bf16
            return torch.einsum("bk,bkhw->bhw", w.to(ctx.activation.dtype), ctx.activation)

    def weights(self, ctx: CAMContext) -> torch.Tensor:
        """Channel weights ``[B, K]``."""
        raise NotImplementedError


@register_method("cam")
class CAM(CAMMethod):
    """CAM (Zhou et al. 2016): ``S = Σ_k w_{c,k} A_k`` with ``w`` the linear head that follows global
    average pooling of the target layer. No ReLU (the map is signed before normalisation).

    Refused, with an :class:`IgradError`, unless the logits equal ``W · mean_ij(A) + b`` for a linear
    layer of the model with ``K`` inputs (checked numerically on every batch).
    """

    needs_gradient = False
    relu = False

    def weights(self, ctx: CAMContext) -> torch.Tensor:
        ref = self._reference(ctx)
        a, logits = ref.activation, ref.logits
        k = a.shape[1]
        heads = [m for m in self.model.modules() if isinstance(m, nn.Linear) and m.in_features == k]
        why = f"no nn.Linear with {k} inputs follows it"
        for head in reversed(heads):
            if head.out_features != logits.shape[1]:
                continue
            with full_precision(a.device):
                predicted = F.linear(a.mean(dim=(2, 3)), head.weight, head.bias)
            if _reproduces(predicted, logits):
                return head.weight.detach()[ctx.target]
            why = "the logits are not a linear function of its global average pool"
        raise IgradError(
            f"cam needs a model whose target layer ({self.layer_name!r}) is followed by global average pooling and "
            f"one linear layer (CAM, Zhou et al.); in {type(self.model).__name__} {why}. Use gradcam instead."
        )


@register_method("gradcam")
class GradCAM(CAMMethod):
    """Grad-CAM: ``α_k = mean_ij g_kij``, ``S = ReLU(Σ_k α_k A_k)``."""

    def weights(self, ctx: CAMContext) -> torch.Tensor:
        return ctx.grad.mean(dim=(2, 3))


@register_method("gradcam++")
class GradCAMPlusPlus(CAMMethod):
    """Grad-CAM++: ``a_kij = g² / (2g² + (Σ_ij A_k) g³ + eps)`` (0 where ``g = 0`` or the denominator is
    0), ``w_k = Σ_ij a_kij ReLU(g_kij)``, ``S = ReLU(Σ_k w_k A_k)``. ``eps=0`` is the formula of docs/method.md;
    ``eps=1e-6`` is pytorch-grad-cam's."""

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | str | None = None,
        *,
        eps: float = 0.0,
        layout: str | None = None,
    ) -> None:
        super().__init__(model, target_layer, layout=layout)
        self.eps = float(eps)

    def weights(self, ctx: CAMContext) -> torch.Tensor:
        a, g = ctx.activation, ctx.grad
        g2 = g * g
        denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * g + self.eps
        ok = (g != 0) & (denom != 0)
        aij = torch.where(ok, g2 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(g))
        return (aij * F.relu(g)).sum(dim=(2, 3))


@register_method("xgradcam")
class XGradCAM(CAMMethod):
    """XGrad-CAM: ``w_k = Σ_ij (A_kij / (Σ_ij A_kij + ε)) g_kij``, ``ε = 1e-7``, ``S = ReLU(Σ_k w_k A_k)``."""

    eps: ClassVar[float] = 1e-7

    def weights(self, ctx: CAMContext) -> torch.Tensor:
        a, g = ctx.activation, ctx.grad
        return (a * g).sum(dim=(2, 3)) / (a.sum(dim=(2, 3)) + self.eps)


@register_method("layercam")
class LayerCAM(CAMMethod):
    """LayerCAM: ``S = ReLU(Σ_k ReLU(g_k) ⊙ A_k)`` (element-wise weights)."""

    def cam(self, ctx: CAMContext) -> torch.Tensor:
        return (F.relu(ctx.grad) * ctx.activation).sum(dim=1)


@register_method("scorecam")
class ScoreCAM(CAMMethod):
    """Score-CAM: ``M_k`` = ``A_k`` upsampled to ``H×W`` and min-max normalised (0 if ``A_k`` is constant
    before upsampling, :func:`~igrad.saliency.base.constant_maps`),
    ``s_k = y_c(x ⊙ M_k)`` (the logit, on the model's normalised input), ``w = softmax_k(s)``,
    ``S = ReLU(Σ_k w_k A_k)``.

    All ``B·K`` masked images of a call are packed into forward batches of ``batch_size``. A constant
    channel gives ``M_k = 0`` and ``x ⊙ M_k = 0`` for every image, so those share one forward of a
    zero image (exact). ``mask_align_corners=True`` upsamples the masks like pytorch-grad-cam.

    ``fold_batchnorm`` scores the masked images with a copy of the model whose eval-mode BatchNorm
    layers are folded into the preceding convolutions (:func:`~igrad.saliency.tracing.fold_batchnorm`:
    the same function up to float rounding, one pass less per layer). The copy is used only after it
    reproduces the call's own logits (``rtol = 1e-4``); it is kept while the method's hooks are held
    (a ``with`` block), checked against the call's logits again on every call (one forward of the
    batch, next to the ``B·K`` masked ones) and rebuilt when it no longer reproduces them, so a weight
    changed in any way (an optimiser step, an EMA update through ``p.data``) is never scored stale.
    Where the model cannot be traced or the copy disagrees, the model itself runs (with a warning).
    ``None`` (default): fold when a call has at
    least :attr:`fold_min_forwards` masked images (building the copy costs about as much as a few
    dozen forwards of a small network) or a copy is already held; ``True``: always; ``False``: never.
    """

    needs_gradient = False

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | str | None = None,
        *,
        batch_size: int = 64,
        mask_align_corners: bool = False,
        fold_batchnorm: bool | None = None,
        progress: bool | None = None,
        layout: str | None = None,
    ) -> None:
        super().__init__(model, target_layer, layout=layout)
        self.batch_size = positive_int("batch_size", batch_size)
        self.mask_align_corners = bool(mask_align_corners)
        self.fold_batchnorm = None if fold_batchnorm is None else bool(fold_batchnorm)
        self.progress = progress
        self._folded: nn.Module | None = None
        self._fold_failed: str | None = None

    #: with ``fold_batchnorm=None``, fold only for calls with at least this many masked images
    fold_min_forwards: ClassVar[int] = 1024

    def scorer(self, ctx: CAMContext, forwards: int) -> nn.Module:
        """The network that scores the ``forwards`` masked images: the BatchNorm-folded copy when
        folding is on (or worth it, see ``fold_batchnorm``), the copy can be built and it reproduces
        ``ctx.logits``; otherwise the model. A held copy is checked the same way on every call and
        rebuilt when it no longer reproduces them: the model's weights may have changed in ways no
        version counter records (``p.data`` writes, an EMA update)."""
        if self.fold_batchnorm is False or self._fold_failed is not None:
            return self.model
        if self._folded is not None:
            if self._computes_model(self._folded, ctx):
                return self._folded
            self._folded = None  # stale: rebuilt below
        elif self.fold_batchnorm is None and forwards < self.fold_min_forwards:
            return self.model
        try:
            folded = fold_batchnorm(self.model)
            if not self._computes_model(folded, ctx):
                raise TracingError("the copy with BatchNorm folded into the convolutions does not reproduce the logits")
        except TracingError as exc:
            self._fold_failed = str(exc)
            warnings.warn(f"scorecam: {exc}; scoring with the model as is", stacklevel=4)
            return self.model
        self._folded = folded
        return folded

    def _computes_model(self, folded: nn.Module, ctx: CAMContext) -> bool:
        """Whether ``folded`` gives the model's logits on the call's images (in float32, also under autocast)."""
        ref = self._reference(ctx)
        with torch.inference_mode(), full_precision(ctx.x.device):
            reproduced = folded(ctx.x.clone())  # the copy may change its input in place
        return _reproduces(reproduced, ref.logits)

    def _detach(self) -> None:
        super()._detach()
        self._folded = None  # the copy's weights are released with the hooks

    def masks(self, activation: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """``M [n, H, W]`` for activation channels ``[n, h, w]``: upsampled, then min-max per mask; 0 for a
        channel that is constant before upsampling (:func:`~igrad.saliency.base.finish_maps`)."""
        return finish_maps(activation, size, align_corners=self.mask_align_corners)

    def weights(self, ctx: CAMContext) -> torch.Tensor:
        x, a, t = ctx.x, ctx.activation, ctx.target
        b, k = a.shape[:2]
        size = tuple(x.shape[-2:])
        constant = constant_maps(a.flatten(0, 1)).view(b, k)  # the channels whose masks are 0
        scores = torch.empty(b, k, dtype=torch.float32, device=x.device)
        rows = (~constant).flatten().nonzero()[:, 0]
        batches = (len(rows) + self.batch_size - 1) // self.batch_size
        net = self.scorer(ctx, len(rows))
        with torch.inference_mode(), progress_bar(batches + bool(constant.any()), "scorecam", self.progress) as bar:
            if constant.any():
                zero = model_logits(net, torch.zeros_like(x[:1]), probabilities=False)[0].float()
                scores[constant] = zero[t[:, None].expand(b, k)[constant]]
                bar.update()
            for start in range(0, len(rows), self.batch_size):
                r = rows[start : start + self.batch_size]
                img, ch = r // k, r % k
                with full_precision(x.device):  # the masks in float32 (a is); the scoring forward under autocast
                    masked = x[img] * self.masks(a[img, ch], size)[:, None].to(x.dtype)
                # channels-last: the layout CPU convolution kernels run fastest (same values)
                masked = masked.contiguous(memory_format=torch.channels_last)
                logits = model_logits(net, masked, probabilities=False)
                scores.view(-1)[r] = logits.gather(1, t[img, None])[:, 0].float()
                bar.update()
        return torch.softmax(scores, dim=1)


@register_method("ablationcam")
class AblationCAM(CAMMethod):
    """Ablation-CAM: ``w_k = (y_c − y_c^(k)) / y_c``, ``y_c^(k)`` the logit with channel ``k`` of the
    target layer's output set to 0, ``S = ReLU(Σ_k w_k A_k)``.

    Only the layers *after* the target layer run for the ablations: the model is cut at the layer
    with ``torch.fx`` (:class:`~igrad.saliency.tracing.LayerTail`), and the ``B·K`` ablated copies of the
    recorded activation go through the tail in batches of ``batch_size``. A channel that is already all
    zero cannot change the logit, so its weight is 0 without a forward. Where the model cannot be
    traced (data-dependent Python control flow) or the traced tail does not reproduce the logits, it
    falls back, with a warning, to running the whole model with a forward hook that replaces the
    layer's output by the ablated copies (correct, but as slow as pytorch-grad-cam).
    ``y_c = 0`` is replaced by the smallest normal float of its sign.
    """

    needs_gradient = False

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | str | None = None,
        *,
        batch_size: int = 256,
        progress: bool | None = None,
        layout: str | None = None,
    ) -> None:
        super().__init__(model, target_layer, layout=layout)
        self.batch_size = positive_int("batch_size", batch_size)
        self.progress = progress
        self._tail: LayerTail | None = None
        self._tail_failed: str | None = None

    def traced_tail(self) -> LayerTail | None:
        """The model cut at the target layer (traced once, cached), or ``None`` where it cannot be."""
        if self._tail is None and self._tail_failed is None:
            try:
                self._tail = LayerTail(self.model, self.layer_name)
            except TracingError as exc:
                self._tail_failed = str(exc)
                warnings.warn(
                    f"ablationcam: {exc}; re-running the whole network for every ablation (slow)", stacklevel=3
                )
        return self._tail

    def weights(self, ctx: CAMContext) -> torch.Tensor:
        # ablate the layer's output as it is laid out (channels along channel_dim), then run the tail on it
        out, t, cdim = ctx.recorded, ctx.target, channel_dim(ctx.layout)
        b, k = out.shape[0], out.shape[cdim]
        y = ctx.logits.gather(1, t[:, None])[:, 0].float()
        run = self._tail_runner(ctx)
        scores = y[:, None].expand(b, k).clone()  # a channel that is all zero: ablating it changes nothing
        rows = (out.movedim(cdim, 1).flatten(2) != 0).any(2).flatten().nonzero()[:, 0]
        batches = (len(rows) + self.batch_size - 1) // self.batch_size
        with torch.inference_mode(), progress_bar(batches, "ablationcam", self.progress) as bar:
            for start in range(0, len(rows), self.batch_size):
                r = rows[start : start + self.batch_size]
                img, ch = r // k, r % k
                ablated = out[img]  # a new tensor (index by a tensor): the tail may change it in place
                ablated.movedim(cdim, 1)[torch.arange(len(r), device=out.device), ch] = 0
                scores.view(-1)[r] = run(img, ablated).gather(1, t[img, None])[:, 0].float()
                bar.update()
        tiny = torch.finfo(y.dtype).tiny
        denom = torch.where(y == 0, torch.full_like(y, tiny), y)
        return (y[:, None] - scores) / denom[:, None]

    def _tail_runner(self, ctx: CAMContext) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``run(img, ablated) -> logits``: the logits for ablated activations of images ``img``. The traced
        tail is used only when it reproduces the call's logits (checked on every call); a tail held from an
        earlier call that no longer does (a module of the model replaced since it was traced) is traced
        again once before falling back to whole-network runs."""
        held = self._tail is not None
        traced = self.traced_tail()
        while traced is not None:
            try:
                extra = self._check_tail(traced, ctx)
            except TracingError as exc:
                self._tail = None
                if held:  # traced before this call: trace the model as it is now
                    held, traced = False, self.traced_tail()
                    continue
                warnings.warn(
                    f"ablationcam: {exc}; re-running the whole network for every ablation (slow)", stacklevel=3
                )
                self._tail_failed = str(exc)
                break
            tail = traced.tail
            return lambda img, ablated: tail(ablated, *[e[img] for e in extra])  # e[img]: a new tensor
        return lambda img, ablated: self._replace_run(ctx.x[img], ablated)

    def _check_tail(self, traced: LayerTail, ctx: CAMContext) -> list[torch.Tensor]:
        """The values ``traced`` needs besides the activation, for ``ctx.x``, once it is checked to reproduce
        the call's logits (in float32, also under autocast); :class:`TracingError` where it does not."""
        ref = self._reference(ctx)  # the check in float32; the ablations in the call's precision
        with torch.inference_mode():  # copies: head and tail may change their inputs in place
            with full_precision(ctx.x.device):
                extra = traced.externals(ref.x.clone())
                reproduced = traced.tail(ref.recorded.clone(), *[e.clone() for e in extra])
            if ref is not ctx:
                extra = traced.externals(ctx.x.clone())
        if not _reproduces(reproduced, ref.logits):
            raise TracingError(f"the traced tail after {self.layer_name!r} does not reproduce the logits")
        return extra

    def _replace_run(self, x: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
        """The whole model on ``x`` with the target layer's output replaced by ``ablated``."""
        handle = self.layer.register_forward_hook(lambda m, i, o: ablated)
        try:
            return model_logits(self.model, x, probabilities=False)
        finally:
            handle.remove()
