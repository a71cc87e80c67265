"""igrad: train CNNs whose plain input gradients are interpretable, and measure how interpretable
their explanations are ("A Learning Paradigm for Interpretable Gradients", Torres Figueroa et al.,
VISAPP 2024). See docs/method.md for the exact definitions."""

from __future__ import annotations

from ._version import __version__
from .checkpoint import load_model
from .errors import IgradError, UnsupportedActivationError
from .gradients import gradient, gradient_cosine, input_gradients
from .loss import DEFAULT_LAMBDA, DEFAULT_STATS, ERRORS, GradientAlignmentLoss, register_error
from .models import create_model, default_target_layer, list_models, register_model
from .normalization import Normalization
from .output import LogitsOutput
from .rules import STATS_MODES, BackwardRules, Phase

__all__ = [
    "BackwardRules",
    "DEFAULT_LAMBDA",
    "DEFAULT_STATS",
    "ERRORS",
    "GradientAlignmentLoss",
    "IgradError",
    "LogitsOutput",
    "Normalization",
    "Phase",
    "STATS_MODES",
    "UnsupportedActivationError",
    "create_model",
    "default_target_layer",
    "gradient",
    "gradient_cosine",
    "input_gradients",
    "list_models",
    "load_model",
    "register_error",
    "register_model",
    "__version__",
]
