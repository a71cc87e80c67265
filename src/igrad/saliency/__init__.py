"""Saliency methods of docs/method.md §Saliency methods behind one registry and one call shape::

    from igrad.saliency import create_method
    with create_method("gradcam", model) as m:          # target_layer=None: the model's default layer
        maps = m(x, target)                              # float [B, H, W] in [0, 1]

CAM family (``cam``, ``gradcam``, ``gradcam++``, ``xgradcam``, ``layercam``, ``scorecam``, ``ablationcam``)
in :mod:`igrad.saliency.cam`; gradient family (``gradient``, ``guided``, ``smoothgrad``, ``guided-gradcam``)
in :mod:`igrad.saliency.gradient`. The differences of definition from pytorch-grad-cam are listed in
:mod:`igrad.saliency.cam`.
"""

from __future__ import annotations

from .base import (
    METHODS,
    SaliencyMethod,
    constant_maps,
    create_method,
    finish_maps,
    normalize_maps,
    register_method,
    resolve_layer,
    resolve_methods,
    upsample,
)
from .cam import CAM, AblationCAM, CAMContext, CAMMethod, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM
from .gradient import Gradient, GradientMethod, Guided, GuidedGradCAM, SmoothGrad, signed_map

__all__ = [
    "METHODS",
    "SaliencyMethod",
    "CAMMethod",
    "CAMContext",
    "GradientMethod",
    "create_method",
    "register_method",
    "resolve_methods",
    "resolve_layer",
    "normalize_maps",
    "constant_maps",
    "finish_maps",
    "upsample",
    "signed_map",
    "CAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "ScoreCAM",
    "AblationCAM",
    "Gradient",
    "Guided",
    "SmoothGrad",
    "GuidedGradCAM",
]
