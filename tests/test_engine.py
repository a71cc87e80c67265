"""The guided-gradient engine (igrad.gradient / input_gradients) against independent references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import igrad
from igrad import IgradError, UnsupportedActivationError
from references import F32_KERNEL_RTOL, batch_statistics, frozen_copy, kernel_atol, plain_input_gradient


def snapshot(model: nn.Module):
    """Everything about a model that a gradient call must leave as it was."""
    mods = []
    for name, m in model.named_modules():
        hooks = tuple(
            len(getattr(m, attr))
            for attr in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_backward_hooks",
                "_backward_pre_hooks",
                "_state_dict_hooks",
                "_load_state_dict_pre_hooks",
            )
        )
        mods.append((name, type(m), m.training, getattr(m, "inplace", None), hooks, id(m)))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return mods, state


def assert_untouched(model: nn.Module, snap) -> None:
    mods, state = snapshot(model)
    assert mods == snap[0]
    assert state.keys() == snap[1].keys()
    for k in state:
        assert torch.equal(state[k], snap[1][k]), k
    assert torch._C._len_torch_function_stack() == 0, "a torch function mode was left active"


# --- parity with pytorch-grad-cam ---------------------------------------------------------------


def test_guided_matches_pytorch_grad_cam_resnet18_image_by_image():
    from pytorch_grad_cam import GuidedBackpropReLUModel

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(8, 3, 64, 64)
    target = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    ours = igrad.gradient(model, x, target, guided=True)
    reference = GuidedBackpropReLUModel(copy.deepcopy(model), device=torch.device("cpu"))
    for i in range(8):
        theirs = torch.from_numpy(reference(x[i : i + 1], target_category=int(target[i]))).permute(2, 0, 1)
        scale = theirs.abs().max()
        assert scale > 0
        torch.testing.assert_close(ours[i], theirs, atol=kernel_atol(theirs), rtol=F32_KERNEL_RTOL)
    # and the batch of 8 in one call equals 8 single calls
    singles = torch.cat([igrad.gradient(model, x[i : i + 1], target[i : i + 1], guided=True) for i in range(8)])
    torch.testing.assert_close(ours, singles, atol=kernel_atol(ours), rtol=F32_KERNEL_RTOL)
    # the guided gradient is not the standard one
    standard = igrad.gradient(model, x, target)
    assert not torch.allclose(standard, ours, atol=1e-3 * ours.abs().max())


def test_standard_gradient_matches_plain_autograd():
    torch.manual_seed(1)
    model = igrad.create_model("cifar_resnet18", width=0.125, num_classes=5).eval().double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    ref = plain_input_gradient(model, x, torch.tensor([0, 1, 2, 3]))
    ours = igrad.gradient(model, x, torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(ours, ref)
    # target None = argmax, int = same class for all
    am = model(x).argmax(1)
    torch.testing.assert_close(igrad.gradient(model, x), igrad.gradient(model, x, am))
    torch.testing.assert_close(igrad.gradient(model, x, 2), igrad.gradient(model, x, torch.full((4,), 2)))


# --- hand-written reference for every rectifier form ------------------------------------------------

RELU_FORMS = {
    "nn.ReLU": lambda z: nn.ReLU()(z),
    "nn.ReLU(inplace)": lambda z: nn.ReLU(inplace=True)(z.clone()),
    "F.relu": F.relu,
    "F.relu(inplace)": lambda z: F.relu(z.clone(), inplace=True),
    "torch.relu": torch.relu,
    "torch.relu_": lambda z: torch.relu_(z.clone()),
    "Tensor.relu": lambda z: z.relu(),
    "Tensor.relu_": lambda z: z.clone().relu_(),
}
RELU6_FORMS = {
    "nn.ReLU6": lambda z: nn.ReLU6()(z),
    "nn.ReLU6(inplace)": lambda z: nn.ReLU6(inplace=True)(z.clone()),
    "F.relu6": F.relu6,
    "F.relu6(inplace)": lambda z: F.relu6(z.clone(), inplace=True),
    "F.hardtanh(0,6)": lambda z: F.hardtanh(z, 0.0, 6.0),
}


class TwoRectifierNet(nn.Module):
    """y = W3 · relu(W2 · relu6(W1 · x)) on flattened images, rectifiers given as callables."""

    def __init__(self, relu6, relu, d_in=48, d_h=32, k=5):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d_in, d_h), nn.Linear(d_h, d_h), nn.Linear(d_h, k)
        self.relu6, self.relu = relu6, relu
        with torch.no_grad():  # spread pre-activations over (−, 0, 6, +) so every branch of the rules is hit
            self.l1.weight.mul_(12)
            self.l1.bias.uniform_(-1, 7)

    def forward(self, x):
        return self.l3(self.relu(self.l2(self.relu6(self.l1(x.flatten(1))))))


def manual_gradients(net, x, c):
    """The guided and standard rules of docs/method.md §The loss applied by hand, layer by layer."""
    W1, W2, W3 = net.l1.weight, net.l2.weight, net.l3.weight
    with torch.no_grad():
        z1 = x.flatten(1) @ W1.T + net.l1.bias
        z2 = z1.clamp(0, 6) @ W2.T + net.l2.bias
        out = {}
        for guided in (False, True):
            d = W3[c]  # δa2
            d = (d.clamp(min=0) if guided else d) * (z2 > 0)  # δz2
            d = d @ W2  # δa1
            d = (d.clamp(min=0) if guided else d) * ((z1 > 0) & (z1 < 6))  # δz1
            out[guided] = (d @ W1).view_as(x)
    assert (z1 > 6).any() and (z1 < 0).any() and ((z1 > 0) & (z1 < 6)).any(), "test data misses a branch"
    return out


@pytest.mark.parametrize("relu6_form", sorted(RELU6_FORMS))
@pytest.mark.parametrize("relu_form", ["nn.ReLU(inplace)", "F.relu", "torch.relu", "Tensor.relu_"])
def test_rectifier_forms_match_hand_written_rule(relu6_form, relu_form):
    torch.manual_seed(2)
    net = TwoRectifierNet(RELU6_FORMS[relu6_form], RELU_FORMS[relu_form]).double()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    c = torch.tensor([0, 1, 2, 3, 4, 0])
    ref = manual_gradients(net, x, c)
    res = igrad.input_gradients(net, x, c)
    torch.testing.assert_close(res.guided, ref[True])
    torch.testing.assert_close(res.standard, ref[False])
    assert not torch.allclose(ref[True], ref[False])


@pytest.mark.parametrize("relu_form", sorted(RELU_FORMS))
def test_every_relu_form_gives_the_same_guided_gradient(relu_form):
    torch.manual_seed(3)
    net = TwoRectifierNet(RELU6_FORMS["nn.ReLU6"], RELU_FORMS[relu_form]).double()
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    ref = manual_gradients(net, x, torch.tensor([1, 2, 3, 4]))
    torch.testing.assert_close(igrad.gradient(net, x, torch.tensor([1, 2, 3, 4]), guided=True), ref[True])


class SmallCNN(nn.Module):
    """A conv net with BatchNorm, written once with modules and once with functional rectifiers."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act1, self.act2 = nn.ReLU(inplace=True), nn.ReLU6(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if self.functional:
            x = F.relu(self.bn1(self.conv1(x)), inplace=True)
            x = F.relu6(self.bn2(self.conv2(x)))
        else:
            x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def test_functional_model_equals_module_twin_and_differs_from_standard():
    torch.manual_seed(4)
    mod = SmallCNN(functional=False).eval()
    fun = SmallCNN(functional=True).eval()
    fun.load_state_dict(mod.state_dict())
    x = torch.randn(5, 3, 8, 8)
    g_mod = igrad.gradient(mod, x, 1, guided=True)
    g_fun = igrad.gradient(fun, x, 1, guided=True)
    torch.testing.assert_close(g_fun, g_mod)
    assert not torch.allclose(g_fun, igrad.gradient(fun, x, 1), atol=1e-4 * g_fun.abs().max())


def test_torchvision_densenet_functional_relu_is_guided():
    """torchvision's DenseNet calls F.relu in forward(); the engine must apply the rule there too."""
    torch.manual_seed(5)
    model = torchvision.models.densenet121(num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    rules = igrad.BackwardRules()
    with rules:
        model(x)
    n_modules = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert rules.rectifiers == n_modules + 1  # every nn.ReLU plus the F.relu before the pooling


# --- batch-frozen statistics: per-sample gradients with the batch statistics as constants ------------------------


def test_batch_frozen_equals_eval_mode_with_batch_statistics_loaded():
    torch.manual_seed(6)
    model = SmallCNN(functional=True).train().double()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    # independent reference: load each BatchNorm's batch statistics as running statistics and
    # differentiate the eval-mode copy (whose statistics are constants by construction)
    frozen_ref = frozen_copy(model, batch_statistics(model, x))
    for guided in (False, True):
        ref = (
            plain_input_gradient(frozen_ref, x, target)
            if not guided
            else igrad.gradient(frozen_ref, x, target, guided=True)
        )
        ours = igrad.gradient(model, x, target, guided=guided, stats="batch-frozen", train=True)
        torch.testing.assert_close(ours, ref)
    # and the coupled train-mode gradient is different (the samples interact through the statistics)
    coupled = igrad.gradient(model, x, target, stats="coupled", train=True)
    assert not torch.allclose(coupled, igrad.gradient(model, x, target, stats="batch-frozen", train=True), atol=1e-6)
    # per-sample: the gradient of sample 0 does not depend on the others once the statistics are fixed
    running = igrad.gradient(model, x, target, stats="running")
    torch.testing.assert_close(running[:1], igrad.gradient(model, x[:1], target[:1], stats="running"))


def test_gradient_leaves_model_untouched_in_train_mode():
    model = SmallCNN(functional=False).train()
    snap = snapshot(model)
    x = torch.randn(4, 3, 8, 8)
    for stats in igrad.STATS_MODES:
        for guided in (False, True):
            igrad.gradient(model, x, guided=guided, stats=stats, train=True)
            igrad.gradient(model, x, guided=guided, stats=stats)
    igrad.gradient_cosine(model, x)
    assert_untouched(model, snap)


def test_model_untouched_after_exception_inside_forward():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = igrad.create_model("cifar_resnet18", width=0.125, num_classes=3).train()
    model.layer3.add_module("boom", Boom())  # runs inside layer3, after rectifiers have been met
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        igrad.gradient(model, torch.randn(2, 3, 16, 16), guided=True)
    assert_untouched(model, snap)
    crit = igrad.GradientAlignmentLoss()
    with pytest.raises(RuntimeError, match="boom"):
        crit(model, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    # the loss's forward is a training forward (it may update BatchNorm statistics as any would),
    # but modules, flags, hooks and modes are as before
    assert snapshot(model)[0] == snap[0]
    assert torch._C._len_torch_function_stack() == 0


# --- clear errors ------------------------------------------------------------------------------------------


def test_unsupported_activation_is_refused_with_its_name_unless_allowed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 6, 6)
    model(x)  # materialise the lazy layer
    snap = snapshot(model)
    with pytest.raises(UnsupportedActivationError, match=r"gelu.*'1'.*GELU.*allow"):
        igrad.gradient(model, x, guided=True)
    assert_untouched(model, snap)
    g = igrad.gradient(model, x, guided=True, allow=["gelu"])
    assert g.shape == x.shape and torch.isfinite(g).all()
    fn_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    fn_model(x)
    with pytest.raises(UnsupportedActivationError, match="silu"):
        igrad.gradient(lambda_model(fn_model, F.silu), x)
    with pytest.raises(UnsupportedActivationError, match="hardtanh"):
        igrad.gradient(lambda_model(fn_model, lambda z: F.hardtanh(z, -1.0, 1.0)), x)


def lambda_model(base, act):
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(act(x))

    return Wrapped()


def test_clear_errors():
    model = igrad.create_model("cifar_resnet18", width=0.125, num_classes=3).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(IgradError, match="out of range.*3 classes"):
        igrad.gradient(model, x, torch.tensor([0, 3]))
    with pytest.raises(IgradError, match="out of range"):
        igrad.gradient(model, x, -1)
    with pytest.raises(IgradError, match=r"shape \[2\]"):
        igrad.gradient(model, x, torch.tensor([0, 1, 2]))
    with pytest.raises(IgradError, match=r"\[B, C, H, W\].*unsqueeze"):
        igrad.gradient(model, x[0])
    with pytest.raises(IgradError, match="non-finite"):
        igrad.gradient(model, x.clone().fill_(float("nan")))
    with pytest.raises(IgradError, match="integer class"):
        igrad.gradient(model, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(IgradError, match=r"unknown model 'cifar_resnet81'.*cifar_resnet18"):
        igrad.create_model("cifar_resnet81")
    with pytest.raises(IgradError, match="unknown torchvision model 'resnet5'"):
        igrad.create_model("tv:resnet5")
    with pytest.raises(IgradError, match=r"unknown error function 'cosin'.*'cosine'"):
        igrad.GradientAlignmentLoss("cosin")
    with pytest.raises(IgradError, match="unknown statistics mode"):
        igrad.gradient(model, x, stats="frozen")
    with pytest.raises(IgradError, match="width must be a positive"):
        igrad.create_model("cifar_resnet18", width=0)


# --- networks ------------------------------------------------------------------------------------------------


def test_cifar_networks_follow_spec2():
    r = igrad.create_model("cifar_resnet18", num_classes=100)
    assert r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1)
    assert [len(getattr(r, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert [getattr(r, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)] == [64, 128, 256, 512]
    assert not any(isinstance(m, nn.MaxPool2d) for m in r.modules())
    assert 11.1e6 < sum(p.numel() for p in r.parameters()) < 11.3e6  # the well-known 11.2M of CIFAR ResNet-18
    half = igrad.create_model("cifar_resnet18", num_classes=10, width=0.5)
    assert half.layer4[-1].conv2.out_channels == 256 and half.fc.out_features == 10
    m = igrad.create_model("cifar_mobilenet_v2", num_classes=100)
    assert m.features[0][0].stride == (1, 1)
    strides = [blk.stride for blk in m.features[1:-1]]
    assert strides == [1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]  # stage 2 stride 1, then 2, 2, 1, 2, 1
    assert sum(isinstance(mm, nn.ReLU6) for mm in m.modules()) == 35
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert r(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert r.get_submodule(igrad.default_target_layer(r)) is r.layer4
    assert igrad.default_target_layer(m) == "features.18"
    tv = igrad.create_model("tv:vgg11", num_classes=7)
    assert igrad.default_target_layer(tv) == f"features.{len(tv.features) - 1}"
    dense = igrad.create_model("tv:densenet121", num_classes=3)
    assert igrad.default_target_layer(dense) == "features.norm5"
    assert "cifar_resnet18" in igrad.list_models() and "tv:resnet50" in igrad.list_models(torchvision=True)
