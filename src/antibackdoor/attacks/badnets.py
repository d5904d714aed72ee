"""BadNets (Gu et al. 2017): a small white square stamped in the bottom-right corner."""

from __future__ import annotations

import torch

from .base import Attack, register_attack


@register_attack
class BadNets(Attack):
    name = "badnets"
    label_mode = "dirty"
    description = "3x3 white patch in the bottom-right corner, dirty label"
    params = {"size": 3, "margin": 0, "value": 1.0}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        s, m = int(self.size), int(self.margin)
        h, w = x.shape[-2:]
        x[..., h - m - s:h - m, w - m - s:w - m] = float(self.value)
        return x
