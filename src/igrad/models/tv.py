"""Any torchvision classification model by name, default target layers for torchvision CNNs, and the
output layouts of torchvision's transformers."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torchvision
from torch import nn

from ..errors import IgradError, unknown_name


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    """Swap the model's last ``nn.Linear`` for a fresh one with ``num_classes`` outputs (fine-tuning)."""
    name, last = None, None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name, last = n, m
    if last is None or name is None:
        raise IgradError(f"{type(model).__name__} has no nn.Linear head to resize to {num_classes} classes")
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, num_classes, bias=last.bias is not None))


def create_torchvision_model(name: str, num_classes: int = 1000, weights: Any = None, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name, weights=weights, ...)`` with ``num_classes`` outputs.

    With pretrained ``weights`` (downloaded by torchvision, so only where the machine has internet)
    the 1000-class head is replaced by a new linear layer when ``num_classes`` differs. ``name`` is
    checked by :func:`torchvision_builder`.
    """
    if weights is not None and num_classes != 1000:
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
        _replace_last_linear(model, num_classes)
    else:
        model = torchvision.models.get_model(name, weights=weights, num_classes=num_classes, **kwargs)
    return model


def torchvision_builder(name: str) -> Callable[..., nn.Module]:
    """The builder ``fn(num_classes=..., **kw)`` of torchvision model ``name`` (checked now)."""
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise unknown_name("torchvision model", name, known)
    return functools.partial(create_torchvision_model, name)


def _vit_target_layer(model: nn.Module) -> str | None:
    """torchvision's VisionTransformer: its last encoder block's first LayerNorm (``ln_1``), pytorch-grad-cam's
    documented choice for vision transformers (``blocks[-1].norm1`` in timm), read as tokens. Its only
    convolution is the patch embedding ``conv_proj``, before every transformer block: a CAM there would see
    no attention at all. ``None`` for other models."""
    import torchvision

    if not isinstance(model, torchvision.models.VisionTransformer):
        return None
    layers = model.encoder.layers
    if len(layers) == 0:
        return None
    last = list(layers._modules)[-1]
    return f"encoder.layers.{last}.ln_1"


def infer_target_layer(model: nn.Module) -> str | None:
    """torchvision conventions (as pytorch-grad-cam's docs): ``layer4`` for ResNet-like models, the last
    encoder block's ``ln_1`` for a VisionTransformer (tokens; not its patch-embedding convolution), the last
    child of ``features`` (VGG, DenseNet, MobileNet, EfficientNet, Swin, ...), else the
    top-level child that contains the last ``nn.Conv2d`` (its last block when that child is an
    ``nn.ModuleList``, which is never called itself: MaxViT's ``blocks.3``), leaving out auxiliary
    classifier heads, which run only in training (GoogLeNet's ``aux1``/``aux2``, Inception-v3's
    ``AuxLogits``: the default is then ``inception5b`` / ``Mixed_7c``); ``None`` when there is no
    convolution."""
    children = dict(model.named_children())
    if "layer4" in children:
        return "layer4"
    vit_layer = _vit_target_layer(model)
    if vit_layer is not None:
        return vit_layer
    features = children.get("features")
    if isinstance(features, nn.Sequential) and len(features) > 0:
        return f"features.{list(features._modules)[-1]}"  # DenseNet names its children (norm5)
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and not n.split(".")[0].lower().startswith("aux"):
            last = n
    if last is None:
        return None
    name = last.split(".")[0]
    module = model.get_submodule(name)
    while isinstance(module, nn.ModuleList | nn.ModuleDict) and len(module) > 0:
        child = list(module._modules)[-1]
        name, module = f"{name}.{child}", module._modules[child]
    return name


def infer_layout(model: nn.Module, layer: str) -> str | None:
    """The output layout of ``model``'s layer ``layer`` where torchvision fixes it (see
    :func:`igrad.models.layer_layout`): Swin keeps ``[B, h, w, C]`` through ``features`` (after the patch
    embedding's convolution ``features.0.0``) and ``norm``; ViT's ``encoder`` and everything in it
    carries ``[B, 1 + h·w, D]`` tokens (class token first). ``None`` elsewhere."""
    if isinstance(model, torchvision.models.SwinTransformer):
        in_features = layer == "features" or (layer.startswith("features.") and layer != "features.0.0")
        return "BHWC" if in_features or layer == "norm" else None
    if isinstance(model, torchvision.models.VisionTransformer):
        return "tokens" if layer == "encoder" or layer.startswith("encoder.") else None
    return None
