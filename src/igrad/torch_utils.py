"""Small torch utilities every layer uses: a model's modes, BatchNorm counters, its device.

Kept apart from the backward-rule engine (:mod:`igrad.rules`), which uses only :func:`eager_compiled`:
they are about running a model, not about how gradients flow through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "eval_mode",
    "preserve_batchnorm_counters",
    "has_training_batchnorm",
    "device_of",
    "input_dtype",
    "autograd_mode",
    "autograd_ready",
    "eager_compiled",
]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block, then restore every module's own ``training`` flag
    (also on error, and also where submodules had modes different from the root's)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def has_training_batchnorm(model: nn.Module) -> bool:
    """True when some BatchNorm module of ``model`` would normalise with batch statistics."""
    return any(isinstance(m, _BatchNorm) and m.training for m in model.modules())


@contextlib.contextmanager
def preserve_batchnorm_counters(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm ``num_batches_tracked`` counter on exit (a train-mode BatchNorm module
    increments it on every forward, even when igrad's rules leave the running statistics alone)."""
    saved = [
        (m.num_batches_tracked, m.num_batches_tracked.clone())
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.num_batches_tracked is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype to give ``model`` images decoded from integers in: float32, or float64 for a model whose
    first floating-point parameter is float64 (narrower models run in float32 under autocast)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def autograd_mode(grad: bool = True) -> Iterator[None]:
    """Autograd usable in the block also inside a caller's ``torch.inference_mode()`` (a Lightning validation
    step, say), which ``torch.enable_grad()`` alone does not leave: inference mode off, and gradient
    recording on (``grad=True``) or as the caller had it (``grad=False``)."""
    with torch.inference_mode(False), torch.enable_grad() if grad else contextlib.nullcontext():
        yield


def autograd_ready(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a tensor autograd may record: a copy where it was made under ``torch.inference_mode()``
    (an inference tensor can be neither saved for backward nor made to require grad), else ``x`` itself.
    Call it inside :func:`autograd_mode`, where the copy is a normal tensor."""
    return x.clone() if x.is_inference() else x


def eager_compiled() -> contextlib.AbstractContextManager[None]:
    """A block in which code compiled with ``torch.compile`` runs eagerly (``torch.compiler.set_stance(
    "force_eager")``): a compiled submodule inside a model then runs its Python forward, whose calls igrad's
    backward rules and layer hooks see (compiled, its graph would run past them)."""
    return torch.compiler.set_stance("force_eager")
