"""Blend (Chen et al. 2017): the whole image is alpha-blended with a fixed pattern.

The papers blend a Hello-Kitty photo on CIFAR-10/GTSRB and uniform noise on Tiny-ImageNet. We ship no
third-party image, so the default pattern is uniform noise from a fixed seed (``pattern_seed``), which is
what A-ABL uses on Tiny-ImageNet; an own image can be given as ``pattern_file`` (any format Pillow reads).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import Attack, register_attack


def noise_pattern(seed: int, channels: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((channels, size, size), generator=g)


def image_pattern(path: str, channels: int, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(Path(path).expanduser()) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read the blend pattern ({exc})") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


@register_attack
class Blend(Attack):
    name = "blend"
    label_mode = "dirty"
    description = "whole-image blend with a fixed pattern (seeded uniform noise by default), opacity 0.1"
    params = {"alpha": 0.1, "pattern_seed": 0, "pattern_file": None}

    def pattern(self, channels: int, size: int, device: torch.device) -> torch.Tensor:
        if self.pattern_file:
            p = image_pattern(self.pattern_file, channels, size)
        else:
            p = noise_pattern(int(self.pattern_seed), channels, size)
        return p.to(device)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pattern(x.shape[1], x.shape[-1], x.device)
        a = float(self.alpha)
        return (1 - a) * x + a * p
