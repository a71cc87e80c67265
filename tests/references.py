"""Independent references shared by the tests (plain autograd, no igrad)."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn


def batch_statistics(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each BatchNorm's batch mean and biased variance in a training-mode forward of ``model`` on ``x``
    (recorded with plain forward-pre hooks that are removed afterwards)."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name):
        def hook(mod, inp):
            z = inp[0].detach()
            stats[name] = (z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False))

        return hook

    handles = [
        m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
    ]
    try:
        with torch.no_grad():
            copy.deepcopy(model).train()(x)  # a copy: the model's own running statistics stay as they are
    finally:
        for h in handles:
            h.remove()
    return stats


def frozen_copy(model: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """An eval-mode copy of ``model`` normalising with the given statistics: differentiating it by plain
    autograd gives per-sample input gradients with those statistics held constant."""
    ref = copy.deepcopy(model).eval()
    for name, (mean, var) in stats.items():
        ref.get_submodule(name).running_mean.copy_(mean)
        ref.get_submodule(name).running_var.copy_(var)
    return ref


def plain_input_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor, create_graph: bool = False):
    """``∂ y_target / ∂ x`` by plain autograd."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg, create_graph=create_graph)
    return g


CLASSES = ["ant", "bee", "cat", "dog"]


def write_folder(root: Path, n_train: int = 12, n_test: int = 4, size: int = 12, seed: int = 0) -> Path:
    """A learnable image folder: class c has a bright channel c % 3 (and a brighter one for c >= 3)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
                img[..., c % 3] += 110 + 50 * (c // 3)
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


class _GuidedRectifierFn(torch.autograd.Function):
    """ReLU (``upper=None``) or ReLU6 with the guided rule of SPEC 1 written out by hand:
    ``δz = max(δa, 0) · 1[z > 0]`` (ReLU), ``· 1[0 < z < 6]`` (ReLU6)."""

    @staticmethod
    def forward(ctx, z, upper):
        ctx.save_for_backward(z)
        ctx.upper = upper
        return z.clamp(min=0) if upper is None else z.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        mask = z > 0 if ctx.upper is None else (z > 0) & (z < ctx.upper)
        return grad.clamp(min=0) * mask, None


class GuidedRectifier(nn.Module):
    """A module applying :class:`_GuidedRectifierFn` (swapped in for ``nn.ReLU`` / ``nn.ReLU6``)."""

    def __init__(self, upper=None):
        super().__init__()
        self.upper = upper

    def forward(self, z):
        return _GuidedRectifierFn.apply(z, self.upper)


def guided_by_module_swap(model: nn.Module, x: torch.Tensor, target: torch.Tensor, forward=None) -> torch.Tensor:
    """Guided backprop the way pytorch-grad-cam and captum do it, independently of igrad: a copy of ``model``
    with every ``nn.ReLU`` / ``nn.ReLU6`` module replaced by :class:`GuidedRectifier`, differentiated by plain
    autograd. ``forward(self, x)`` replaces the copy's ``forward`` where the model calls a rectifier
    functionally (the rewritten forward must use a ``GuidedRectifier`` there). Returns the gradient and the
    number of modules swapped."""
    ref = copy.deepcopy(model)
    swapped = 0
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, name, GuidedRectifier())
                swapped += 1
            elif type(child) is nn.ReLU6:
                setattr(parent, name, GuidedRectifier(6.0))
                swapped += 1
    if forward is not None:
        ref.forward = types.MethodType(forward, ref)
    return plain_input_gradient(ref, x, target), swapped
