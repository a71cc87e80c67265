"""The model-output contract (docs/method.md §Metrics): every igrad entry point runs the model on images through
:func:`model_logits`, which needs **logits** ``[B, num_classes]`` (pre-softmax).

* A forward that raises keeps its own exception, with a note naming the model and the input
  (``exc.__notes__``): the model is the authority on what input it accepts (no channel-count guess).
* An output of another form (a tuple, a dict, an object with fields, a tensor of another shape) is
  refused with an :class:`~igrad.errors.IgradError` saying what came back and how to adapt it:
  :class:`LogitsOutput` picks the logits out of a tuple/dict explicitly.
* Probability-valued rows (softmax: non-negative, each row summing to 1; log-softmax: non-positive,
  each row's log-sum-exp 0) are refused: the metrics would soft-max them a second time and the
  gradient methods would explain ``p_c`` instead of the logit ``y_c``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from .errors import IgradError
from .models import unwrap_model

__all__ = ["LogitsOutput", "model_logits", "check_logits", "refuse_probabilities", "refuse_single_logit"]

Selector = int | str | Callable[[Any], torch.Tensor]

_NOTE = "igrad: raised by"


def _name(model: nn.Module) -> str:
    """The model's class name, with the models it wraps (``LogitsOutput(DataParallel(CifarResNet))``)."""
    inner = model.model if isinstance(model, LogitsOutput) else unwrap_model(model)
    if inner is model:
        return type(model).__name__
    return f"{type(model).__name__}({_name(inner)})"


def _describe(value: object) -> str:
    """A short description of what a model returned: type, shapes, keys."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, tuple | list):
        parts = ", ".join(_describe(v) if isinstance(v, torch.Tensor) else type(v).__name__ for v in value[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"a {type(value).__name__} of {len(value)} elements ({parts}{more})"
    if isinstance(value, Mapping):
        keys = list(value.keys())
        return f"a {type(value).__name__} with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
    return f"a {type(value).__name__}"


def _layout_hint(x: object) -> str:
    """For a forward that raised: a hint where ``x`` looks like images in ``[B, H, W, C]`` order (its last
    dimension 1, 3 or 4 channels, its second not), which the models expect as ``[B, C, H, W]``."""
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return "; it looks like [B, H, W, C] images: the models take [B, C, H, W], x.permute(0, 3, 1, 2)"
    return ""


def _select_hint(value: object, batch: int) -> str:
    """``LogitsOutput(model, select=...)`` for the first element/key that looks like logits ``[batch, K]``."""

    def looks(v: object) -> bool:
        return isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] == batch

    pick: int | str
    if isinstance(value, tuple | list):
        pick = next((i for i, v in enumerate(value) if looks(v)), 0)
    elif isinstance(value, Mapping):
        keys = list(value.keys())
        pick = next((k for k in keys if looks(value[k])), keys[0] if keys else "logits")
    elif hasattr(value, "logits"):
        pick = "logits"
    else:
        return "make its forward return the logits tensor"
    return f"wrap it as igrad.LogitsOutput(model, select={pick!r}) (or make its forward return the logits only)"


def check_logits(output: object, batch: int, model: nn.Module) -> torch.Tensor:
    """Validate what ``model`` returned for a batch of ``batch`` images: a floating tensor ``[batch, K]``.

    Structure only (no device synchronisation). Raises :class:`IgradError` naming what came back
    (type, tuple length and element shapes, dict keys, shape) and how to adapt it.
    """
    name = _name(model)
    if not isinstance(output, torch.Tensor):
        raise IgradError(
            f"{name} returned {_describe(output)} for a batch of {batch} images; igrad needs logits "
            f"[B, num_classes] (pre-softmax) as a tensor: {_select_hint(output, batch)}"
        )
    if output.dim() != 2 or output.shape[0] != batch:
        hint = " (flatten it: out.flatten(1))" if output.dim() > 2 and output.shape[2:].numel() == 1 else ""
        raise IgradError(
            f"{name} returned {_describe(output)} for a batch of {batch} images; igrad needs logits "
            f"[B, num_classes] = [{batch}, K]{hint}"
        )
    if not output.is_floating_point():
        raise IgradError(f"{name} returned logits of dtype {output.dtype}; igrad needs floating-point logits")
    return output


def refuse_probabilities(logits: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Raise :class:`IgradError` if every row of ``logits`` ``[B, K]`` (``K ≥ 2``) is a probability vector
    (``y ≥ 0`` and ``|Σ_k y_k − 1| ≤ tol``) or a log-probability vector (``y ≤ 0`` and
    ``|log Σ_k exp y_k| ≤ tol``), ``tol = max(1e-5, 8·eps(dtype))`` (rounding of a soft-max in that
    dtype). One device synchronisation. Returns ``logits``.
    """
    if logits.shape[1] < 2 or logits.numel() == 0:
        return logits
    v = logits.detach().double()
    tol = max(1e-5, 8 * torch.finfo(logits.dtype).eps)
    probs = (v.amin() >= 0) & ((v.sum(1) - 1).abs().amax() <= tol)
    log_probs = (v.amax() <= 0) & (torch.logsumexp(v, 1).abs().amax() <= tol)
    kind = "softmax" if bool(probs) else "log_softmax" if bool(log_probs) else None
    if kind is not None:
        raise IgradError(
            f"{_name(model)} returns {'probabilities' if kind == 'softmax' else 'log-probabilities'} "
            f"(every row is {'non-negative and sums' if kind == 'softmax' else 'non-positive and its exp sums'} "
            f"to 1): its forward ends in {kind}. igrad needs logits (pre-softmax): the metrics apply softmax "
            "themselves and the gradients are taken on the logit. Remove the final "
            f"{kind} from the model (or wrap it in a module that returns the layer before it)."
        )
    return logits


def refuse_single_logit(logits: torch.Tensor, what: str) -> torch.Tensor:
    """Raise :class:`IgradError` when ``logits`` ``[B, K]`` has one column (``K = 1``, a binary model with one
    logit) and ``what`` (named in the message) is a soft-max probability: ``softmax(y)`` of a single logit is 1
    whatever the input, so such a score would ignore the image and the map alike. Returns ``logits``."""
    if logits.dim() == 2 and logits.shape[1] == 1:
        raise IgradError(
            f"{what} is a soft-max probability over the classes, but the model has a single logit (num_classes "
            "= 1), whose soft-max is 1 whatever the input: every map would score the same. Give the model two "
            "logits, [0, z] (torch.cat([torch.zeros_like(z), z], 1): the soft-max is then sigmoid(z) for class 1 "
            "and 1 − sigmoid(z) for class 0), or score the logit itself where that is offered (score='logit')."
        )
    return logits


def model_logits(model: nn.Module, x: torch.Tensor, *, probabilities: bool = True) -> torch.Tensor:
    """``model(x)`` checked to be logits ``[B, K]`` for images ``x`` ``[B, C, H, W]``.

    The one place igrad runs a model on images. An exception from the forward is re-raised as is,
    with a note naming the model and the input's shape and dtype. The output is validated by
    :func:`check_logits`; with ``probabilities=True`` (every public entry point's first forward)
    also by :func:`refuse_probabilities` (one device synchronisation). ``probabilities=False`` is for
    forwards whose logits were already checked on the same model (perturbed copies) or feed a
    training loss (no synchronisation per step).
    """
    try:
        output = model(x)
    except Exception as exc:
        if not any(str(n).startswith(_NOTE) for n in getattr(exc, "__notes__", ())):
            exc.add_note(f"{_NOTE} {_name(model)} on input of shape {tuple(x.shape)} ({x.dtype}){_layout_hint(x)}")
        raise
    logits = check_logits(output, x.shape[0], model)
    return refuse_probabilities(logits, model) if probabilities else logits


class LogitsOutput(nn.Module):
    """Adapt a model whose forward returns more than the logits: ``LogitsOutput(model, select)(x)``
    is ``select(model(x))``.

    ``select``: an ``int`` picks an element of a returned tuple/list (``(logits, features)``: 0); a
    ``str`` a key of a returned dict (or an attribute, e.g. ``"logits"`` of a dataclass output); a
    callable ``fn(output) -> logits``. The selection must give logits ``[B, num_classes]``
    (pre-softmax); anything else is refused when the model runs. The wrapped model is the submodule
    ``model`` (layer names gain the prefix ``"model."``); the default saliency target layer is the
    wrapped model's.
    """

    def __init__(self, model: nn.Module, select: Selector = 0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise IgradError(f"LogitsOutput wraps a torch.nn.Module, got {type(model).__name__}")
        if isinstance(select, bool) or not (isinstance(select, int | str) or callable(select)):
            raise IgradError(f"select must be an index, a key or a callable, got {type(select).__name__}")
        self.model = model
        self.select = select

    @property
    def igrad_target_layer(self) -> str:
        """The wrapped model's default target layer, under ``model.`` (see :func:`igrad.default_target_layer`)."""
        from .models import default_target_layer

        return f"model.{default_target_layer(self.model)}"

    def extra_repr(self) -> str:
        return f"select={self.select!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The selected part of ``model(x)``."""
        out = self.model(x)
        if callable(self.select):
            return self.select(out)
        if not isinstance(out, torch.fx.Proxy):  # a symbol while torch.fx traces (Ablation-CAM): no checks
            self._check(out)
        if isinstance(self.select, str) and not isinstance(out, Mapping | torch.fx.Proxy):
            return getattr(out, self.select)
        return out[self.select]

    def _check(self, out: object) -> None:
        """Refuse a selection that does not fit what the model returned (a tensor would be indexed)."""
        if isinstance(out, torch.Tensor):
            raise IgradError(
                f"{type(self.model).__name__} already returns a tensor {tuple(out.shape)}; "
                f"LogitsOutput(select={self.select!r}) would index it: use the model directly"
            )
        if isinstance(self.select, int):
            if not isinstance(out, tuple | list) or not -len(out) <= self.select < len(out):
                raise IgradError(f"select={self.select} does not index {_describe(out)}")
        elif isinstance(out, Mapping):
            if self.select not in out:
                raise IgradError(f"select={self.select!r} is not a key of {_describe(out)}")
        elif not hasattr(out, str(self.select)):
            raise IgradError(f"select={self.select!r} is not a field of {_describe(out)}")
