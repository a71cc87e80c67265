"""The engine knows every function on the gradient path: rectifiers however they are written get
the guided rule, linear and shape operations pass, everything else is refused by name unless allowed."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import igrad
from igrad import IgradError, UnsupportedActivationError
from references import GuidedRectifier, guided_by_module_swap, plain_input_gradient
from test_engine import TwoRectifierNet, manual_gradients

# --- rectifiers written as clamps, clips and thresholds get the guided rule -------------------------------

CLAMP_RELU_FORMS = {
    "torch.clamp(min=0)": lambda z: torch.clamp(z, min=0),
    "torch.clamp(z, 0, None)": lambda z: torch.clamp(z, 0, None),
    "Tensor.clamp(min=0.0)": lambda z: z.clamp(min=0.0),
    "torch.clamp_(min=0)": lambda z: torch.clamp_(z.clone(), min=0),
    "Tensor.clamp_(0)": lambda z: z.clone().clamp_(0),
    "torch.clip(min=0)": lambda z: torch.clip(z, min=0),
    "Tensor.clip(0)": lambda z: z.clip(0),
    "Tensor.clip_(min=0)": lambda z: z.clone().clip_(min=0),
    "torch.clamp_min(0)": lambda z: torch.clamp_min(z, 0),
    "Tensor.clamp_min(0.0)": lambda z: z.clamp_min(0.0),
    "torch.clamp_min_(0)": lambda z: torch.clamp_min_(z.clone(), 0),
    "Tensor.clamp_min_(0)": lambda z: z.clone().clamp_min_(0),
    "F.threshold(0, 0)": lambda z: F.threshold(z, 0.0, 0.0),
    "F.threshold(0, 0, inplace)": lambda z: F.threshold(z.clone(), 0, 0, inplace=True),
    "F.threshold_(0, 0)": lambda z: F.threshold_(z.clone(), 0, 0),
    "torch.threshold(0, 0)": lambda z: torch.threshold(z, 0, 0),
    "nn.Threshold(0, 0)": lambda z: nn.Threshold(0.0, 0.0)(z),
}
CLAMP_RELU6_FORMS = {
    "torch.clamp(0, 6)": lambda z: torch.clamp(z, 0, 6),
    "Tensor.clamp(min=0, max=6.0)": lambda z: z.clamp(min=0, max=6.0),
    "torch.clip(0.0, 6.0)": lambda z: torch.clip(z, 0.0, 6.0),
    "Tensor.clamp_(0, 6)": lambda z: z.clone().clamp_(0, 6),
    "Tensor.clip_(min=0, max=6)": lambda z: z.clone().clip_(min=0, max=6),
    "nn.Hardtanh(0, 6)": lambda z: nn.Hardtanh(0.0, 6.0)(z),
    "F.hardtanh(inplace)": lambda z: F.hardtanh(z.clone(), 0.0, 6.0, True),
    "F.hardtanh_(0, 6)": lambda z: F.hardtanh_(z.clone(), 0.0, 6.0),
}


def _check_against_hand_rule(relu6, relu, seed):
    torch.manual_seed(seed)
    net = TwoRectifierNet(relu6, relu).double()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    c = torch.tensor([0, 1, 2, 3, 4, 0])
    ref = manual_gradients(net, x, c)  # the rules of docs/method.md §The loss applied by hand, layer by layer
    res = igrad.input_gradients(net, x, c)
    torch.testing.assert_close(res.guided, ref[True])
    torch.testing.assert_close(res.standard, ref[False])
    assert not torch.allclose(ref[True], ref[False]), "the test data cannot tell guided from standard"


@pytest.mark.parametrize("form", sorted(CLAMP_RELU_FORMS))
def test_relu_written_as_clamp_or_threshold_gets_the_guided_rule(form):
    _check_against_hand_rule(nn.ReLU6(), CLAMP_RELU_FORMS[form], seed=11)


@pytest.mark.parametrize("form", sorted(CLAMP_RELU6_FORMS))
def test_relu6_written_as_clamp_or_hardtanh_gets_the_guided_rule(form):
    _check_against_hand_rule(CLAMP_RELU6_FORMS[form], nn.ReLU(), seed=12)


class ActCNN(nn.Module):
    """conv-BN-act-conv-BN-act6-pool-fc, the two activations given as callables (or modules)."""

    def __init__(self, act, act6):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act, self.act6 = act, act6
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():  # pre-activations spread over (−, 0, 6, +)
            self.bn2.weight.fill_(4.0)
            self.bn2.bias.fill_(2.0)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act6(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_clamp_network_equals_its_relu_twin_under_module_swap_guided_backprop():
    """The clamp network's guided gradient equals the guided backprop of its nn.ReLU/nn.ReLU6 twin done by
    an independent module swap (a hand-written autograd.Function), and differs from the standard one."""
    torch.manual_seed(13)
    twin = ActCNN(nn.ReLU(), nn.ReLU6()).eval()
    clamped = ActCNN(lambda z: z.clamp(min=0), lambda z: torch.clamp(z, 0, 6)).eval()
    clamped.load_state_dict(twin.state_dict())
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 1, 2, 3])
    ref, swapped = guided_by_module_swap(twin, x, t)
    assert swapped == 2
    ours = igrad.gradient(clamped, x, t, guided=True)
    scale = ref.abs().max()
    torch.testing.assert_close(ours, ref, atol=1e-6 * scale, rtol=1e-5)
    standard = igrad.gradient(clamped, x, t)
    torch.testing.assert_close(standard, plain_input_gradient(twin, x, t), atol=1e-6 * scale, rtol=1e-5)
    assert not torch.allclose(standard, ours, atol=1e-3 * scale)


# --- everything else on the path is refused by name, and allowed by that name --------------------------

UNKNOWN = {
    # form: (callable, the name the error must show)
    "torch.exp": (torch.exp, "exp"),
    "Tensor.exp_": (lambda z: z.clone().exp_(), "exp"),
    "torch.sin": (torch.sin, "sin"),
    "torch.abs": (torch.abs, "abs"),
    "abs(z)": (lambda z: abs(z), "abs"),
    "z ** 2": (lambda z: z**2, "pow"),
    "1 / z": (lambda z: 1 / z, "rdiv"),
    "z / path tensor": (lambda z: z / (z * z + 1), "div"),
    "clamp(-1, 1)": (lambda z: torch.clamp(z, -1, 1), "clamp"),
    "clamp(min=0.5)": (lambda z: z.clamp(min=0.5), "clamp"),
    "clamp(0, 1)": (lambda z: torch.clamp(z, 0, 1), "clamp"),
    "clamp(min=tensor 0)": (lambda z: torch.clamp(z, min=torch.tensor(0.0, dtype=z.dtype)), "clamp"),
    "clip(max=0)": (lambda z: torch.clip(z, max=0), "clip"),
    "clamp_min(0.1)": (lambda z: torch.clamp_min(z, 0.1), "clamp_min"),
    "clamp_max(0)": (lambda z: torch.clamp_max(z, 0), "clamp_max"),
    "threshold(0.1, 0)": (lambda z: F.threshold(z, 0.1, 0.0), "threshold"),
    "threshold(0, -1)": (lambda z: F.threshold(z, 0.0, -1.0), "threshold"),
    "hardtanh(0, 1)": (lambda z: F.hardtanh(z, 0.0, 1.0), "hardtanh"),
    "softmax": (lambda z: torch.softmax(z, 1), "softmax"),
    "F.log_softmax": (lambda z: F.log_softmax(z, 1), "log_softmax"),
    "where(z > 0, z, 0.1 z)": (lambda z: torch.where(z > 0, z, 0.1 * z), "where"),
    "masked_fill(z < 0, 0)": (lambda z: z.masked_fill(z < 0, 0.0), "masked_fill"),
    "maximum(z, 0)": (lambda z: torch.maximum(z, torch.zeros_like(z)), "maximum"),
    "max(z, dim)": (lambda z: z.max(1, keepdim=True).values * z, "max"),
    "sigmoid_": (lambda z: z.clone().sigmoid_(), "sigmoid"),
    "F.gelu": (F.gelu, "gelu"),
    "F.logsigmoid": (F.logsigmoid, "logsigmoid"),
    "nn.SiLU": (nn.SiLU(), "silu"),
    "Tensor.norm": (lambda z: z / z.detach().norm() * z.norm(), "norm"),
}


class Wrapped(nn.Module):
    """``l2(act(l1(x)))`` on flattened images: no rectifier, so guided = standard = plain autograd."""

    def __init__(self, act):
        super().__init__()
        self.l1, self.l2 = nn.Linear(12, 10), nn.Linear(10, 3)
        self.act = act

    def forward(self, x):
        return self.l2(self.act(self.l1(x.flatten(1))))


@pytest.mark.parametrize("form", sorted(UNKNOWN))
def test_unknown_function_is_refused_by_the_name_allow_takes(form):
    act, name = UNKNOWN[form]
    torch.manual_seed(14)
    net = Wrapped(act).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0])
    for guided in (True, False):
        with pytest.raises(UnsupportedActivationError) as info:
            igrad.gradient(net, x, t, guided=guided)
        assert torch._C._len_torch_function_stack() == 0, "the mode was left active"
        shown = re.search(r"allow=\['([^']+)'\]", str(info.value)).group(1)  # the name the error tells
        assert shown == name
        assert str(info.value).startswith(f"{name!r} (torch."), str(info.value)
    # allowed by that name, it keeps its ordinary backward in both passes
    ref = plain_input_gradient(net, x, t)
    torch.testing.assert_close(igrad.gradient(net, x, t, guided=True, allow=[shown]), ref)
    torch.testing.assert_close(igrad.gradient(net, x, t, allow=[shown.upper()]), ref)


def test_refusal_names_the_module_or_the_forward_that_called_it():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 2))
    with pytest.raises(UnsupportedActivationError, match=r"^'tanh' \(torch\.tanh\) \(module '2\.1', Tanh\)"):
        igrad.gradient(net, torch.randn(2, 1, 2, 2))
    wrapped = Wrapped(torch.sin)  # called from the model's own forward
    with pytest.raises(
        UnsupportedActivationError, match=r"'sin' \(torch\.sin\) \(in the forward of the model, Wrapped\)"
    ):
        igrad.gradient(wrapped, torch.randn(2, 3, 2, 2))


def test_allow_names_are_checked():
    net = Wrapped(F.gelu)
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(IgradError, match=r"allow must be a list of names, e.g. allow=\['gelu'\]"):
        igrad.gradient(net, x, allow="gelu")
    with pytest.raises(
        IgradError, match=r"unknown function name 'geluu' in allow\. Did you mean 'gelu'.*UnsupportedActivationError"
    ):
        igrad.gradient(net, x, allow=["geluu"])
    # every name the engine gives a torch function is accepted, and qualified names of functions from elsewhere
    igrad.gradient(net, x, allow=["gelu", "rdiv", "log_softmax", "mypkg.my_op"])


# --- off the gradient path: untouched ------------------------------------------------------------------


class OffPath(nn.Module):
    """Non-linearities that never reach the input gradient: of parameters alone, under no_grad, on integers
    and booleans, plus shape queries. One ReLU on the path, so the guided rule can be checked by hand."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(12, 10), nn.Linear(10, 3)
        self.log_scale = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        h = self.l1(x.flatten(1))
        scale = F.softplus(self.log_scale).exp()  # parameters only: a constant for the input gradient
        with torch.no_grad():
            _ = torch.sin(h).abs().max()  # no gradient recorded
        k = int((h.detach() > 0).sum().clamp(max=5)) + h.argmax(1).max().item() * 0
        assert h.shape[1] == h.size(1) == 10 and h.dim() == 2 and k >= 0
        return self.l2(torch.relu(h) * scale)


def test_functions_off_the_gradient_path_pass():
    torch.manual_seed(15)
    net = OffPath().double()
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0, 1])
    res = igrad.input_gradients(net, x, t)
    torch.testing.assert_close(res.standard, plain_input_gradient(net, x, t))
    with torch.no_grad():  # hand formula: δz = max(W2[c] · s, 0) · 1[z > 0], δx = δz W1
        z = x.flatten(1) @ net.l1.weight.T + net.l1.bias
        s = F.softplus(net.log_scale).exp()
        guided = ((net.l2.weight[t] * s).clamp(min=0) * (z > 0)) @ net.l1.weight
    torch.testing.assert_close(res.guided, guided.view_as(x))
    assert not torch.allclose(res.guided, res.standard)


# --- known functions pass with their ordinary backward ---------------------------------------------------


class KnownOps(nn.Module):
    """A network made of the allow-list (linear maps, products of path tensors, shape operations, pooling,
    dropout, per-sample normalisations, division by constants and parameters) with nn.ReLU rectifiers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ln, self.gn = nn.LayerNorm([8, 8, 8]), nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU()
        self.drop = nn.Dropout(0.3)
        self.temperature = nn.Parameter(torch.tensor(1.7))
        self.fc = nn.Linear(33, 4)

    def forward(self, x):
        h = self.relu1(self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect")[..., 1:-1, 1:-1]))
        h = self.gn(self.ln(h)) + self.inorm(h) * 0.5 - h / 4
        a, b = h.split(4, dim=1)
        h = torch.cat([torch.stack([a, b], 2).flatten(1, 2), b.flip(1).permute(0, 1, 3, 2)], 1)  # 12 channels
        h = F.max_pool2d(h, 2) + F.avg_pool2d(h, 2) + F.adaptive_max_pool2d(h, 4)
        h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
        q = self.relu2(h.reshape(h.shape[0], 12, -1).transpose(1, 2).contiguous())  # [B, 64, 12]
        attn = q @ q.mT / self.temperature  # a product of two path tensors, divided by a parameter
        v = torch.einsum("bij,bjc->bic", attn, q).mean(1)  # [B, 12]
        g = self.relu3(h).amax((2, 3))
        out = torch.zeros(h.shape[0], 33, dtype=h.dtype)
        out[:, :12] = self.drop(v)
        out[:, 12:24] = g.unsqueeze(-1).expand(-1, -1, 2).sum(-1)
        out[:, 24:] = h[:, :9, 0, 0].clone().to(h.dtype) - 1
        return self.fc(out)


def test_known_functions_keep_their_ordinary_backward():
    torch.manual_seed(16)
    net = KnownOps().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 1, 3])
    res = igrad.input_gradients(net, x, t)  # not refused
    torch.testing.assert_close(res.standard, plain_input_gradient(net, x, t))
    ref, swapped = guided_by_module_swap(net, x, t)
    assert swapped == 3
    torch.testing.assert_close(res.guided, ref)
    assert not torch.allclose(res.guided, res.standard)


def test_torch_batch_norm_called_directly_gets_the_statistics_rule():
    """``torch.batch_norm`` (the lower-level form) is routed like ``F.batch_norm``: with batch-frozen
    statistics both give the same per-sample gradients, unlike the coupled train-mode gradient."""

    class Net(nn.Module):
        def __init__(self, direct):
            super().__init__()
            self.direct = direct
            self.conv, self.bn, self.fc = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Linear(6, 3)

        def forward(self, x):
            h, bn = self.conv(x), self.bn
            if self.direct:
                h = torch.batch_norm(h, bn.weight, bn.bias, None, None, True, 0.1, bn.eps, False)
            else:
                h = F.batch_norm(h, None, None, bn.weight, bn.bias, True, 0.1, bn.eps)
            return self.fc(torch.relu(h).mean((2, 3)))

    torch.manual_seed(17)
    direct, functional = Net(True).double().train(), Net(False).double().train()
    functional.load_state_dict(direct.state_dict())
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    for guided in (False, True):
        a = igrad.gradient(direct, x, 1, guided=guided, stats="batch-frozen")
        torch.testing.assert_close(a, igrad.gradient(functional, x, 1, guided=guided, stats="batch-frozen"))
    coupled = plain_input_gradient(direct, x, torch.ones(5, dtype=torch.long))
    assert not torch.allclose(coupled, igrad.gradient(direct, x, 1, stats="batch-frozen"))


# --- torchvision classifiers -----------------------------------------------------------------------------


def _densenet_forward(self, x):
    """torchvision DenseNet.forward with its functional F.relu replaced by the guided module."""
    out = GuidedRectifier()(self.features(x))
    return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


RELU_MODELS = {  # name: (input size, forward override for the reference where the model calls F.relu)
    "resnet18": (64, None),
    "densenet121": (32, _densenet_forward),
    "mobilenet_v2": (32, None),
    "vgg11_bn": (32, None),
    "squeezenet1_0": (64, None),
    "shufflenet_v2_x0_5": (64, None),
}


@pytest.mark.parametrize("name", sorted(RELU_MODELS))
def test_relu_only_torchvision_classifiers_match_module_swap_guided_backprop(name):
    size, forward = RELU_MODELS[name]
    torch.manual_seed(18)
    model = torchvision.models.get_model(name, weights=None, num_classes=5).eval()
    x = torch.randn(2, 3, size, size)
    t = torch.tensor([1, 3])
    ours = igrad.input_gradients(model, x, t)  # not refused
    ref, swapped = guided_by_module_swap(model, x, t, forward)
    assert swapped > 0
    scale = ref.abs().max()
    assert scale > 0
    torch.testing.assert_close(ours.guided, ref, atol=1e-5 * scale, rtol=1e-4)
    assert not torch.allclose(ours.guided, ours.standard, atol=1e-3 * scale)


REFUSED_MODELS = {  # name: (the non-linearity, the module class calling it)
    "convnext_tiny": ("gelu", "GELU"),
    "efficientnet_b0": ("silu", "SiLU"),
    "mobilenet_v3_small": ("hardswish", "Hardswish"),
}


@pytest.mark.parametrize("name", sorted(REFUSED_MODELS))
def test_torchvision_classifiers_with_other_nonlinearities_are_refused_by_name(name):
    nonlinearity, cls = REFUSED_MODELS[name]
    torch.manual_seed(19)
    model = torchvision.models.get_model(name, weights=None, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(UnsupportedActivationError, match=rf"^'{nonlinearity}' .*\(module '[\w.]+', {cls}\)"):
        igrad.gradient(model, x, guided=True)
    # allowed one by one by the names the errors show, the model runs; without rectifiers (convnext) the
    # guided gradient is then the ordinary one
    allow: list[str] = []
    for _ in range(4):
        try:
            g = igrad.gradient(model, x, 1, guided=True, allow=allow)
            break
        except UnsupportedActivationError as e:
            allow.append(re.search(r"allow=\['([^']+)'\]", str(e)).group(1))
    assert allow[0] == nonlinearity
    if name == "convnext_tiny":
        assert allow == ["gelu"]
        ref = plain_input_gradient(model, x, torch.ones(2, dtype=torch.long))
        torch.testing.assert_close(g, ref, atol=1e-5 * ref.abs().max(), rtol=1e-4)
