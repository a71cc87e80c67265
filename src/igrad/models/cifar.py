"""The CIFAR networks of docs/method.md §Networks and recipes, assembled from torchvision's own building blocks."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import MobileNetV2
from torchvision.models.resnet import BasicBlock

from ..errors import IgradError
from . import register_model


def _check_width(width: float) -> float:
    if not isinstance(width, int | float) or not width > 0:
        raise IgradError(f"width must be a positive number, got {width!r}")
    return float(width)


class CifarResNet(nn.Module):
    """CIFAR ResNet-18: ``conv3×3(s1)-BN-ReLU → layer1..4 (BasicBlock ×[2,2,2,2]) → GAP → fc``.

    Stage widths are ``round(w · (64, 128, 256, 512))``; strides 1, 2, 2, 2. Module names follow
    torchvision's ResNet (``conv1``, ``bn1``, ``layer1``..``layer4``, ``fc``).
    """

    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, num_classes: int = 100, width: float = 1.0, blocks: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__()
        width = _check_width(width)
        widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        for i, (planes, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                s = stride if j == 0 else 1
                down = None
                if s != 1 or inplanes != planes:
                    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=s, bias=False), nn.BatchNorm2d(planes))
                layers.append(BasicBlock(inplanes, planes, stride=s, downsample=down))
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, 3, H, W]``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("cifar_resnet18", default_target_layer="layer4", input_size=(3, 32, 32))
def cifar_resnet18(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-18 of docs/method.md §Networks and recipes with width multiplier ``width``."""
    return CifarResNet(num_classes=num_classes, width=width)


@register_model("cifar_mobilenet_v2", default_target_layer="features.18", input_size=(3, 32, 32))
def cifar_mobilenet_v2(num_classes: int = 100, width: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """torchvision's MobileNet-V2 with ReLU6, adapted to 32×32: stem stride 1, stage 2 stride 1.

    Channels are ``make_divisible(c · width, 8)`` as in torchvision; the last 1×1 conv keeps
    ``1280 · max(1, width)`` channels. Default target layer: ``features.18`` (the last feature block, at
    every width).
    """
    width = _check_width(width)
    setting = [
        # t, c, n, s
        [1, 16, 1, 1],
        [6, 24, 2, 1],  # 2 in the ImageNet network
        [6, 32, 3, 2],
        [6, 64, 4, 2],
        [6, 96, 3, 1],
        [6, 160, 3, 2],
        [6, 320, 1, 1],
    ]
    model = MobileNetV2(num_classes=num_classes, width_mult=width, inverted_residual_setting=setting, dropout=dropout)
    stem = model.features[0][0]
    assert isinstance(stem, nn.Conv2d)
    stem.stride = (1, 1)  # 2 in the ImageNet network
    return model
