"""The saliency base class, its registry, and the steps every method shares (docs/method.md §Saliency methods).

Every method is called the same way:

    with create_method("gradcam", model) as m:
        maps = m(x, target)        # float [B, H, W] in [0, 1] at the input resolution

``x`` is the model's (normalised) input ``[B, C, H, W]``; ``target`` is as in :func:`igrad.gradient`
(``None``: each sample's arg-max class; an ``int``; one class per sample). A method computes a raw map
per sample (at the target layer's resolution for the CAM family), which the base class then
upsamples bilinearly to ``H×W`` (``align_corners=False``, as OpenCV's ``INTER_LINEAR``) and min-max
normalises per image, ``S ← (S − min S) / (max S − min S)``. A constant map (e.g. all zero, or any map of a
1×1 layer) gives 0: constancy is decided on the raw map, before upsampling (:func:`constant_maps`), since
bilinear upsampling of a constant is not exactly constant and normalising its rounding would stretch it
into speckle.

While a call runs the model is in eval mode (maps describe the model as it is used); every module's
``training`` flag is restored afterwards, also when the call raises. A call inside
``torch.inference_mode()`` gives the same maps as outside it (the call leaves inference mode and copies
``x`` out of it). A model that runs as TorchScript is refused (:func:`igrad.models.refuse_scripted`):
hooks and backward rules cannot see inside it; a submodule compiled with ``torch.compile`` runs its eager
forward for the call. The model must return logits ``[B, num_classes]``; every forward goes through
:func:`igrad.output.model_logits`, which refuses other outputs and probability-valued ones with a clear
error (see :class:`igrad.LogitsOutput`).
Hooks are owned by the method: registered on ``__enter__`` (or for the duration of one call when used
without ``with``) and removed on ``__exit__``, also on error.

A wrapped model (``DataParallel``, ``DistributedDataParallel``, ``torch.compile``, SWA's
``AveragedModel``; :func:`igrad.models.unwrap_model`) is seen through: the method hooks, traces and runs
the network inside (same maps, and no replicas or recompilation), and a target layer may be named in
either (``"module.layer4"`` or ``"layer4"``).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IgradError, unknown_name
from ..models import default_target_layer, inner_name, refuse_scripted, unwrap_model
from ..torch_utils import autograd_mode, autograd_ready, eager_compiled, eval_mode
from ..validate import TargetLike, check_images, parse_names

__all__ = [
    "METHODS",
    "SaliencyMethod",
    "create_method",
    "register_method",
    "resolve_methods",
    "normalize_maps",
    "constant_maps",
    "CONSTANT_ULPS",
    "upsample",
    "finish_maps",
    "resolve_layer",
    "progress_bar",
]

#: Saliency methods by name, in the order of docs/method.md §Saliency methods (feeds the CLI's choices).
METHODS: dict[str, type[SaliencyMethod]] = {}


def register_method(name: str) -> Callable[[type[SaliencyMethod]], type[SaliencyMethod]]:
    """Class decorator: register a :class:`SaliencyMethod` subclass under ``name``."""

    def deco(cls: type[SaliencyMethod]) -> type[SaliencyMethod]:
        if name in METHODS:
            raise IgradError(f"saliency method {name!r} is already registered")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def resolve_methods(spec: str | Iterable[str]) -> list[str]:
    """Saliency method names from ``"all"``, a comma-separated string or a sequence (:data:`METHODS`, in its
    order; :func:`igrad.validate.parse_names`); unknown names raise."""
    return parse_names(spec, METHODS, "saliency method")


def create_method(
    name: str, model: nn.Module, target_layer: nn.Module | str | None = None, **kwargs: Any
) -> SaliencyMethod:
    """Build the saliency method ``name`` for ``model``.

    ``target_layer``: a module of ``model`` or its dotted name; ``None`` takes
    :func:`igrad.default_target_layer` (CAM family) and must stay ``None`` for the methods that use no
    layer (``gradient``, ``guided``, ``smoothgrad``). Other keyword arguments go to the method (e.g.
    ``batch_size`` for ``scorecam``, ``ablationcam`` and ``smoothgrad``).
    """
    if name not in METHODS:
        raise unknown_name("saliency method", name, METHODS)
    cls = METHODS[name]
    try:
        inspect.signature(cls).bind(model, target_layer, **kwargs)
    except TypeError as exc:
        options = [p for p in inspect.signature(cls).parameters if p not in ("model", "target_layer")]
        raise IgradError(
            f"bad arguments for saliency method {name!r}: {exc}; its options: {', '.join(options) or 'none'}"
        ) from exc
    return cls(model, target_layer, **kwargs)


# -- shared steps ------------------------------------------------------------------------------------


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation of ``[B, H, W]`` maps to [0, 1]: ``(S − min S) / (max S − min S)``,
    and 0 where the map is constant (an all-zero map stays 0)."""
    flat = maps.flatten(1)
    lo = flat.amin(dim=1)
    span = flat.amax(dim=1) - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = (maps - lo[:, None, None]) / safe[:, None, None]
    return torch.where(span[:, None, None] > 0, out, torch.zeros_like(out))


def upsample(maps: torch.Tensor, size: tuple[int, ...], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of ``[B, h, w]`` maps to ``size`` (``align_corners=False`` equals OpenCV's
    ``cv2.resize(..., INTER_LINEAR)``, which pytorch-grad-cam uses); a no-op at equal size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=align_corners)[:, 0]


#: A raw map counts as constant when its span is at most this many units of rounding of its magnitude.
CONSTANT_ULPS = 4


def constant_maps(raw: torch.Tensor) -> torch.Tensor:
    """Which of the raw maps ``[B, ...]`` are constant, ``[B]`` bool: ``max S − min S ≤ CONSTANT_ULPS · eps ·
    max |S|`` per map, ``eps`` the machine epsilon of ``raw``'s dtype (float32: 1.2e-7). A span within a few
    roundings of the map's magnitude is arithmetic noise of a map that is constant in exact arithmetic
    (a weighted sum of constant channels, say); an all-zero map has span 0 and is constant."""
    flat = raw.detach().flatten(1)
    hi, lo = flat.amax(dim=1), flat.amin(dim=1)
    magnitude = torch.maximum(hi.abs(), lo.abs())
    eps = torch.finfo(raw.dtype).eps if raw.is_floating_point() else 0.0
    return (hi - lo) <= CONSTANT_ULPS * eps * magnitude


def finish_maps(raw: torch.Tensor, size: tuple[int, ...], *, align_corners: bool = False) -> torch.Tensor:
    r"""Raw maps ``[B, h, w]`` as every method returns them: :func:`upsample`\ d to ``size``, then
    :func:`normalize_maps` (per-image min-max to [0, 1]), ``[B, *size]`` in float32 (float64 for float64
    maps). A map that is constant *before* upsampling (:func:`constant_maps`, in ``raw``'s own dtype)
    gives 0, so that the rounding of the interpolation (a relative ~1e-7) is never stretched to [0, 1]."""
    constant = constant_maps(raw)
    out = normalize_maps(upsample(raw.to(torch.promote_types(raw.dtype, torch.float32)), size, align_corners))
    return torch.where(constant[:, None, None], torch.zeros_like(out), out)


def resolve_layer(model: nn.Module, layer: nn.Module | str | None) -> tuple[nn.Module, str]:
    """``(module, dotted name)`` of a target layer given as a module of ``model``, a dotted name (integer
    parts index ``nn.Sequential``/``nn.ModuleList``), or ``None`` for the model's default layer.

    A wrapped model is seen through (:func:`igrad.models.unwrap_model`): the name may be given in the
    wrapper (``"module.layer4"``) or in the network inside (``"layer4"``); the name returned is the latter."""
    wrapper, model = model, unwrap_model(model)
    if layer is None:
        layer = default_target_layer(model)
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(layer, nn.Module):
        if id(layer) not in names:
            raise IgradError(f"the target layer {type(layer).__name__} is not a module of {type(model).__name__}")
        return layer, names[id(layer)]
    if not isinstance(layer, str):
        raise IgradError(f"target_layer must be a module, a dotted name or None, got {type(layer).__name__}")
    layer = inner_name(wrapper, layer)
    module: nn.Module = model
    for part in layer.split(".") if layer else []:
        child = module._modules.get(part)
        if child is None and isinstance(module, nn.Sequential | nn.ModuleList) and part.lstrip("-").isdigit():
            with contextlib.suppress(IndexError):
                child = module[int(part)]
        if child is None:
            known = [n for n in names.values() if n]
            close = difflib.get_close_matches(layer, known, n=5, cutoff=0.6)
            hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
            top = ", ".join(repr(n) for n, _ in model.named_children())
            raise IgradError(
                f"{type(model).__name__} has no target layer {layer!r}.{hint} "
                f"Its top-level modules: {top} (see model.named_modules() for all)."
            )
        module = child
    return module, names.get(id(module), layer)


def progress_bar(total: int, desc: str, progress: bool | None) -> Any:
    """A tqdm bar over ``total`` batches: ``progress=None`` shows it only on a terminal and when
    there is more than one batch; ``True``/``False`` force it on/off."""
    from tqdm import tqdm

    disable: bool | None = not progress if progress is not None else (None if total > 1 else True)
    return tqdm(total=total, desc=desc, unit="batch", disable=disable, leave=False)


# -- the base class ----------------------------------------------------------------------------------


class SaliencyMethod:
    """Base of every saliency method: call shape, checks, hook ownership, eval mode, normalisation.

    Subclasses implement :meth:`_raw_maps` ``(x, target) -> [B, h, w]`` (any resolution) and, when they
    hook a layer, :meth:`_attach` / :meth:`_detach`. ``signed`` methods (the gradient family) also
    give a signed attribution ``[B, C, H, W]`` through :meth:`attribute`.
    """

    name: ClassVar[str] = ""
    #: the method has a signed per-pixel attribution (shown with a diverging colour map)
    signed: ClassVar[bool] = False
    #: the method reads a target layer
    uses_layer: ClassVar[bool] = True

    def __init__(self, model: nn.Module, target_layer: nn.Module | str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise IgradError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        refuse_scripted(model, f"saliency method {self.name!r}")
        self.model = unwrap_model(model)  # the network inside DataParallel, torch.compile, ...
        self.layer: nn.Module | None
        self.layer_name: str | None
        if self.uses_layer:
            self.layer, self.layer_name = resolve_layer(model, target_layer)
        elif target_layer is not None:
            raise IgradError(f"saliency method {self.name!r} uses no target layer; leave target_layer as None")
        else:
            self.layer, self.layer_name = None, None
        self._depth = 0  # nesting of with-blocks / calls that hold the hooks

    def __repr__(self) -> str:
        layer = f", layer={self.layer_name!r}" if self.layer_name is not None else ""
        return f"{type(self).__name__}({type(self.model).__name__}{layer})"

    # -- hook ownership ------------------------------------------------------------------------------
    def __enter__(self) -> SaliencyMethod:
        if self._depth == 0:
            self._attach()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._detach()

    def _attach(self) -> None:
        """Register the hooks this method needs (none by default)."""

    def _detach(self) -> None:
        """Remove every hook registered by :meth:`_attach`."""

    def _clear(self) -> None:
        """Drop per-call state (cached activations, gradients)."""

    # -- calls ---------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, target: TargetLike = None) -> torch.Tensor:
        """Saliency maps ``[B, H, W]`` in [0, 1] (float32): the raw maps, upsampled and min-max normalised
        (:func:`finish_maps`; a constant raw map gives 0)."""
        return finish_maps(self._run(self._raw_maps, x, target).detach(), tuple(x.shape[-2:])).float()

    def attribute(self, x: torch.Tensor, target: TargetLike = None) -> torch.Tensor:
        """The signed attribution ``[B, C, H, W]`` (only for ``signed`` methods)."""
        if not self.signed:
            raise IgradError(f"saliency method {self.name!r} has no signed attribution; call it for its maps")
        return self._run(self._attribute, x, target).detach()

    def _run(self, fn: Callable[[torch.Tensor, TargetLike], torch.Tensor], x: torch.Tensor, target: TargetLike):
        check_images(x)  # the channel count is the model's to check (its error gets a note naming x's shape)
        # a caller's torch.inference_mode() (a validation step) is left for the call, with x copied out of
        # it, so that the maps are the same inside it as outside; gradients are recorded where a method asks
        # eager_compiled: a compiled submodule runs its Python forward, so that hooks inside it fire
        with self, eval_mode(self.model), autograd_mode(grad=False), eager_compiled():
            try:
                return fn(autograd_ready(x), target)
            finally:
                self._clear()

    def _raw_maps(self, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
        raise NotImplementedError

    def _attribute(self, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
        raise NotImplementedError
