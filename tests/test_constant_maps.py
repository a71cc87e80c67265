"""A constant raw map gives a map of 0 (docs/method.md §Saliency methods), whatever the layer's size: constancy is
decided before
upsampling, because bilinear upsampling of a constant is not exactly constant and min-max normalisation
would stretch its rounding into {0, 0.5, 1} speckle. A 1×1 target layer (torchvision's ResNet-18 on 32×32
images) makes every CAM map constant, and says so."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import igrad
from igrad.saliency import ScoreCAM, constant_maps, create_method, finish_maps
from references import layer_output

CAM_METHODS = ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "ablationcam", "guided-gradcam"]


@pytest.fixture(scope="module")
def tv_resnet():
    torch.manual_seed(0)
    return igrad.create_model("tv:resnet18", num_classes=10).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_bilinear_upsampling_of_a_constant_is_not_constant():
    """The mechanism in question: a 3×3 map of 0.1 upsampled to 32×32 has a span of one rounding, which a
    min-max normalisation applied afterwards would turn into values 0 and 1."""
    up = F.interpolate(torch.full((1, 1, 3, 3), 0.1), size=(32, 32), mode="bilinear", align_corners=False)
    span = float(up.max() - up.min())
    assert 0 < span < 1e-7
    assert set(((up - up.min()) / span).unique().tolist()) >= {0.0, 1.0}


@pytest.mark.parametrize(
    "raw",
    [
        torch.full((1, 1, 1), 0.3),  # a 1×1 map
        torch.full((1, 3, 3), 0.1),  # constant, inexact under interpolation
        torch.zeros(1, 4, 4),  # all zero
        torch.full((1, 2, 2), -2.5),  # negative constant (CAM is signed)
        torch.tensor([[[1e6, 1e6], [1e6, 1e6 + 0.0625]]]),  # one rounding of 1e6 apart (float32 ulp 0.0625)
        torch.full((1, 3, 3), 0.1, dtype=torch.float64),  # float64 maps: their own rounding
    ],
)
def test_hand_made_constant_raw_maps_give_zero(raw):
    assert bool(constant_maps(raw).all())
    out = finish_maps(raw, (32, 32))
    assert out.shape == (1, 32, 32) and torch.equal(out, torch.zeros_like(out))


def test_hand_made_varying_raw_maps_are_normalised_by_hand():
    """A small span that is not rounding (1e-3 of the magnitude) is a real map, normalised as docs/method.md §Saliency
    methods says:
    at equal size ``(S − min)/(max − min)`` by hand; a batch mixes constant and varying maps per image."""
    raw = torch.tensor([[[1.0, 1.001], [1.0005, 1.0]], [[0.1, 0.1], [0.1, 0.1]]])
    assert constant_maps(raw).tolist() == [False, True]
    out = finish_maps(raw, (2, 2))
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 1.0], [0.5, 0.0]]), atol=1e-3, rtol=0)
    assert torch.equal(out[1], torch.zeros(2, 2))
    # float64: a span of 1e-12 on 1.0 is more than 4 float64 roundings (8.9e-16): a map, not a constant
    fine = torch.tensor([[[1.0, 1.0 + 1e-12]]], dtype=torch.float64)
    assert not bool(constant_maps(fine)[0])
    assert finish_maps(fine, (1, 2)).tolist() == [[[0.0, 1.0]]]


def test_scorecam_masks_of_constant_channels_are_zero():
    """Score-CAM's masks follow the same rule: a channel constant before upsampling masks the image to 0; a
    varying channel is upsampled and normalised (checked by hand at equal size)."""
    torch.manual_seed(0)
    cam = ScoreCAM(igrad.create_model("tv:resnet18", num_classes=10).eval())
    a = torch.stack([torch.full((3, 3), 0.1), torch.tensor([[0.0, 2.0, 4.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])])
    masks = cam.masks(a, (32, 32))
    assert torch.equal(masks[0], torch.zeros(32, 32))
    assert float(masks[1].min()) == 0 and float(masks[1].max()) == 1
    torch.testing.assert_close(cam.masks(a, (3, 3))[1], a[1] / 4)


@pytest.mark.parametrize("name", CAM_METHODS)
def test_every_cam_method_on_a_1x1_layer_gives_zero_maps_and_warns_once(tv_resnet, x, name):
    """torchvision's ResNet-18 at 32×32 (what ``igrad train --model tv:resnet18`` on CIFAR gives): layer4 is
    1×1 (checked with a plain forward hook), every raw map is one number, so every map is 0; the method
    warns once, naming the layer."""
    out, _ = layer_output(tv_resnet, tv_resnet.layer4, x)
    assert tuple(out.shape[-2:]) == (1, 1)
    with create_method(name, tv_resnet) as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = m(x, torch.tensor([0, 3, 7]))
        again = m(x[:1])
    assert torch.equal(maps, torch.zeros(3, 32, 32)) and torch.equal(again, torch.zeros(1, 32, 32))
    messages = [str(w.message) for w in caught if "1×1" in str(w.message)]
    assert len(messages) == 1 and "'layer4'" in messages[0] and "32×32" in messages[0]


@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "xgradcam", "layercam"])
def test_pytorch_grad_cam_agrees_on_a_1x1_layer(tv_resnet, x, name):
    """pytorch-grad-cam (an independent implementation: min-max before its resize) gives 0 for these maps."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "layercam": "LayerCAM"}
    with contextlib.redirect_stderr(io.StringIO()), getattr(pgc, cls[name])(tv_resnet, [tv_resnet.layer4]) as cam:
        theirs = torch.from_numpy(cam(x, [ClassifierOutputTarget(t) for t in (0, 3, 7)]))
    assert float(theirs.abs().max()) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = create_method(name, tv_resnet)(x, torch.tensor([0, 3, 7]))
    assert torch.equal(ours, theirs.float())


def test_spatial_layer_does_not_warn(tv_resnet, x):
    """layer3 of the same network is 2×2 at 32×32: real maps, no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maps = create_method("gradcam", tv_resnet, "layer3")(x, 1)
    assert float(maps.max()) == 1.0
