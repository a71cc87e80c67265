"""Networks behind one registry (timm style): ``create_model(name, num_classes=..., **kw)``.

* ``cifar_resnet18``: CIFAR ResNet-18 (docs/method.md §Networks and recipes): 3×3 stride-1 stem, no max-pool, basic
blocks
  [2, 2, 2, 2] of widths 64·w, 128·w, 256·w, 512·w, global average pool, linear head.
* ``cifar_mobilenet_v2``: torchvision's MobileNet-V2 (ReLU6, the standard inverted-residual table)
  adapted to 32×32 inputs: stem stride 1 and stride 1 in the second stage.
* ``tv:<name>``: any torchvision classification model (``tv:resnet50``, ``tv:densenet121``, ...), with
  ``weights=`` passed to torchvision (fine-tuning: the head is replaced when ``num_classes`` differs).

The registry carries each model's metadata (:class:`ModelInfo`, :func:`model_info`): its default saliency
target layer (docs/method.md §Saliency methods: the last convolutional stage) and the input size it is made for.
:func:`default_target_layer` answers for a model instance: the registry's entry for a model
:func:`create_model` built, else the layer a model built elsewhere declares (a class attribute or
property ``igrad_target_layer``), else torchvision's conventions. :func:`layer_layout` knows how the
layers of torchvision's transformers lay out their outputs (Swin: channels-last ``BHWC``; ViT:
``tokens``). Wrappers that hide a network (``DataParallel``, ``DistributedDataParallel``,
``torch.compile``'s ``OptimizedModule``, SWA's ``AveragedModel``) are seen through by
:func:`unwrap_model`, the one place that knows them.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..errors import IgradError, unknown_name
from ..validate import positive_int

__all__ = [
    "register_model",
    "ModelInfo",
    "model_info",
    "create_model",
    "list_models",
    "default_target_layer",
    "unwrap_model",
    "uncompiled",
    "scripted_parts",
    "refuse_scripted",
    "wrapper_prefix",
    "inner_name",
    "layer_layout",
    "LAYOUTS",
    "MODELS",
]

ModelFn = Callable[..., nn.Module]
TORCHVISION_PREFIX = "tv:"


@dataclass(frozen=True)
class ModelInfo:
    """A registry entry: the builder ``build(num_classes=..., **kw) -> nn.Module`` of model ``name`` and its
    metadata: ``default_target_layer``, the dotted name of its saliency target layer (``None``: found on
    the built network by torchvision's conventions), and ``input_size`` ``(C, H, W)``, the images it is
    made for."""

    name: str
    build: ModelFn
    default_target_layer: str | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)


#: The registered models by name (``tv:<name>`` models are looked up in torchvision by :func:`model_info`).
MODELS: dict[str, ModelInfo] = {}
#: The registry entry of each model :func:`create_model` built (weakly held: a model may be freed).
_BUILT: weakref.WeakKeyDictionary[nn.Module, ModelInfo] = weakref.WeakKeyDictionary()


def register_model(
    name: str, *, default_target_layer: str | None = None, input_size: tuple[int, int, int] = (3, 224, 224)
) -> Callable[[ModelFn], ModelFn]:
    """Decorator: register ``fn(num_classes=..., **kw) -> nn.Module`` under ``name``, with its default
    saliency target layer (a dotted module name; ``None``: by torchvision's conventions) and the input size
    ``(C, H, W)`` it is made for (default: torchvision's 3×224×224)."""

    def deco(fn: ModelFn) -> ModelFn:
        if name in MODELS:
            raise IgradError(f"model {name!r} is already registered")
        if name.startswith(TORCHVISION_PREFIX):
            raise IgradError(f"model names starting with {TORCHVISION_PREFIX!r} are torchvision's; not {name!r}")
        MODELS[name] = ModelInfo(name, fn, default_target_layer, input_size)
        return fn

    return deco


def model_info(name: str) -> ModelInfo:
    """The registry entry of model ``name``: a registered name or ``tv:<torchvision name>`` (torchvision's
    classification models: 3×224×224 inputs, target layer by torchvision's conventions)."""
    if name.startswith(TORCHVISION_PREFIX):
        from .tv import torchvision_builder

        return ModelInfo(name, torchvision_builder(name[len(TORCHVISION_PREFIX) :]))
    if name not in MODELS:
        raise unknown_name("model", name, [*MODELS, "tv:<torchvision name>"])
    return MODELS[name]


def list_models(torchvision: bool = False) -> list[str]:
    """Registered model names; with ``torchvision=True`` also every ``tv:<name>`` classification model."""
    names = sorted(MODELS)
    if torchvision:
        from torchvision.models import list_models as tv_list

        names += [TORCHVISION_PREFIX + n for n in tv_list(module=__import__("torchvision").models)]
    return names


def create_model(name: str, num_classes: int = 100, **kwargs: Any) -> nn.Module:
    """Build a registered model (or ``tv:<torchvision name>``) with ``num_classes`` outputs."""
    positive_int("num_classes", num_classes)
    info = model_info(name)
    try:
        model = info.build(num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise IgradError(f"bad arguments for model {name!r}: {exc}") from exc
    _BUILT[model] = info
    return model


# -- wrappers ----------------------------------------------------------------------------------------


def _wrapped(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(attribute, inner module)`` when ``model`` is a wrapper whose forward just runs another module."""
    if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel | AveragedModel):
        return "module", model.module
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # loaded once anything was torch.compile'd
    if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        return "_orig_mod", model._orig_mod
    return None


def _peel(model: nn.Module) -> tuple[nn.Module, str]:
    """``(network inside every wrapper, its dotted path with a trailing dot)``."""
    prefix = ""
    while (found := _wrapped(model)) is not None:
        prefix, model = prefix + found[0] + ".", found[1]
    return model, prefix


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside the wrappers that hide it, nested in any order: ``DataParallel`` and
    ``DistributedDataParallel`` (``.module``), ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``),
    ``torch.optim.swa_utils.AveragedModel`` (``.module``); ``model`` itself when it is not wrapped."""
    return _peel(model)[0]


def uncompiled(model: nn.Module) -> nn.Module:
    """``model`` without the ``torch.compile`` wrappers around it (``OptimizedModule._orig_mod``, same
    parameters): igrad's backward rules record the forward with a ``TorchFunctionMode``, which needs
    eager execution. Other wrappers (``DistributedDataParallel``: gradient synchronisation) are kept."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    while dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        model = model._orig_mod
    return model


def scripted_parts(model: nn.Module) -> list[str]:
    """The parts of ``model`` that run as TorchScript: each module (dotted name, ``""`` for ``model`` itself)
    that is a ``torch.jit.ScriptModule`` (``torch.jit.script``, ``torch.jit.trace``, ``torch.jit.freeze``,
    ``torch.jit.load``: ``RecursiveScriptModule``, ``TracedModule``) or whose ``forward`` is a
    ``torch.jit.ScriptFunction``; outermost first, without the modules inside a listed one."""
    found: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{p}.") for p in found):
            continue  # inside a part already listed
        forward = getattr(module, "forward", None)
        if isinstance(module, torch.jit.ScriptModule) or isinstance(forward, torch.jit.ScriptFunction):
            found.append(name)
            if not name:
                break  # the model itself: every module is inside it
    return found


def refuse_scripted(model: nn.Module, what: str) -> None:
    """Raise :class:`IgradError` when any part of ``model`` runs as TorchScript (:func:`scripted_parts`).

    igrad's backward rules (the guided rectifier rule, BatchNorm statistics held constant) see a forward
    through a ``TorchFunctionMode``, and the CAM methods read a layer through module hooks: TorchScript
    runs its graph in C++, past both, so its gradients would silently be plain autograd's (a guided
    gradient equal to the standard one, a regulariser of 0). ``what`` names the caller in the message."""
    parts = scripted_parts(model)
    if not parts:
        return
    where = "the whole model" if parts[0] == "" else ", ".join(repr(p) for p in parts[:5])
    more = f" and {len(parts) - 5} more" if len(parts) > 5 else ""
    raise IgradError(
        f"{what} needs an eager PyTorch model, but {type(model).__name__} runs TorchScript ({where}{more}: "
        "torch.jit.script, torch.jit.trace or torch.jit.load). igrad's backward rules and layer hooks cannot "
        "see inside a TorchScript graph, so the result would silently be plain autograd's. Use the eager "
        "nn.Module instead (build the network in Python and load the scripted model's state_dict into it)."
    )


def wrapper_prefix(model: nn.Module) -> str:
    """The dotted path of :func:`unwrap_model`'s result inside ``model``, with a trailing dot: ``"module."``
    for a ``DataParallel``, ``"_orig_mod."`` for a compiled model, ``""`` when not wrapped."""
    return _peel(model)[1]


def inner_name(model: nn.Module, name: str) -> str:
    """A dotted module name given in ``model`` (``"module.layer4"`` of a ``DataParallel``) or in the
    unwrapped network (``"layer4"``), as a name in :func:`unwrap_model`'s result: the wrapper's prefix is
    dropped, unless the unwrapped network itself has a module of the full name."""
    inner, prefix = _peel(model)
    if not prefix or not name.startswith(prefix):
        return name
    try:
        inner.get_submodule(name)
    except AttributeError:
        return name[len(prefix) :]
    return name


# -- target layers -----------------------------------------------------------------------------------


def default_target_layer(model: nn.Module) -> str:
    """Dotted name in ``model`` of the default saliency target layer (docs/method.md §Saliency methods: the last
    spatial stage, the one
    global pooling reads).

    The registry's (:func:`model_info`) for a model :func:`create_model` built; else the ``igrad_target_layer``
    a model built elsewhere declares (a class attribute or property); else the torchvision conventions
    (``layer4`` for ResNets, the last block of ``features`` otherwise, else the top-level child that holds
    the last ``Conv2d``), kept where a forward on a dummy input (:func:`spatial_stages`) shows that layer
    outputting feature maps larger than 1×1; where it does not (timm's MobileNetV3 and LCNet, whose last
    convolution ``conv_head`` runs after global pooling), the last module to output such maps before the
    pooling. A wrapped model (:func:`unwrap_model`) gets its network's layer with the wrapper's prefix:
    ``"module.layer4"`` for a ``DataParallel``.
    """
    inner = unwrap_model(model)
    info = _BUILT.get(inner)
    name = info.default_target_layer if info is not None else None
    if name is None:
        declared = getattr(inner, "igrad_target_layer", None)
        name = declared if isinstance(declared, str) else None
    if name is None:
        name = _conventional_layer(inner)
    if name is None:
        raise IgradError(
            f"cannot find a convolutional target layer in {type(inner).__name__}: "
            "it has no nn.Conv2d; pass target_layer explicitly"
        )
    return wrapper_prefix(model) + name


def _conventional_layer(model: nn.Module) -> str | None:
    """torchvision's convention (:func:`igrad.models.tv.infer_target_layer`) where it names a spatial stage,
    else the last spatial stage a traced forward shows (see :func:`default_target_layer`); cached per model
    and structure."""
    from .tv import infer_layout, infer_target_layer

    key = tuple((n, id(m)) for n, m in model.named_modules())
    cached = _DEFAULT_LAYERS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    name = infer_target_layer(model)
    if name is None or infer_layout(model, name) is None:  # transformers' token/channels-last layers: as named
        stages = spatial_stages(model)
        if stages and name not in stages:
            name = stages[-1]
    _DEFAULT_LAYERS[model] = (key, name)
    return name


#: The default target layer found for a model not built by :func:`create_model`, with the structure it was
#: found for (module names and identities).
_DEFAULT_LAYERS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[tuple[str, int], ...], str | None]] = (
    weakref.WeakKeyDictionary()
)

#: The side of the dummy images :func:`spatial_stages` runs: a stage of total stride 32 is then 4×4, while
#: anything after global pooling is 1×1 whatever the input.
TRACE_SIZE = 128


def spatial_stages(model: nn.Module, size: int = TRACE_SIZE) -> list[str]:
    """The modules of ``model`` (dotted names, not the model itself) that output feature maps ``[B, K, h, w]``
    with ``h·w > 1`` in an eval-mode forward of one dummy image ``[1, C, size, size]`` (``C``: the first
    ``Conv2d``'s input channels, zeros, the first parameter's device and dtype; no gradient), each called
    exactly once (a target layer must be), in the order their forwards finish: the last one is the last
    spatial stage before global pooling (an enclosing ``nn.Sequential`` finishes after its blocks, so it
    comes after them). ``[]`` when the forward fails on such an input (a model for other inputs, a
    fixed size); the model's modes and hooks are as before, also then."""
    from ..torch_utils import eval_mode

    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    channels = conv.in_channels if conv is not None else 3
    x = torch.zeros(
        1,
        channels,
        size,
        size,
        device=param.device if param is not None else None,
        dtype=param.dtype if param is not None else None,
    )
    calls: dict[str, int] = {}
    finished: list[tuple[str, bool]] = []

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            spatial = isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-2:].numel() > 1
            finished.append((name, spatial))

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    except Exception:  # a model that cannot run such an input: no evidence either way
        return []
    finally:
        for h in handles:
            h.remove()
    return [n for n, spatial in finished if spatial and calls[n] == 1]


#: How a layer lays out its output: feature maps ``[B, K, h, w]``, channels-last maps ``[B, h, w, K]``,
#: or a class token then ``h·w`` patch tokens ``[B, 1 + h·w, K]`` (a vision transformer).
LAYOUTS = ("BCHW", "BHWC", "tokens")


def layer_layout(model: nn.Module, layer: str) -> str | None:
    """The known layout (one of :data:`LAYOUTS`) of the output of ``model``'s layer ``layer`` (a dotted
    name, wrappers seen through): torchvision's Swin ``features.*`` and ``norm`` are ``"BHWC"``, its
    ViT ``encoder.*`` ``"tokens"``; ``None`` when unknown (a 4-D output is then read as ``"BCHW"``)."""
    from .tv import infer_layout

    return infer_layout(unwrap_model(model), inner_name(model, layer))


from . import cifar as _cifar  # noqa: E402,F401  (registers the CIFAR networks)
