"""Default target layers: the last spatial stage, the one global pooling reads, for timm's model families as for
torchvision's. timm is not a dependency, so its families are stood in for by small modules with timm's structure
(names, order of the forward); the expected layer of each is named by hand, its output is checked to be a
spatial map with a plain forward hook, and Grad-CAM at the default layer is compared with pytorch-grad-cam at
the hand-named module."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
import torchvision
from torch import nn

import igrad
from igrad.saliency import create_method
from references import layer_output


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class MobileNetV3Like(nn.Module):
    """timm's MobileNetV3 (and LCNet, HardCoReNAS): ``conv_stem``, ``bn1``, ``blocks``, then the head
    ``global_pool`` → ``conv_head`` (a 1×1 convolution of the pooled 1×1 map) → ``act2`` → ``flatten`` →
    ``classifier``. The last convolution runs after pooling."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.bn1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())  # timm's BatchNormAct2d
        stage2 = nn.Sequential(_block(16, 24, 2), _block(24, 24, 1))
        self.blocks = nn.Sequential(nn.Sequential(_block(8, 16, 2)), stage2)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(24, 32, 1)
        self.act2 = nn.ReLU()
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bn1(self.conv_stem(x)))
        return self.classifier(self.flatten(self.act2(self.conv_head(self.global_pool(x)))))


class PooledHeadLike(nn.Module):
    """A head module that pools, then convolves (timm's ``ClNormMlpClassifierHead``-like heads): the last
    ``Conv2d``'s top-level child is ``head``, which outputs logits."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = _block(3, 8, 2)
        self.stages = nn.Sequential(_block(8, 16, 2), _block(16, 16, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Flatten(1))
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.stages(self.stem(x))))


class EfficientNetLike(nn.Module):
    """timm's EfficientNet / MobileNetV2: ``conv_head`` and ``bn2`` run *before* ``global_pool``."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.bn1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(_block(8, 16, 2), _block(16, 24, 2))
        self.conv_head = nn.Conv2d(24, 32, 1)
        self.bn2 = nn.Sequential(nn.BatchNorm2d(32), nn.ReLU())
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(self.global_pool(x).flatten(1))


class ResNetLike(nn.Module):
    """timm's ResNet: ``conv1``, ``bn1``, ``act1``, ``maxpool``, ``layer1``..``layer4``, ``global_pool``, ``fc``."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1, self.layer2 = _block(8, 8, 1), _block(8, 16, 2)
        self.layer3, self.layer4 = _block(16, 16, 1), _block(16, 24, 1)
        self.global_pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.global_pool(x).flatten(1))


class RegNetLike(nn.Module):
    """timm's RegNet: ``stem``, ``s1``..``s4``, ``final_conv`` (an Identity), ``head`` (pool and linear)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = _block(3, 8, 2)
        self.s1, self.s2 = _block(8, 16, 2), _block(16, 24, 2)
        self.final_conv = nn.Identity()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(24, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_conv(self.s2(self.s1(self.stem(x)))))


STAND_INS = [
    (MobileNetV3Like, "blocks"),
    (PooledHeadLike, "stages"),
    (EfficientNetLike, "conv_head"),
    (ResNetLike, "layer4"),
    (RegNetLike, "s2"),
]


def _gradcam_parity(model: nn.Module, expected: str, size: int) -> None:
    """Grad-CAM at the default layer equals pytorch-grad-cam's at the hand-named module."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    ours = create_method("gradcam", model)(x, torch.tensor([1, 3]))
    with contextlib.redirect_stderr(io.StringIO()), pgc.GradCAM(model, [model.get_submodule(expected)]) as cam:
        theirs = torch.from_numpy(cam(x, [ClassifierOutputTarget(1), ClassifierOutputTarget(3)]))
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize(("cls", "expected"), STAND_INS)
def test_timm_families_default_to_their_last_spatial_stage(cls, expected):
    torch.manual_seed(0)
    model = cls().eval()
    assert igrad.default_target_layer(model) == expected
    x = torch.randn(1, 3, 64, 64)
    out, _ = layer_output(model, model.get_submodule(expected), x)
    assert out.dim() == 4 and out.shape[-2:].numel() > 1  # a map global pooling reads, not a pooled 1×1
    assert create_method("gradcam", model).layer is model.get_submodule(expected)
    _gradcam_parity(model, expected, 64)


def test_finding_the_default_leaves_the_model_as_it_was():
    """The dummy forward runs in eval mode without a gradient: modes, hooks and BatchNorm statistics unchanged."""
    torch.manual_seed(0)
    model = MobileNetV3Like().train()
    model.blocks[0].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    assert igrad.default_target_layer(model) == "blocks"
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
    # a wrapper gets the inner network's layer under its prefix; the answer follows a changed structure
    assert igrad.default_target_layer(nn.DataParallel(model)) == "module.blocks"
    model.head = nn.Conv2d(24, 24, 1)  # the last Conv2d now, but never called: not a stage
    assert igrad.default_target_layer(model) == "blocks"
    model.blocks.append(_block(24, 24, 1))
    model.conv_head = nn.Conv2d(24, 32, 1)
    layer = create_method("gradcam", model).layer
    assert layer is model.blocks  # the new structure, looked up again


class FixedSize(nn.Module):
    """A model for 16×16 inputs only (a flattening linear head): the dummy forward fails, the convention holds."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def test_a_model_the_dummy_forward_cannot_run_keeps_the_convention():
    assert igrad.default_target_layer(FixedSize()) == "features.1"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", "layer4"),
        ("mobilenet_v2", "features.18"),
        ("mobilenet_v3_small", "features.12"),
        ("efficientnet_b0", "features.8"),
        ("densenet121", "features.norm5"),
        ("vgg11", "features.20"),
    ],
)
def test_torchvision_families_keep_their_last_stage(name, expected):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=4).eval()
    assert igrad.default_target_layer(model) == expected
    out, _ = layer_output(model, model.get_submodule(expected), torch.randn(1, 3, 64, 64))
    assert out.dim() == 4 and out.shape[-2:].numel() > 1
