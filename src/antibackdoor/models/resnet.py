"""CIFAR-style ResNets (3x3 stem, no max-pool) in plain torch: PreAct-ResNet18 and ResNet-18."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    """ResNet with a CIFAR stem (3x3 conv, stride 1); for 64x64 inputs the stem strides by 2."""

    def __init__(self, block, num_blocks: list[int], num_classes: int, in_channels: int = 3,
                 image_size: int = 32, preact: bool = False):
        super().__init__()
        self.preact = preact
        stem_stride = 1 if image_size <= 32 else 2
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stem_stride, 1, bias=False)
        self.bn1 = None if preact else nn.BatchNorm2d(64)
        layers, cin = [], 64
        for i, (width, n) in enumerate(zip([64, 128, 256, 512], num_blocks, strict=True)):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            blocks = []
            for s in strides:
                blocks.append(block(cin, width, s))
                cin = width
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.stage_names = tuple(f"layers.{i}" for i in range(len(layers)))
        self.bn_final = nn.BatchNorm2d(512) if preact else None
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        if self.bn1 is not None:
            out = F.relu(self.bn1(out))
        out = self.layers(out)
        if self.bn_final is not None:
            out = F.relu(self.bn_final(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model("preact-resnet18", "PreAct-ResNet18, CIFAR stem (BackdoorBench's default)", label="PreAct-ResNet18")
def preact_resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return ResNet(PreActBlock, [2, 2, 2, 2], num_classes, in_channels, image_size, preact=True)


@register_model("resnet18", "ResNet-18, CIFAR stem (A-ABL's and AIBD's CIFAR-10 model)", label="ResNet-18")
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, image_size)
