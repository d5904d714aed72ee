"""Small fast CNNs for the CPU `quick` preset (thousands of images per second on 2 cores)."""

from __future__ import annotations

from torch import nn

from .registry import register_model


def _block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                               nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers


class SmallCNN(nn.Module):
    """Four 3x3 conv blocks (widths w, 2w, 4w, 8w), max-pooling after the first three, global max-pooling.

    Pooling early keeps it at ~1,600 img/s training on 2 CPU cores (bf16, channels_last); global max-pooling
    lets a small corner patch dominate a feature, so patch backdoors are learned as firmly as by a ResNet.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_block(in_channels, w, True), *_block(w, 2 * w, True), *_block(2 * w, 4 * w, True),
            *_block(4 * w, 8 * w, False),
        )
        #: the output of each conv block (after its pool): the network's stages (see features.py)
        self.stage_names = ("features.3", "features.7", "features.11", "features.14")
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


@register_model("cnn", "4-conv CNN (width 32), the quick preset's model")
def cnn(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width=32)


@register_model("cnn-small", "4-conv CNN (width 16), for tests")
def cnn_small(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width=16)
