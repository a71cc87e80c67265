"""Independent references shared by the tests (plain autograd, no igrad)."""

from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn

#: Relative agreement of float32 results of one computation run through different kernels (batch size,
#: thread count, oneDNN or not, CPU kind): each kernel's result is within ~1e-6 of the magnitude of what
#: it sums, and a network stacks ~10 such kernels, so results agree to ~1e-5 of their magnitude. Every
#: test that compares across kernels scales this by the magnitude of the compared values (never a bare
#: absolute tolerance that only holds for one machine's kernel choice).
F32_KERNEL_RTOL = 1e-5


def kernel_atol(values: torch.Tensor, scale: float = 1.0) -> float:
    """Absolute tolerance for comparing ``values`` computed through different float32 kernels:
    ``F32_KERNEL_RTOL · max(scale, max|values|)`` (``scale`` a floor for values that may be all small)."""
    return F32_KERNEL_RTOL * max(scale, float(values.detach().abs().max()))


def metric_tolerances(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Bounds on how much the metrics of docs/method.md §Metrics may move when the model's logits move by
    ``Δ = F32_KERNEL_RTOL · max(1, max|z|)`` (a change of kernels), derived from their formulas.

    A softmax probability moves by a *relative* ``|δp|/p ≤ 2Δ`` (``δ log p = δz_c − Σ_j p_j δz_j``), so:
    curves (probabilities ≤ 1) by ``2Δ``; an AUC ×100 by ``200Δ``; AD = 100·max(0, 1 − o/p) by
    ``100·(o/p)·4Δ ≤ 400Δ``; AG = 100·max(0, o − p)/(1 − p) by ``100·(2Δ(o + p) + 2Δp)/(1 − p) ≤
    600Δ/(1 − p)``. AI (an indicator) can only flip where ``|o − p| ≤ 2Δ(o + p)``: compared exactly.
    """
    delta = F32_KERNEL_RTOL * max(1.0, float(logits.detach().abs().max()))
    p = logits.detach().double().softmax(1).gather(1, target[:, None]).max().item()
    return {
        "curve": 2 * delta,
        "ins": 200 * delta,
        "del": 200 * delta,
        "ad": 400 * delta,
        "ag": 600 * delta / (1 - p),
        "ai": 0.0,
    }


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


def noise_seed(seed: int, image: torch.Tensor) -> int:
    """SmoothGrad's documented per-image seed, written out: BLAKE2b (8-byte digest) of the seed (8 bytes,
    little-endian, signed) then the image's bytes (its dtype, C order), read little-endian, top bit cleared."""
    import hashlib

    data = int(seed).to_bytes(8, "little", signed=True) + image.detach().contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2**63 - 1)


def plain_input_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor, create_graph: bool = False):
    """``∂ y_target / ∂ x`` by plain autograd."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg, create_graph=create_graph)
    return g


class Ablation(NamedTuple):
    activation: torch.Tensor  # the layer's output, in its own layout
    logits: torch.Tensor  # [B, K] of the unablated forward
    y: torch.Tensor  # [B] target logits
    w: torch.Tensor  # [B, K] Ablation-CAM weights


def ablation_weights(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor, channel_dim: int = 1):
    """Brute-force Ablation-CAM weights (an :class:`Ablation`): ``A`` the layer's output (its own layout),
    ``y`` the target logits ``[B]`` and ``w_k = (y − y_k)/y`` ``[B, K]``, ``y_k`` from a *whole-network*
    forward with channel ``k`` (along ``channel_dim``) of the layer's output zeroed by a forward hook (one
    batch of K copies of the image, copy j with channel j zeroed)."""
    out, logits = layer_output(model, layer, x)
    k = out.shape[channel_dim]

    def zero(mod, inp, o):
        o = o.clone()
        idx = torch.arange(k)
        o.movedim(channel_dim, 1)[idx, idx] = 0
        return o

    h = layer.register_forward_hook(zero)
    try:
        with torch.no_grad():
            copies = [x[i : i + 1].repeat(k, *[1] * (x.dim() - 1)) for i in range(len(x))]
            yk = torch.stack([model(xc)[:, int(c)] for xc, c in zip(copies, target, strict=True)])
    finally:
        h.remove()
    y = logits.gather(1, target[:, None])[:, 0]
    return Ablation(out, logits, y, (y[:, None] - yk) / y[:, None])


def ablation_map_atol(a: torch.Tensor, y: torch.Tensor, w: torch.Tensor, logits: torch.Tensor) -> float:
    """How far a normalised Ablation-CAM map ``ReLU(Σ_k w_k A_k)`` may move when the ablated logits move by
    ``Δ = F32_KERNEL_RTOL · max(1, max|z|)`` (other kernels): ``|δw_k| ≤ 2Δ/|y|`` (a difference of two
    logits over ``y``), so ``|δS| ≤ 2Δ/|y| · Σ_k |A_k|``; min-max normalisation moves by at most
    ``3 max|δS| / span(ReLU S)`` per image."""
    delta = F32_KERNEL_RTOL * max(1.0, float(logits.abs().max()))
    raw = torch.einsum("bk,bkhw->bhw", w, a).relu().flatten(1)
    span = (raw.amax(1) - raw.amin(1)).clamp_min(torch.finfo(raw.dtype).tiny)
    ds = 2 * delta / y.abs() * a.abs().sum(1).flatten(1).amax(1)
    return float((3 * ds / span).max())


def random_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """``model`` in eval mode with random BatchNorm running statistics and affine parameters (a fresh
    network's are 0/1, which would make folding them, or an activation's sign, trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(0.3 * torch.randn(n, generator=g))
                bn.running_var.copy_(0.5 + torch.rand(n, generator=g))
                bn.weight.copy_(0.5 + torch.rand(n, generator=g))
                bn.bias.copy_(0.2 * torch.randn(n, generator=g))
    return model.eval()


def kill_when_stalled(proc, marker: Path) -> None:
    """Wait (≤ 600 s: a busy machine can be slow to get there) until the subprocess ``proc`` writes ``marker``
    (it then stalls at a known point), SIGKILL it and check it died of that signal; the process is killed
    also when the wait fails, and its output then shown."""
    import signal
    import time

    try:
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not marker.exists():
            proc.kill()
            raise AssertionError(f"the subprocess never reached its stall point: {proc.communicate()[0].decode()}")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()


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


# -- saliency: brute-force CAM references (one full forward per channel, no igrad) ----------------------


def layer_output(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output of layer, logits)`` of one no-grad forward on a copy of ``x`` (the output copied in the hook,
    so that in-place operations after the layer cannot change it)."""
    store = []
    h = layer.register_forward_hook(lambda m, i, o: store.append(o.detach().clone()))
    try:
        with torch.no_grad():
            logits = model(x.clone())
    finally:
        h.remove()
    return store[0], logits


def is_constant(raw: torch.Tensor) -> bool:
    """Whether one raw map is constant as docs/method.md §Saliency methods means it: its span within 4 roundings of its
    magnitude,
    ``max − min ≤ 4·eps·max|S|`` (``eps`` of its dtype), decided before any upsampling."""
    hi, lo = float(raw.max()), float(raw.min())
    return hi - lo <= 4 * torch.finfo(raw.dtype).eps * max(abs(hi), abs(lo))


def finish_maps(raw: torch.Tensor, size: tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """ReLU'd raw maps ``[B, h, w]`` upsampled bilinearly (``align_corners=False``) and min-max normalised
    per image, 0 where the raw map is constant (:func:`is_constant`), written out here."""
    up = torch.nn.functional.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=align_corners)[:, 0]
    out = []
    for r, m in zip(raw, up, strict=True):
        span = m.max() - m.min()
        out.append(torch.zeros_like(m) if is_constant(r) or span == 0 else (m - m.min()) / span)
    return torch.stack(out)


def brute_ablationcam(model, layer, x, targets, channel_dim=1, to_bchw=lambda t: t, rectify_activation=False):
    """Ablation-CAM by brute force (:func:`ablation_weights`): ``(maps, atol)`` with the maps
    ``ReLU(Σ_k w_k A_k)``, ``A = to_bchw(output)``, upsampled and normalised by :func:`finish_maps`, and the
    tolerance a float32 computation of them through other kernels needs (:func:`ablation_map_atol`). With
    ``rectify_activation`` the map is ``Σ_k w_k ReLU(A_k)`` instead (the symptom of an activation
    overwritten by an in-place ReLU), to show that a test can tell the two apart."""
    ab = ablation_weights(model, layer, x, torch.as_tensor(targets), channel_dim)
    a = to_bchw(ab.activation)
    atol = ablation_map_atol(a, ab.y, ab.w, ab.logits)
    if rectify_activation:
        a = a.clamp(min=0)
    return finish_maps(torch.einsum("bk,bkhw->bhw", ab.w, a).relu(), tuple(x.shape[-2:])), atol


def brute_scorecam(model, layer, x, targets, to_bchw=lambda t: t):
    """Score-CAM one mask at a time: ``M_k`` = channel k upsampled (``align_corners=False``) and min-max
    normalised (0 if constant before upsampling), ``s_k = y_c(x ⊙ M_k)`` by a full forward each, ``w = softmax(s)``."""
    out, _ = layer_output(model, layer, x)
    a = to_bchw(out)
    size = tuple(x.shape[-2:])
    maps = []
    for i, c in enumerate(targets):
        scores = []
        for k in range(a.shape[1]):
            mask = finish_maps(a[i : i + 1, k], size)[0]
            with torch.no_grad():
                scores.append(model((x[i] * mask)[None])[0, int(c)])
        w = torch.softmax(torch.stack(scores), 0)
        maps.append(torch.relu((w[:, None, None] * a[i]).sum(0)))
    return finish_maps(torch.stack(maps), size)


def hand_gradcam(model, layer, x, targets, to_bchw=lambda t: t):
    """Grad-CAM by plain autograd: the layer's output from a forward hook (a copy is handed on, so that an
    in-place operation after the layer cannot change it), ``α_k = mean_ij ∂y_c/∂A_k``, ``ReLU(Σ α_k A_k)``."""
    store = []

    def keep(m, i, o):
        store.append(o)
        return o.clone()

    h = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x.clone())  # the parameters require grad, so the layer's output does
            score = logits.gather(1, torch.as_tensor(targets)[:, None]).sum()
            (g,) = torch.autograd.grad(score, store[0])
    finally:
        h.remove()
    a, g = to_bchw(store[0].detach()), to_bchw(g)
    raw = torch.relu((g.mean((2, 3))[:, :, None, None] * a).sum(1))
    return finish_maps(raw, tuple(x.shape[-2:]))


class Softmaxed(nn.Module):
    """``softmax(model(x))``: differentiating its output ``c`` gives ``∂p_c/∂x`` (the probability score)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(1)


class _GuidedRectifierFn(torch.autograd.Function):
    """ReLU (``upper=None``) or ReLU6 with the guided rule of docs/method.md §The loss written out by hand:
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
