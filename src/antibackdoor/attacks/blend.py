"""Blend (Chen et al. 2017): the whole image is alpha-blended with a fixed pattern.

The papers blend a Hello-Kitty photo on CIFAR-10/GTSRB and uniform noise on Tiny-ImageNet. We ship no
third-party image, so the default pattern is uniform noise from a fixed seed (``pattern_seed``), which is
what A-ABL uses on Tiny-ImageNet; an own image can be given as ``pattern_file`` (any format Pillow reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import param
from ..data.images import decode_image
from ..errors import DataError
from ..seeding import fixed_generator
from .base import Attack, param_error, register_attack


def noise_pattern(seed: int, channels: int, size: int) -> torch.Tensor:
    g = fixed_generator(seed)
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


@dataclass(frozen=True)
class BlendParams:
    alpha: float = param(0.1, doc="opacity of the pattern in [0, 1]")
    pattern_seed: int = param(0, doc="seed of the uniform-noise pattern")
    pattern_file: str | None = param(None, doc="an image file to blend instead of the noise (resized)")

    def validate(self, where: str) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise param_error("alpha", f"{self.alpha} must lie in [0, 1]")
        if self.pattern_file:  # read it now, before a run directory exists, not when the first image is poisoned
            path = Path(self.pattern_file).expanduser()
            if not path.is_file():
                raise param_error("pattern_file", f"{self.pattern_file}: no such file")
            try:
                decode_image(path, 4)
            except DataError as exc:
                raise param_error("pattern_file", f"{self.pattern_file}: {str(exc).split(': ', 1)[-1]}") from None


@register_attack
class Blend(Attack):
    name = "blend"
    label = "Blend"
    label_mode = "dirty"
    description = "whole-image blend with a fixed pattern (seeded uniform noise by default), opacity 0.1"
    Params = BlendParams

    def pattern(self, channels: int, size: int, device: torch.device) -> torch.Tensor:
        p = self.params
        pattern = image_pattern(p.pattern_file, channels, size) if p.pattern_file else \
            noise_pattern(p.pattern_seed, channels, size)
        return pattern.to(device)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        a = self.params.alpha
        return (1 - a) * x + a * self.pattern(x.shape[1], x.shape[-1], x.device)
