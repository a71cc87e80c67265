"""What a trained model is measured by besides its saliency maps: top-1 accuracy and the mean
``cos(δx, δᴳx)`` (the diagnostic of docs/method.md §The loss) on a data set. Training (after each epoch) and evaluation
both
measure through these functions; the model is always in eval mode for them (restored afterwards)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .data import Split, eval_tensors
from .errors import IgradError
from .gradients import gradient_cosine
from .normalization import Normalization
from .output import model_logits
from .precision import autocast
from .torch_utils import device_of, eval_mode, input_dtype

__all__ = ["evaluate_accuracy", "correct_count", "gradient_cosine_sum"]


@torch.no_grad()
def correct_count(
    model: nn.Module,
    split: Split,
    index: torch.Tensor,
    normalization: Normalization,
    *,
    batch_size: int,
    device: torch.device,
    amp: bool = False,
) -> int:
    """How many of the images ``index`` of ``split`` ``model`` classifies correctly (the model's modes as
    they are: callers put it in eval mode)."""
    correct = 0
    for start in range(0, len(index), batch_size):
        x, y = eval_tensors(split, normalization, index[start : start + batch_size], device)
        x = x.to(input_dtype(model))  # float64 for a float64 model
        with autocast(device, amp):
            correct += int((model_logits(model, x).argmax(1) == y).sum())
    return correct


def evaluate_accuracy(
    model: nn.Module,
    split: Split,
    normalization: Normalization,
    *,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    indices: torch.Tensor | Sequence[int] | None = None,
) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` in eval mode on ``split`` (or ``indices`` of it),
    normalised with ``normalization``. The model's training mode is restored afterwards."""
    device = torch.device(device) if device is not None else device_of(model)
    index = torch.arange(len(split)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    if len(index) == 0:
        raise IgradError("evaluate_accuracy: no images to evaluate")
    with eval_mode(model):
        return correct_count(model, split, index, normalization, batch_size=batch_size, device=device) / len(index)


def gradient_cosine_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500, allow: Sequence[str] = ()
) -> float:
    """``Σ_i cos(δx_i, δᴳx_i)`` over the samples ``x`` for their ground-truth classes ``y`` (docs/method.md §The loss),
    in
    batches of ``batch_size``, with ``model`` in eval mode (restored afterwards). A sum, so that shards of a
    data set (one per training process) add up; divide by the number of samples for the mean."""
    total = 0.0
    with eval_mode(model):
        for start in range(0, len(y), batch_size):
            part = slice(start, start + batch_size)
            total += float(gradient_cosine(model, x[part], y[part], allow=allow).sum())
    return total
