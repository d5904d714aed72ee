"""MobileNetV2 (Sandler et al. 2018) with CIFAR strides, as in A-ABL's Table 6.

Same blocks as the paper (inverted residuals, ReLU6, residual only where shape is kept); for 32x32 the stem
and the second stage do not stride, leaving 4x4 maps before pooling as ImageNet's 224 px leave 7x7.
On inputs above 32 px the stem strides by 2.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model

# (expansion t, output channels c, blocks n, first stride s) from the paper's Table 2, stage 2's s 2 -> 1
CIFAR_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1)]


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers = [] if expansion == 1 else [conv_bn(cin, hidden, 1)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, act=False)]
        self.body = nn.Sequential(*layers)
        self.stride = stride
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(in_channels, 32, 3, 1 if image_size <= 32 else 2)]
        cin = 32
        for t, c, n, s in CIFAR_CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        #: the last layer at each resolution (before every stride-2 block, and the final 1x1 conv)
        ends = [i - 1 for i, m in enumerate(layers) if isinstance(m, InvertedResidual) and m.stride == 2]
        self.stage_names = tuple(f"features.{i}" for i in [*ends, len(layers) - 1] if i >= 0)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(out, 1))


@register_model("mobilenetv2", "MobileNetV2, CIFAR strides (A-ABL Table 6)", label="MobileNetV2")
def mobilenetv2(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return MobileNetV2(num_classes, in_channels, image_size)
