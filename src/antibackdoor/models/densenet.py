"""DenseNet-121 (Huang et al. 2017; growth 32, blocks 6-12-24-16, compression 0.5) with a CIFAR stem.

The ImageNet stem (7x7 stride-2 conv and a max-pool) would shrink 32x32 inputs to 8x8 before the first
block; here it is one 3x3 conv to 64 channels (stride 2 on inputs above 32 px), as in A-ABL's Table 6 setting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1 (4 x growth), BN-ReLU-conv3x3 (growth); output concatenated to the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    def __init__(self, blocks: list[int], growth: int, num_classes: int, in_channels: int = 3,
                 image_size: int = 32, reduction: float = 0.5):
        super().__init__()
        c = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, c, 3, 1 if image_size <= 32 else 2, 1, bias=False)
        layers: list[nn.Module] = []
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(Bottleneck(c, growth))
                c += growth
            if i < len(blocks) - 1:
                layers.append(Transition(c, int(c * reduction)))
                c = int(c * reduction)
        self.features = nn.Sequential(*layers)
        #: each dense block ends a stage: at its transition (which pools), and the last block at its end
        self.stage_names = tuple(f"features.{i}" for i, m in enumerate(layers)
                                 if isinstance(m, Transition) or i == len(layers) - 1)
        self.bn = nn.BatchNorm2d(c)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.features(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("densenet121", "DenseNet-121 (growth 32), 3x3 stem (A-ABL Table 6)", label="DenseNet121")
def densenet121(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return DenseNet([6, 12, 24, 16], 32, num_classes, in_channels, image_size)
