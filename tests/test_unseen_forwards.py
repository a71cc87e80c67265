"""Forwards the backward-rule engine cannot see, or that record no graph.

* TorchScript (``torch.jit.script`` / ``trace``, a scripted part inside an eager model, a ``forward`` that is a
  ``ScriptFunction``) runs past the engine's ``TorchFunctionMode`` and past module hooks: without a refusal the
  guided gradient would be the plain one and the regulariser 0. Every entry point that needs the rules or hooks
  refuses it with one error; the metrics, which only run the model, accept it.
* Inside ``torch.inference_mode()`` (a Lightning validation step) every explanation is the one computed
  outside it; a forward that cuts the graph itself (``.detach()``, ``torch.no_grad()``) gets a clear error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import igrad
from igrad import IgradError
from igrad.metrics import compute_metrics
from igrad.normalization import Normalization
from igrad.saliency import METHODS, create_method
from references import guided_by_module_swap, hand_gradcam, plain_input_gradient

CHEAP = {"smoothgrad": {"n_samples": 2}}
NORM = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


class Net(nn.Module):
    """A small scriptable CNN with BatchNorm and ReLU modules (the default target layer: ``features``)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _relu_mean(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).mean(dim=(2, 3))


with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.compile
    _scripted_forward = torch.jit.script(_relu_mean)


class ScriptedForward(nn.Module):
    """An eager module whose ``forward`` is a TorchScript function."""

    forward = _scripted_forward


class PartlyScripted(nn.Module):
    """An eager model with a scripted backbone."""

    def __init__(self, net: Net) -> None:
        super().__init__()
        self.backbone = torch.jit.script(net.features)
        self.head = nn.Sequential(net.pool, nn.Flatten(), net.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        bn = net.features[1]
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _scripted_models(net: Net, x: torch.Tensor) -> dict[str, tuple[nn.Module, str]]:
    """Each way a model runs TorchScript, with the part the error must name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.compile
        wrapped = nn.Sequential(net.features, ScriptedForward(), net.fc)
        return {
            "script": (torch.jit.script(net), "the whole model"),
            "trace": (torch.jit.trace(net, x[:1]), "the whole model"),
            "scripted part": (PartlyScripted(net), "'backbone'"),
            "forward is a ScriptFunction": (wrapped, "'1'"),
        }


def test_guided_gradient_is_not_the_plain_one_on_this_net(x):
    """Why a silent TorchScript forward is wrong: the true guided gradient (module swap, plain autograd) differs
    from the plain gradient, which is what the engine computes when it cannot see the rectifiers."""
    net, t = _net(), torch.tensor([0, 1, 2])
    guided = guided_by_module_swap(net, x, t)[0]
    plain = plain_input_gradient(net, x, t)
    torch.testing.assert_close(igrad.gradient(net, x, t, guided=True), guided, rtol=1e-5, atol=1e-6)
    assert (guided - plain).abs().max() > 0.1 * plain.abs().max()


@pytest.mark.parametrize("kind", ["script", "trace", "scripted part", "forward is a ScriptFunction"])
def test_torchscript_is_refused_by_every_entry_point_that_needs_the_rules(x, kind):
    net = _net()
    model, part = _scripted_models(net, x)[kind]
    t = torch.tensor([0, 1, 2])
    calls = {
        "gradient": lambda: igrad.gradient(model, x, t),
        "guided": lambda: igrad.gradient(model, x, t, guided=True),
        "cosine": lambda: igrad.gradient_cosine(model, x, t),
        "input_gradients": lambda: igrad.input_gradients(model, x, t),
        "loss": lambda: igrad.GradientAlignmentLoss()(model, x, t),
        "loss fraction": lambda: igrad.GradientAlignmentLoss(fraction=0.5)(model, x, t),
    }
    calls.update({name: (lambda name=name: create_method(name, model, **CHEAP.get(name, {}))) for name in METHODS})
    for name, call in calls.items():
        with pytest.raises(IgradError, match="runs TorchScript") as err:
            call()
        assert part in str(err.value) and "eager" in str(err.value), name


def test_metrics_accept_torchscript_and_agree_with_the_eager_model(x):
    """The metrics only run the model: a scripted copy gives the eager model's numbers (its own forward)."""
    net = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(net)
    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    eager = compute_metrics(net, x, maps, 1, normalization=NORM, step=32)
    script = compute_metrics(scripted, x, maps, 1, normalization=NORM, step=32)
    for k in eager.values:
        torch.testing.assert_close(script.values[k], eager.values[k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_inside_inference_mode_gives_the_maps_from_outside(x, name):
    net = _net()
    t = torch.tensor([4, 0, 2])
    kwargs = CHEAP.get(name, {})
    outside = create_method(name, net, **kwargs)(x, t)
    with torch.inference_mode():
        xi, ti = x.clone(), t.clone()  # inference tensors, as a validation step has them
        with create_method(name, net, **kwargs) as m:
            inside = m(xi, ti)
            signed = m.attribute(xi, ti) if m.signed else None
    assert torch.equal(inside, outside)
    if signed is not None:
        assert torch.equal(signed, create_method(name, net, **kwargs).attribute(x, t))
    assert all(not mod._forward_hooks for mod in net.modules())


def test_gradients_inside_inference_mode_match_plain_autograd(x):
    net = _net()
    t = torch.tensor([1, 2, 3])
    with torch.inference_mode():
        xi = x.clone()
        g = igrad.gradient(net, xi, t)
        guided = igrad.gradient(net, xi, t, guided=True)
        cos = igrad.gradient_cosine(net, xi, t)
        maps = create_method("gradcam", net)(xi, t)
    torch.testing.assert_close(g, plain_input_gradient(net, x, t), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(guided, guided_by_module_swap(net, x, t)[0], rtol=1e-5, atol=1e-7)
    assert cos.shape == (3,) and bool((cos.abs() <= 1).all())
    torch.testing.assert_close(maps, hand_gradcam(net, net.features, x, t), rtol=0, atol=1e-5)


class Cut(nn.Module):
    """``Net`` whose forward cuts the graph after the features: ``.detach()`` or ``torch.no_grad()``."""

    def __init__(self, net: Net, how: str) -> None:
        super().__init__()
        self.net, self.how = net, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "no_grad":
            with torch.no_grad():
                h = self.net.features(x)
        elif self.how == "inference_mode":
            with torch.inference_mode():
                h = self.net.features(x).clone()
            h = h.clone()  # a normal tensor again, without a graph
        else:
            h = self.net.features(x).detach()
        return self.net.fc(self.net.pool(h).flatten(1))


@pytest.mark.parametrize("how", ["detach", "no_grad", "inference_mode"])
def test_a_forward_that_cuts_the_graph_gets_a_clear_error(x, how):
    model = Cut(_net(), how)
    t = torch.tensor([0, 1, 2])
    for call in (
        lambda: igrad.gradient(model, x, t),
        lambda: igrad.gradient(model, x, t, guided=True),
        lambda: igrad.gradient_cosine(model, x, t),
        lambda: igrad.GradientAlignmentLoss()(model.train(), x, t),
        lambda: create_method("smoothgrad", model, n_samples=2)(x, t),
        lambda: create_method("guided", model)(x, t),
    ):
        with pytest.raises(IgradError, match="do not depend on its input x through autograd"):
            call()
        model.eval()
    for name in ("gradcam", "gradcam++", "layercam", "xgradcam", "guided-gradcam"):
        with pytest.raises(IgradError, match="do not depend on the output of target layer 'net.features'"):
            create_method(name, model, "net.features")(x, t)
    # the gradient-free methods need no graph: the same maps as the uncut model (a plain forward each)
    for name in ("scorecam", "ablationcam"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a traced tail may fall back to whole-network runs
            cut = create_method(name, model, "net.features")(x, t)
        torch.testing.assert_close(cut, create_method(name, model.net, "features")(x, t), rtol=0, atol=1e-5)


def test_a_compiled_submodule_runs_eagerly_where_the_rules_and_hooks_see_it(x):
    """A submodule compiled with torch.compile inside an eager model: its graph would run past the rules and
    hooks, so igrad runs its Python forward (same parameters). Guided gradient against the module swap,
    Grad-CAM at a layer inside it against plain-autograd Grad-CAM, and the regulariser against the eager net's."""
    net = _net()
    t = torch.tensor([0, 1, 2])
    model = nn.Sequential(torch.compile(net.features, backend="eager"), net.pool, nn.Flatten(), net.fc)
    torch.testing.assert_close(
        igrad.gradient(model, x, t, guided=True), guided_by_module_swap(net, x, t)[0], rtol=1e-5, atol=1e-7
    )
    maps = create_method("gradcam", model, "0._orig_mod.3")(x, t)
    torch.testing.assert_close(maps, hand_gradcam(net, net.features[3], x, t), rtol=0, atol=1e-5)
    loss, _ = igrad.GradientAlignmentLoss()(model, x, t)
    eager, _ = igrad.GradientAlignmentLoss()(net, x, t)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
