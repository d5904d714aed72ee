"""BadNets (Gu et al. 2017): a small white square stamped in the bottom-right corner."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import param
from .base import Attack, param_error, patch_fits, register_attack


@dataclass(frozen=True)
class BadNetsParams:
    size: int = param(3, doc="patch side in pixels")
    margin: int = param(0, doc="distance of the patch to the bottom and right border, in pixels")
    value: float = param(1.0, doc="patch intensity in [0, 1] (1 = white)")

    def validate(self, where: str) -> None:
        if self.size < 1:
            raise param_error("size", f"{self.size} must be >= 1")
        if self.margin < 0:
            raise param_error("margin", f"{self.margin} must be >= 0")
        if not 0.0 <= self.value <= 1.0:
            raise param_error("value", f"{self.value} must lie in [0, 1]")


@register_attack
class BadNets(Attack):
    name = "badnets"
    label = "BadNets"
    label_mode = "dirty"
    description = "3x3 white patch in the bottom-right corner"
    Params = BadNetsParams

    def check_fit(self, height: int, width: int, channels: int) -> None:
        """The patch and its margin must lie inside the image (a larger patch would wrap around)."""
        patch_fits(self.params.size, self.params.margin, height, width)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        s, m = self.params.size, self.params.margin
        h, w = x.shape[-2:]
        x[..., h - m - s:h - m, w - m - s:w - m] = self.params.value
        return x
