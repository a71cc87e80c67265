"""Mixed precision and memory layout for training and evaluation: bf16 autocast on the CPU as on
the GPU, and channels-last.

The backward rules (:mod:`igrad.rules`) keep every pass of the regulariser in the autocast precision and in
the model's layout: convolutions cast as autocast does, BatchNorm's constant-statistics rule scales in the
gradient's own dtype, and the strided grouped convolutions whose native bf16 input gradient is a slow CPU
fallback take an exact stride-1 route. ``L_R``'s error is computed in float32
(:class:`igrad.GradientAlignmentLoss`). A training step in bf16 + channels-last::

    model = to_channels_last(model)
    with autocast(device):
        l_r, logits = criterion(model, to_channels_last(x), y)
        loss = F.cross_entropy(logits.float(), y) + lam * l_r
    loss.backward()

Evaluation (``igrad evaluate --amp``, :class:`igrad.evaluate.EvalConfig`) runs the saliency methods' forwards
and backwards and the metrics' forwards inside :func:`autocast`; what must stay float32 there (probabilities,
metric arithmetic, CAM weights and maps, substrates) does so through ``.float()`` or :func:`full_precision`.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import TypeVar

import torch
from torch import nn

from .errors import IgradError

__all__ = ["autocast", "autocast_enabled", "bf16_pays", "full_precision", "native_bf16", "to_channels_last"]

T = TypeVar("T", nn.Module, torch.Tensor)


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` (``"cpu"``, ``"cuda"``) computes in bf16 natively: a CPU with AVX512-BF16 or AMX
    tiles (oneDNN's bf16 kernels; without them bf16 is emulated and slower than float32), a CUDA GPU that
    reports bf16 support (Ampere or newer). Other device types: ``True`` (left to torch)."""
    if device_type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return True


def bf16_pays(device: str | torch.device = "auto") -> bool:
    """Whether bf16 autocast is worth turning on for ``device`` (``"auto"``: CUDA when available, else the CPU):
    :func:`native_bf16` of its type. The short demonstration (``igrad demo``, ``igrad reproduce --preset
    demo``) uses bf16 only where this holds and float32 elsewhere: emulated bf16 is an order of magnitude
    slower than float32 (measured, CIFAR ResNet-18 at 1/4 width, batch 128, 2 threads, on an AMD Zen 3 without
    AVX-512: 7.2 s a training step in bf16 + channels-last against 0.78 s in float32; on a Zen 5 with
    AVX512-BF16 bf16 is the faster). Raises :class:`IgradError` for a device name torch does not know."""
    name = str(device)
    if name == "auto":
        return native_bf16("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(name).type
    except RuntimeError as exc:
        raise IgradError(f"bad device {name!r}: {exc}") from exc
    return native_bf16(kind)


def autocast(device: str | torch.device, enabled: bool = True) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast(device.type, dtype=torch.bfloat16)`` (a no-op context when ``enabled`` is false), for
    the forward and the loss of a training or evaluation step, on the CPU as on the GPU.

    A device without native bf16 (:func:`native_bf16`) gets a :class:`RuntimeWarning` that it will be slow,
    not a refusal. Raises :class:`IgradError` for a device type autocast does not know.
    """
    if not enabled:
        return contextlib.nullcontext()
    kind = torch.device(device).type
    if not torch.amp.is_autocast_available(kind):
        raise IgradError(f"bf16 autocast is not available on device type {kind!r}")
    if not native_bf16(kind):
        warnings.warn(
            f"bf16 autocast on this {kind.upper()} is emulated (no native bf16 units: AVX512-BF16/AMX on a CPU, "
            "Ampere or newer on a GPU): it will run, but likely an order of magnitude slower than float32 "
            "(igrad train/reproduce --no-amp)",
            RuntimeWarning,
            stacklevel=2,
        )
    return torch.autocast(kind, dtype=torch.bfloat16)


def autocast_enabled(device: str | torch.device) -> bool:
    """Whether an autocast region is active for ``device``'s type (``False`` where autocast does not know it)."""
    kind = torch.device(device).type
    return bool(torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind))


def full_precision(device: str | torch.device) -> contextlib.AbstractContextManager[object]:
    """A region where autocast is off for ``device``'s type (a no-op context where none is active): the parts
    of a bf16 evaluation that stay float32 (scores, substrates, map arithmetic, the checks that a stand-in
    network reproduces the model's float32 logits)."""
    if not autocast_enabled(device):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, enabled=False)


def to_channels_last(obj: T) -> T:
    """A model (in place, as ``nn.Module.to``) or a 4-D batch ``[B, C, H, W]`` in channels-last memory layout
    (the same shape; NHWC strides), which the CPU's bf16 convolutions and the GPU's tensor cores run fastest
    in. Other tensors are returned unchanged."""
    if isinstance(obj, nn.Module):
        return obj.to(memory_format=torch.channels_last)
    if obj.dim() == 4:
        return obj.contiguous(memory_format=torch.channels_last)
    return obj
