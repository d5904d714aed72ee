"""Wide ResNets WRN-16-1 / WRN-16-2 (Zagoruyko & Komodakis 2016), AIBD's GTSRB model.

This follows the implementation ABL, NAD and BackdoorBench use (pre-activation blocks, widths 16, 16k,
32k, 64k, two blocks a group for depth 16, no dropout), so parameter counts match theirs (WRN-16-1 ~0.17 M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3; a 1x1 conv on the pre-activated input when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k with a 3x3 stem (stride 2 on inputs above 32 px, so 64x64 costs what 32x32 does)."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1 if image_size <= 32 else 2, 1, bias=False)
        groups, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(cin, w, (1 if i == 0 else 2) if j == 0 else 1))
                cin = w
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.stage_names = tuple(f"groups.{i}" for i in range(len(groups)))
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)
        for m in self.modules():  # the original's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.groups(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("wrn16-1", "WRN-16-1, wide ResNet of width 1 (AIBD's GTSRB model)", label="WRN-16-1")
def wrn16_1(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return WideResNet(16, 1, num_classes, in_channels, image_size)


@register_model("wrn16-2", "WRN-16-2, wide ResNet of width 2", label="WRN-16-2")
def wrn16_2(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return WideResNet(16, 2, num_classes, in_channels, image_size)
