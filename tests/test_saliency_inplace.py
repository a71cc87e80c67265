"""CAM methods on models with in-place operations after the target layer (or on their input): the maps
equal brute-force references (one full forward per channel) computed on the same network written without
in-place operations, or with the hook handing on a copy (``tests/references.py``).

Tolerance 1e-5 on maps in [0, 1]: the methods run the same float32 layers as the references (a traced
tail, a BatchNorm-folded copy at ~1e-6 relative) and min-max normalisation divides by a span of order 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from igrad.saliency import create_method
from references import brute_ablationcam, brute_scorecam, hand_gradcam, random_batchnorm

ATOL = 1e-5


@pytest.fixture(scope="module")
def densenet():
    """torchvision's DenseNet (its forward: ``F.relu(features, inplace=True)`` right after ``norm5``), small."""
    torch.manual_seed(0)
    net = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10)
    return random_batchnorm(net, 1)


def test_densenet_ablationcam_equals_brute_force(densenet):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([2, 7])
    layer = densenet.features.norm5
    expected, tol = brute_ablationcam(densenet, layer, x, t)
    overwritten, _ = brute_ablationcam(densenet, layer, x, t, rectify_activation=True)
    assert tol < 0.01  # tight enough to tell the overwritten map apart
    assert (expected - overwritten).abs().max() > 0.05  # the symptom is visible on this input
    assert (expected.amax(dim=(1, 2)) == 1).all()
    with create_method("ablationcam", densenet) as m:
        assert m.layer_name == "features.norm5"
        fast = m(x, t)
        assert m.traced_tail() is not None  # the traced tail ran (no fallback)
    with create_method("ablationcam", densenet) as m:
        m._tail_failed = "forced"  # the whole-network fallback
        slow = m(x, t)
    assert (fast - expected).abs().max() <= tol
    assert (slow - expected).abs().max() <= tol


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("fold", [True, False])
def test_densenet_scorecam_and_gradcam_equal_references(densenet, fold):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([1, 4])
    layer = densenet.features.norm5
    with create_method("scorecam", densenet, fold_batchnorm=fold) as m:
        assert (m(x, t) - brute_scorecam(densenet, layer, x, t)).abs().max() < ATOL
    with create_method("gradcam", densenet) as m:
        assert (m(x, t) - hand_gradcam(densenet, layer, x, t)).abs().max() < ATOL


class _InPlaceNet(nn.Module):
    """stem (conv, BatchNorm) -> body (the target layer) -> ``op`` -> global average pool -> linear.

    ``op`` acts in place when ``inplace`` (else the same function out of place: the reference network):
    ``relu_``, ``mul_`` (by a per-channel gate) on the layer's output, ``add_`` adds the stem's output
    (which bypasses the layer) to it, ``skip_add_`` adds the layer's output to the bypassing value,
    ``input_mul_`` scales the input."""

    def __init__(self, op: str, inplace: bool = True) -> None:
        super().__init__()
        self.op, self.inplace = op, inplace
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.body = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)
        self.register_buffer("gate", torch.linspace(-1.0, 2.0, 8)[:, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op, inplace = self.op, self.inplace
        if op == "input_mul_":
            x = x.mul_(0.5) if inplace else x * 0.5
        s = self.stem(x)
        skip = F.avg_pool2d(s, 2)
        a = self.body(s)
        if op == "relu_":
            a = a.relu_() if inplace else a.relu()
        elif op == "mul_":
            a = a.mul_(self.gate) if inplace else a * self.gate
        elif op == "add_":
            a = a.add_(skip) if inplace else a + skip
        elif op == "skip_add_":
            a = skip.add_(a) if inplace else skip + a
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1))


OPS = ["relu_", "mul_", "add_", "skip_add_", "input_mul_"]


def _pair(op: str, seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    net = random_batchnorm(_InPlaceNet(op), seed + 1)
    with torch.no_grad():
        net.body.bias.add_(0.2)  # mostly positive, still signed: a Score-CAM map with a positive part
    twin = _InPlaceNet(op, inplace=False).eval()
    twin.load_state_dict(net.state_dict())
    return net, twin


@pytest.mark.parametrize("op", OPS)
def test_ablationcam_in_place_op_equals_brute_force(op):
    net, twin = _pair(op, 10)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    given = x.clone()
    t = torch.tensor([0, 2, 4])
    expected, tol = brute_ablationcam(twin, twin.body, x, t)
    assert tol < 0.05  # a wrong map (the activation overwritten by the in-place op) differs by ~0.1-1
    assert (expected.amax(dim=(1, 2)) == 1).sum() >= 2
    with create_method("ablationcam", net, "body", batch_size=5) as m:
        fast = m(x, t)
        assert m.traced_tail() is not None
    with create_method("ablationcam", net, "body") as m:
        m._tail_failed = "forced"
        slow = m(x, t)
    assert torch.equal(x, given)  # the caller's input is left as it was
    assert (fast - expected).abs().max() <= tol
    assert (slow - expected).abs().max() <= tol


@pytest.mark.filterwarnings("error")  # no fallback from the folded copy
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fold", [True, False])
def test_scorecam_in_place_op_equals_brute_force(op, fold):
    net, twin = _pair(op, 20)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(21))
    given = x.clone()
    t = torch.tensor([1, 3])
    with create_method("scorecam", net, "body", fold_batchnorm=fold) as m:
        ours = m(x, t)
        assert (m._folded is not None) == fold
    assert torch.equal(x, given)
    expected = brute_scorecam(twin, twin.body, x, t)
    assert (expected.amax(dim=(1, 2)) == 1).sum() >= 1
    assert (ours - expected).abs().max() < ATOL


@pytest.mark.parametrize("op", ["relu_", "mul_", "add_", "input_mul_"])  # skip_add_ breaks the model's own autograd
def test_gradcam_in_place_op_equals_reference(op):
    net, twin = _pair(op, 30)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(31))
    given = x.clone()
    t = torch.tensor([0, 1])
    with create_method("gradcam", net, "body") as m:
        ours = m(x, t)  # before: a model that scales its input in place failed on the leaf input
    assert torch.equal(x, given)
    expected = hand_gradcam(twin, twin.body, x, t)
    assert (expected.amax(dim=(1, 2)) == 1).all()
    assert (ours - expected).abs().max() < ATOL
