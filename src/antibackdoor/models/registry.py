"""Model registry: ``build_model(name, num_classes, in_channels, ...)`` returns a network that takes
pixels in [0, 1] and normalises them itself, so attacks and defenses always use pixel-unit eps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..registry import Registry


class Normalize(nn.Module):
    """(x - mean) / std per channel, as the first layer of every model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Normalized(nn.Sequential):
    """A backbone behind a Normalize layer; ``.backbone`` gives the raw network."""

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__(Normalize(mean, std), backbone)

    @property
    def backbone(self) -> nn.Module:
        return self[1]


Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder
    description: str
    #: how tables name it (the papers' spelling, e.g. ``ResNet-18``); empty: the name
    label: str = ""

    def display_label(self) -> str:
        return self.label or self.name


MODELS: Registry[ModelEntry] = Registry("model", "--model")


def register_model(name: str, description: str = "", label: str = ""):
    """Decorator: ``builder(num_classes, in_channels, image_size) -> nn.Module`` (without normalisation)."""

    def deco(fn: Builder) -> Builder:
        MODELS.register(ModelEntry(name, fn, description, label))
        return fn

    return deco


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """Build a registered model with its normalisation layer (mean 0.5 / std 0.25 when not given)."""
    entry = MODELS.lookup(name)
    mean = tuple(mean) if mean is not None else (0.5,) * in_channels
    std = tuple(std) if std is not None else (0.25,) * in_channels
    backbone = entry.builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    return Normalized(backbone, mean, std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
