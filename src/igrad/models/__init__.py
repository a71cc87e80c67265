"""Networks behind one registry (timm style): ``create_model(name, num_classes=..., **kw)``.

* ``cifar_resnet18``: CIFAR ResNet-18 (SPEC 2): 3×3 stride-1 stem, no max-pool, basic blocks
  [2, 2, 2, 2] of widths 64·w, 128·w, 256·w, 512·w, global average pool, linear head.
* ``cifar_mobilenet_v2``: torchvision's MobileNet-V2 (ReLU6, the standard inverted-residual table)
  adapted to 32×32 inputs: stem stride 1 and stride 1 in the second stage.
* ``tv:<name>``: any torchvision classification model (``tv:resnet50``, ``tv:densenet121``, ...), with
  ``weights=`` passed to torchvision (fine-tuning: the head is replaced when ``num_classes`` differs).

Every model carries ``igrad_target_layer``, the dotted name of its default saliency target layer
(SPEC 3: the last convolutional stage); :func:`default_target_layer` reads it, with a fallback for
models built elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import IgradError, unknown_name

__all__ = ["register_model", "create_model", "list_models", "default_target_layer", "MODELS"]

ModelFn = Callable[..., nn.Module]
MODELS: dict[str, ModelFn] = {}
TORCHVISION_PREFIX = "tv:"


def register_model(name: str) -> Callable[[ModelFn], ModelFn]:
    """Decorator: register ``fn(num_classes=..., **kw) -> nn.Module`` under ``name``."""

    def deco(fn: ModelFn) -> ModelFn:
        if name in MODELS:
            raise IgradError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return deco


def list_models(torchvision: bool = False) -> list[str]:
    """Registered model names; with ``torchvision=True`` also every ``tv:<name>`` classification model."""
    names = sorted(MODELS)
    if torchvision:
        from torchvision.models import list_models as tv_list

        names += [TORCHVISION_PREFIX + n for n in tv_list(module=__import__("torchvision").models)]
    return names


def create_model(name: str, num_classes: int = 100, **kwargs: Any) -> nn.Module:
    """Build a registered model (or ``tv:<torchvision name>``) with ``num_classes`` outputs."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise IgradError(f"num_classes must be a positive integer, got {num_classes!r}")
    if name.startswith(TORCHVISION_PREFIX):
        from .tv import create_torchvision_model

        return create_torchvision_model(name[len(TORCHVISION_PREFIX) :], num_classes=num_classes, **kwargs)
    if name not in MODELS:
        raise unknown_name("model", name, [*MODELS, "tv:<torchvision name>"])
    try:
        model = MODELS[name](num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise IgradError(f"bad arguments for model {name!r}: {exc}") from exc
    return model


def default_target_layer(model: nn.Module) -> str:
    """Dotted name of the default saliency target layer (SPEC 3: the last convolutional stage).

    Uses the model's ``igrad_target_layer`` when set (every model from :func:`create_model`), else
    the torchvision conventions (``layer4`` for ResNets, the last block of ``features`` otherwise),
    else the top-level child that holds the last ``Conv2d``.
    """
    name = getattr(model, "igrad_target_layer", None)
    if isinstance(name, str):
        return name
    from .tv import infer_target_layer

    found = infer_target_layer(model)
    if found is None:
        raise IgradError(
            f"cannot find a convolutional target layer in {type(model).__name__}: "
            "it has no nn.Conv2d; pass target_layer explicitly"
        )
    return found


from . import cifar as _cifar  # noqa: E402,F401  (registers the CIFAR networks)
