"""ResNet-34 (A-ABL's Tiny-ImageNet model), built from ``resnet.py``'s blocks with a CIFAR stem."""

from __future__ import annotations

from torch import nn

from .registry import register_model
from .resnet import BasicBlock, ResNet


@register_model("resnet34", "ResNet-34, CIFAR stem, stride-2 stem on 64x64 (A-ABL's Tiny-ImageNet model)",
                label="ResNet-34")
def resnet34(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels, image_size)
