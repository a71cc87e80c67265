"""The sub-batch regulariser (docs/method.md §The loss, ``fraction=ρ``) and the engine's reduced-precision paths (issue
12).

References: plain autograd in float64 on an eval-mode copy normalising with the whole batch's statistics
(tests/references.py), the guided gradient by module swap, the native convolution backward in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import igrad
from igrad import IgradError
from igrad.precision import native_bf16
from igrad.rules import BackwardRules, _conv_backward, strided_input_grad
from references import Softmaxed, batch_statistics, frozen_copy, guided_by_module_swap, plain_input_gradient


class Net(nn.Module):
    """Conv-BN-ReLU, then a strided grouped conv-BN-ReLU6 (MobileNet's shape), pooling and a linear head."""

    def __init__(self, k: int = 5) -> None:
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4), nn.BatchNorm2d(8), nn.ReLU6()
        self.fc = nn.Linear(8, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.r1(self.b1(self.c1(x)))
        x = self.r2(self.b2(self.c2(x)) * 3)
        return self.fc(x.mean((2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = Net().double().train()
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("score", ["logit", "prob"])
@pytest.mark.parametrize("error", ["cosine", "mse"])
@pytest.mark.parametrize("stats", ["batch-frozen", "running"])
def test_fraction_loss_matches_float64_reference(stats, error, score):
    """L_R on the seeded subset S, with the whole batch's statistics held constant ('batch-frozen') or the
    running ones, and the cross-entropy over the whole batch: value, logits, buffers and ∇θ of the full
    step against plain autograd in float64."""
    model = _model()
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    crit = igrad.GradientAlignmentLoss(error, stats=stats, fraction=0.5, score=score)
    l_r, logits = crit(ours, x, y, generator=torch.Generator().manual_seed(7))
    (F.cross_entropy(logits, y) + l_r).backward()

    # docs/method.md §The loss: S = the first ⌈ρ n⌉ of a seeded permutation; its passes normalise with constant
    # statistics:
    # the whole batch's, or the running ones (as with ρ = 1: after this step's training forward updated them)
    subset = torch.randperm(8, generator=torch.Generator().manual_seed(7))[:4].sort().values
    ref_logits = ref(x)  # an ordinary training forward: logits, one running-statistics update
    frozen = frozen_copy(model, batch_statistics(model, x)) if stats == "batch-frozen" else frozen_copy(ref, {})
    # score "prob": the gradients of softmax(y)_c (then L_R reaches θ through the seed p_c(e_c - p) too)
    scored = Softmaxed(frozen) if score == "prob" else frozen
    guided, swapped = guided_by_module_swap(scored, x[subset], y[subset])
    assert swapped == 2
    std = plain_input_gradient(scored, x[subset], y[subset], create_graph=True)
    ref_lr = igrad.ERRORS[error](std.flatten(1), guided.flatten(1)).mean()
    torch.testing.assert_close(l_r.detach(), ref_lr.detach())
    torch.testing.assert_close(logits, ref_logits)
    for (name, a), b in zip(ours.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    ce = torch.autograd.grad(F.cross_entropy(ref_logits, y), list(ref.parameters()))
    reg = torch.autograd.grad(ref_lr, list(frozen.parameters()), allow_unused=True)
    for (name, p), g_ce, g_r in zip(ours.named_parameters(), ce, reg, strict=True):
        torch.testing.assert_close(p.grad, g_ce + (0 if g_r is None else g_r), msg=name)


def test_fraction_with_every_sample_equals_the_full_loss():
    """⌈ρ n⌉ = n takes the subset path on all samples: the same L_R and ∇θ as ρ = 1 (batch-frozen)."""
    model = _model()
    twin = copy.deepcopy(model)
    x, y = torch.randn(6, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (6,))
    full, _ = igrad.GradientAlignmentLoss()(model, x, y)
    part, _ = igrad.GradientAlignmentLoss(fraction=0.99)(twin, x, y)
    torch.testing.assert_close(part, full)
    full.backward()
    part.backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_subset_size_and_seeding():
    crit = igrad.GradientAlignmentLoss(fraction=0.25)
    for n, k in [(10, 3), (8, 2), (128, 32), (3, 1), (1, 1)]:
        assert len(crit.subset(n)) == k
    assert len(igrad.GradientAlignmentLoss(fraction=0.3).subset(7)) == 3  # ⌈2.1⌉
    assert len(igrad.GradientAlignmentLoss(fraction=0.3).subset(10)) == 3  # 0.3 · 10 is 3, not ⌈3.0000000000000004⌉
    a = crit.subset(100, torch.Generator().manual_seed(3))
    assert torch.equal(a, crit.subset(100, torch.Generator().manual_seed(3)))
    assert torch.equal(a, a.sort().values) and len(a.unique()) == 25
    torch.manual_seed(11)  # no generator: the default one, which a trainer seeds per step
    b = crit.subset(100)
    torch.manual_seed(11)
    assert torch.equal(b, crit.subset(100))
    assert torch.equal(igrad.GradientAlignmentLoss().subset(5), torch.arange(5))


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, True, "0.5", float("nan")])
def test_bad_fraction_is_refused(fraction):
    with pytest.raises(IgradError, match="fraction must be a number in"):
        igrad.GradientAlignmentLoss(fraction=fraction)


def test_coupled_statistics_with_a_fraction_is_refused():
    with pytest.raises(IgradError, match="'coupled' has no constant statistics"):
        igrad.GradientAlignmentLoss(stats="coupled", fraction=0.5)


def test_fraction_refuses_bad_targets():
    crit = igrad.GradientAlignmentLoss(fraction=0.5)
    with pytest.raises(IgradError, match=r"target must have shape \[4\]"):
        crit(_model(), torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 1]))


def test_replayed_statistics_must_match_the_recorded_forward():
    model = _model()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    rules = BackwardRules(stats="batch-frozen")
    rules.input = x
    with rules:
        model(x)
    assert [m.shape for m, _ in rules.statistics] == [(4,), (8,)]
    with pytest.raises(IgradError, match="does not match the recorded forward"):  # more normalisations
        igrad.input_gradients(model, x, 0, stats="batch-frozen", train=True, statistics=rules.statistics[1:])
    with pytest.raises(IgradError, match="normalised 2 times, the recorded forward 3 times"):
        three = rules.statistics + rules.statistics[:1]
        igrad.input_gradients(model, x, 0, stats="batch-frozen", train=True, statistics=three)
    with pytest.raises(IgradError, match="'batch-frozen' mode only"):
        BackwardRules(stats="running", statistics=rules.statistics)


@pytest.mark.parametrize(
    "channels, size, stride, padding, dilation, kernel, groups",
    [(8, 9, (2, 2), (1, 1), (1, 1), 3, 8), (8, 10, (2, 2), (1, 1), (1, 1), 3, 8), (6, 11, (3, 3), (2, 2), (2, 2), 3, 3),
     (4, 8, (2, 2), (0, 0), (1, 1), 1, 2), (6, 7, (2, 3), (1, 0), (1, 1), 3, 6)],
)  # fmt: skip
def test_strided_input_gradient_equals_the_native_backward(channels, size, stride, padding, dilation, kernel, groups):
    torch.manual_seed(1)
    x = torch.randn(3, channels, size, size, dtype=torch.float64)
    w = torch.randn(channels, channels // groups, kernel, kernel, dtype=torch.float64)
    g = torch.randn_like(F.conv2d(x, w, None, stride, padding, dilation, groups))
    conf = (list(stride), list(padding), list(dilation), groups)
    ref = torch.ops.aten.convolution_backward(g, x, w, None, *conf[:3], False, [0, 0], groups, [True, False, False])
    torch.testing.assert_close(strided_input_grad(g, x, w, conf), ref[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_strided_depthwise_backward_is_the_exact_gradient_rounded(channels_last):
    """The bf16 path (:func:`strided_input_grad`) against the float64 native backward of the same bf16 values:
    on a CPU with bf16 units each result is a sum of 9 exact products accumulated in float32 and rounded once
    to bf16 (8 bits). Where bf16 is emulated the kernels accumulate in bf16 (measured on a Zen 3: 15 % of the
    entries off by more than one rounding, up to 0.5 % of the largest): there the path must match the CPU's
    own strided kernel, the one it replaces, to a rounding of the largest entry."""
    torch.manual_seed(2)
    x = torch.randn(4, 16, 12, 12).bfloat16()
    w = torch.randn(16, 1, 3, 3).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 16, 6, 6).bfloat16()
    conf = ([2, 2], [1, 1], [1, 1], 16)
    gx, gw, _ = _conv_backward(g, x, w, conf, [True, True, False], False)
    ref = torch.ops.aten.convolution_backward(
        g.double(), x.double(), w.double(), None, [2, 2], [1, 1], [1, 1], False, [0, 0], 16, [True, True, False]
    )
    assert gx.dtype == torch.bfloat16
    if native_bf16("cpu"):
        torch.testing.assert_close(gx.double(), ref[0], rtol=2**-8, atol=2**-8 * float(ref[0].abs().max()) * 1e-3)
        torch.testing.assert_close(gw.double(), ref[1], rtol=2**-7, atol=2**-8 * float(ref[1].abs().max()))
    else:
        own = torch.ops.aten.convolution_backward(g, x, w, None, *conf[:3], False, [0, 0], 16, [True, True, False])
        torch.testing.assert_close(gx.double(), own[0].double(), rtol=2**-8, atol=2**-8 * float(own[0].abs().max()))
        # both within a few bf16 roundings of the largest entry of the exact gradient
        for got, exact in ((gx, ref[0]), (gw, ref[1])):
            assert float((got.double() - exact).abs().max()) <= 4 * 2**-8 * float(exact.abs().max())


class _Float32Activations(TorchDispatchMode):
    """Records every op that produces a float32 activation-sized tensor (4-D, ``size`` spatially, > 3 channels)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size, self.ops = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() == 4 and tuple(t.shape[-2:]) == self.size:
                if t.shape[1] > 3 and t.dtype == torch.float32:
                    self.ops.append(str(func))
        return out


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_bf16_regularised_step_keeps_every_activation_in_bf16(fraction):
    """Under bf16 autocast no pass of the regularised step (forward, guided, standard, double backward,
    loss.backward) makes a float32 activation: no cast, no promotion through a float32 constant."""
    torch.manual_seed(3)
    model = Net().train().to(memory_format=torch.channels_last)
    x = torch.randn(6, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (6,))
    crit = igrad.GradientAlignmentLoss(fraction=fraction)
    with _Float32Activations((8, 8)) as mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l_r, logits = crit(model, x, y)
            loss = F.cross_entropy(logits.float(), y) + l_r
        loss.backward()
    assert l_r.dtype == torch.float32  # the error itself is computed in float32
    assert mode.ops == []


@pytest.mark.parametrize("bf16", [False, True])
def test_training_forward_gives_the_ordinary_training_gradients(bf16):
    """igrad.loss.training_forward (the trainer's λ = 0 step in bf16 on the CPU) is an ordinary training forward:
    its logits, running statistics and parameter gradients equal plain autograd's (float32: to kernel precision;
    bf16: the engine's stride-1 route for the strided depthwise input gradient rounds differently, so within
    bf16's ~2⁻⁸ relative per rounding times the depth, scaled by each gradient's magnitude)."""
    from igrad.loss import training_forward
    from igrad.precision import autocast
    from references import F32_KERNEL_RTOL, kernel_atol

    torch.manual_seed(0)
    ref = igrad.create_model("cifar_mobilenet_v2", num_classes=10, width=0.25).train()  # strided depthwise convs
    ours = copy.deepcopy(ref)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    torch.manual_seed(2)  # the same dropout masks in both
    with autocast("cpu", bf16):
        F.cross_entropy(ref(x).float(), y).backward()
    torch.manual_seed(2)
    with autocast("cpu", bf16):
        logits, _ = training_forward(ours, x)
        F.cross_entropy(logits.float(), y).backward()
    rel = 0.1 if bf16 else F32_KERNEL_RTOL
    for (name, a), b in zip(ref.named_parameters(), ours.parameters(), strict=True):
        scale = max(float(a.grad.abs().max()), 1e-12)
        assert float((a.grad - b.grad).abs().max()) <= rel * scale + kernel_atol(a.grad, 0.0), name
    for a, b in zip(ref.buffers(), ours.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=kernel_atol(a) if a.is_floating_point() else 0)
