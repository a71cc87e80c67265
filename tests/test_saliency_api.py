"""The saliency API: registry, call shape, errors, hook and state hygiene, memory, progress bars."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import igrad
from igrad import IgradError
from igrad.saliency import METHODS, SaliencyMethod, create_method, normalize_maps

SPEC_METHODS = [
    "cam",
    "gradcam",
    "gradcam++",
    "xgradcam",
    "layercam",
    "scorecam",
    "ablationcam",
    "gradient",
    "guided",
    "smoothgrad",
    "guided-gradcam",
]
CHEAP = {"smoothgrad": {"n_samples": 2}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return igrad.create_model("cifar_resnet18", num_classes=10, width=0.125).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _hooks(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def test_registry_lists_every_spec_method():
    assert list(METHODS) == SPEC_METHODS
    assert all(issubclass(cls, SaliencyMethod) for cls in METHODS.values())
    assert {n for n, c in METHODS.items() if c.signed} == {"gradient", "guided", "smoothgrad", "guided-gradcam"}


@pytest.mark.parametrize("name", SPEC_METHODS)
def test_call_shape_range_and_target(model, x, name):
    with create_method(name, model, **CHEAP.get(name, {})) as m:
        maps = m(x, torch.tensor([3, 4]))
        default = m(x)  # None: the arg-max class
        predicted = m(x, model(x).argmax(1))
    assert maps.shape == (2, 32, 32) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert torch.equal(default, predicted)


def test_layer_as_module_or_name_and_default(model, x):
    with create_method("gradcam", model) as a, create_method("gradcam", model, model.layer4) as b:
        assert a.layer_name == b.layer_name == "layer4"
        assert torch.equal(a(x, 1), b(x, 1))
    with create_method("gradcam", model, "layer3.1") as c:
        assert c.layer is model.layer3[1]
        assert not torch.equal(c(x, 1), a(x, 1))
    mobilenet = igrad.create_model("tv:mobilenet_v2", num_classes=10)
    assert create_method("gradcam", mobilenet).layer is mobilenet.features[-1]


def test_default_layer_torchvision_densenet_by_index():
    """default_target_layer gives 'features.11' for DenseNet (an OrderedDict Sequential): resolved by index."""
    densenet = igrad.create_model("tv:densenet121", num_classes=10)
    m = create_method("gradcam", densenet)
    assert m.layer is densenet.features.norm5 and m.layer_name == "features.norm5"


def test_unknown_method_names_close_matches(model):
    with pytest.raises(IgradError, match=r"unknown saliency method 'gradcm'.*'gradcam'"):
        create_method("gradcm", model)
    # every unknown name of a list at once, each with its own closest matches; known names are not listed as wrong
    with pytest.raises(IgradError) as err:
        igrad.saliency.resolve_methods("gradcm, cam,lyercam,nonsense")
    text = str(err.value)
    assert text.startswith("3 unknown saliency method names: 'gradcm' (did you mean 'gradcam'")
    assert "'lyercam' (did you mean 'layercam'" in text and "; 'nonsense'." in text
    assert "'cam' (" not in text and "Known: ablationcam, cam," in text
    with pytest.raises(IgradError, match=r"^unknown saliency method 'gradcm'\. Did you mean"):  # a repeat: once
        igrad.saliency.resolve_methods(["gradcm", "gradcm"])


def test_missing_target_layer_names_closest(model):
    with pytest.raises(IgradError, match=r"no target layer 'layer5'.*Closest: 'layer4'"):
        create_method("gradcam", model, "layer5")
    with pytest.raises(IgradError, match=r"'layer4\.1\.conv2'"):
        create_method("gradcam", model, "layer4.1.conv3")
    with pytest.raises(IgradError, match="not a module of"):
        create_method("gradcam", model, nn.Conv2d(3, 3, 1))


def test_bad_options(model):
    with pytest.raises(IgradError, match="bad arguments for saliency method 'gradcam'.*"):
        create_method("gradcam", model, batch_size=3)
    with pytest.raises(IgradError, match="batch_size must be a positive integer"):
        create_method("scorecam", model, batch_size=0)
    with pytest.raises(IgradError, match="uses no target layer"):
        create_method("gradient", model, "layer4")
    with pytest.raises(IgradError, match="must output feature maps"):
        with create_method("gradcam", model, "fc") as m:
            m(torch.randn(1, 3, 32, 32))


def test_cam_refuses_model_without_gap_linear_head(x):
    no_gap = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 32 * 32, 10))
    with pytest.raises(IgradError, match="global average pooling and one linear layer"):
        create_method("cam", no_gap, "1")(x)
    mlp_head = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 10),
    )  # fmt: skip
    with pytest.raises(IgradError, match="not a linear function of its global average pool"):
        create_method("cam", mlp_head, "1")(x)


@pytest.mark.parametrize("bad,match", [
    (torch.randn(3, 32, 32), r"shape \[B, C, H, W\].*unsqueeze"),
    (torch.randint(0, 255, (2, 3, 32, 32)), "floating-point"),
    (torch.full((1, 3, 32, 32), float("nan")), "non-finite"),
])  # fmt: skip
def test_wrong_images(model, bad, match):
    # a wrong channel count is the model's own error, with a note: tests/test_model_output.py
    for name in ("gradcam", "gradient"):
        with pytest.raises(IgradError, match=match):
            create_method(name, model)(bad)


def test_bad_target(model, x):
    with pytest.raises(IgradError, match="out of range"):
        create_method("gradcam", model)(x, 10)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name", SPEC_METHODS)
@pytest.mark.parametrize("when", [1, 2])  # in the method's first forward / in a later one (ablations, masks, ...)
def test_no_hooks_and_state_restored_after_error_in_model(name, when):
    torch.manual_seed(2)
    model = igrad.create_model("cifar_resnet18", num_classes=10, width=0.125)
    model.train()
    model.layer2.eval()  # a mixed mode, to be restored exactly
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def bomb(module, inputs):
        calls.append(1)
        if len(calls) >= when:
            raise _Boom("inside the model")

    handle = model.fc.register_forward_pre_hook(bomb)
    x = torch.randn(2, 3, 32, 32)
    try:
        with pytest.raises(_Boom):
            with create_method(name, model, **CHEAP.get(name, {})) as m:
                m(x, 1)
                m(x, 1)  # when=2 and a one-forward method: the second call raises
        assert _hooks(model) == 1  # only the bomb
    finally:
        handle.remove()
    assert _hooks(model) == 0
    assert model.training and not model.layer2.training and model.layer1.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def _live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no lazy-attr warnings


@pytest.mark.parametrize("name", ["gradcam", "ablationcam", "scorecam", "guided-gradcam", "smoothgrad"])
def test_memory_flat_over_50_calls(model, x, name):
    with create_method(name, model, **CHEAP.get(name, {})) as m:
        for _ in range(3):
            m(x, 1)
        before = _live_tensors()
        for _ in range(50):
            maps = m(x, 1)
        del maps
        after = _live_tensors()
    assert after <= before
    assert _hooks(model) == 0


def test_train_mode_model_is_explained_in_eval_mode_and_restored(x):
    torch.manual_seed(3)
    model = igrad.create_model("cifar_resnet18", num_classes=10, width=0.125)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with create_method("gradcam", model) as m:
        model.train()
        in_train = m(x, 1)
        assert model.training
        model.eval()
        assert torch.equal(in_train, m(x, 1))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_hooks_only_inside_with_block(model, x):
    m = create_method("gradcam", model)
    assert _hooks(model) == 0
    with m:
        assert _hooks(model) == 1
        m(x)
        assert _hooks(model) == 1
    assert _hooks(model) == 0
    m(x)  # also usable without `with`: hooks held for the call only
    assert _hooks(model) == 0


def test_normalize_maps_hand_computed():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[0.0, 0.0], [0.0, 0.0]], [[-2.0, -2.0], [-2.0, -2.0]]])
    out = normalize_maps(maps)
    assert torch.equal(out[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2)) and torch.equal(out[2], torch.zeros(2, 2))


def test_signed_attribution_only_for_gradient_family(model, x):
    with pytest.raises(IgradError, match="no signed attribution"):
        create_method("gradcam", model).attribute(x)
    attr = create_method("gradient", model).attribute(x, 1)
    assert attr.shape == x.shape and (attr < 0).any() and (attr > 0).any()


def test_progress_bar_on_request_only(model, x, capsys):
    with create_method("scorecam", model, batch_size=16, progress=True) as m:
        m(x, 1)
    assert "scorecam" in capsys.readouterr().err
    with create_method("scorecam", model, batch_size=16) as m:  # auto: not a terminal here
        m(x, 1)
    assert "scorecam" not in capsys.readouterr().err


def test_methods_work_under_an_outer_no_grad():
    """A user's `with torch.no_grad():` around a call (as for inference) must not break the gradient-based
    methods: each map equals the one computed outside no_grad."""
    torch.manual_seed(0)
    model = igrad.create_model("cifar_resnet18", num_classes=10, width=0.125).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name in ("gradcam", "gradcam++", "xgradcam", "layercam", "gradient", "guided", "guided-gradcam"):
        with create_method(name, model) as m:
            free = m(x, 1)
            with torch.no_grad():
                assert torch.equal(m(x, 1), free), name
