"""VGG16 with BatchNorm in its CIFAR form (one linear classifier on 512 features), as in A-ABL's Table 6.

The ImageNet VGG16's two 4096-wide layers hold ~120 M of its 138 M parameters and are dropped here, as in
the common CIFAR implementations; pools use ceil mode so 28x28 inputs survive the five halvings.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """Conv3x3-BN-ReLU stacks and max-pools; the first conv strides by 2 on inputs above 32 px."""

    def __init__(self, cfg: list, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        cin, stride = in_channels, 1 if image_size <= 32 else 2
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            layers += [nn.Conv2d(cin, v, 3, stride, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin, stride = v, 1
        self.features = nn.Sequential(*layers)
        #: every max-pool closes a stage
        self.stage_names = tuple(f"features.{i}" for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d))
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


@register_model("vgg16", "VGG16 with BatchNorm, CIFAR head (one linear layer; A-ABL Table 6)", label="VGG16")
def vgg16(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return VGG(VGG16, num_classes, in_channels, image_size)
