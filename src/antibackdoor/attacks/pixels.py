"""Few-pixel triggers (Tran, Li & Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018).

The trigger sets a handful of pixels to a fixed colour; dirty label. Tran et al. use three shapes: a single
pixel, a 5-pixel "pattern" (a pixel and its four diagonal neighbours: ``layout=x``) and a 3-pixel "L"
(``layout=ell``), each at a fixed position with a fixed colour. Here the family is parameterised:

- ``layout``: ``grid`` (``pixels`` pixels in rows of ceil(sqrt(pixels)), ``spacing`` apart: 1 pixel = Tran's
  single pixel, 4 pixels with spacing 2 = four isolated pixels, 9 pixels with spacing 1 = a solid 3x3 patch),
  ``line`` (one row), ``scattered`` (distinct seeded positions in a ``box`` x ``box`` square), ``ell``, ``x``;
- position: the trigger's bounding box sits in ``corner`` at ``margin`` pixels from both borders, or its top-left
  pixel is at (``row``, ``col``) when both are given;
- ``color``: one value for every channel or one per channel, in [0, 1].

The ``paper`` preset is the released configuration of the authors' CIFAR-10 experiments (a single pixel at
row 11, column 16, colour (101, 0, 25) / 255). Deviation: Tran et al. poison samples of one source class
only; like every dirty-label attack here, this one draws them from all classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import param
from ..seeding import fixed_generator
from .base import Attack, param_error, register_attack

Layout = Literal["grid", "line", "scattered", "ell", "x"]
Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left"]

#: the fixed shapes of Tran et al., as (row, col) offsets from their bounding box's top-left pixel
SHAPES: dict[str, tuple[tuple[int, int], ...]] = {
    "ell": ((0, 0), (1, 0), (0, 1)),
    "x": ((1, 1), (0, 0), (0, 2), (2, 0), (2, 2)),
}

@dataclass(frozen=True)
class PixelsParams:
    layout: Layout = param("grid", doc="grid | line | scattered | ell (Tran's 3-pixel L) | x (Tran's 5-pixel pattern)")
    pixels: int | None = param(None, doc="number of pixels (None: 1, or 3 / 5 for ell / x, which fix it)")
    spacing: int = param(2, doc="grid and line: distance between neighbouring pixels (1 = touching)")
    box: int = param(5, doc="scattered: side of the square the pixels are drawn in")
    pattern_seed: int = param(0, doc="scattered: seed of the positions")
    corner: Corner = param("bottom-right", doc="corner of the trigger's bounding box (unless row and col are set)")
    margin: int = param(1, doc="distance of the bounding box to the corner's two borders, in pixels")
    row: int | None = param(None, doc="explicit top row of the bounding box (with col; overrides corner/margin)")
    col: int | None = param(None, doc="explicit left column of the bounding box (with row)")
    color: tuple[float, ...] = param((1.0,), doc="pixel value in [0, 1]: one for all channels or one per channel")

    def count(self) -> int:
        """How many pixels the trigger has."""
        if self.layout in SHAPES:
            return len(SHAPES[self.layout])
        return 1 if self.pixels is None else self.pixels

    def validate(self, where: str) -> None:
        if self.layout in SHAPES and self.pixels not in (None, len(SHAPES[self.layout])):
            raise param_error("pixels", f"layout {self.layout} has {len(SHAPES[self.layout])} pixels, not "
                                        f"{self.pixels}; leave pixels unset")
        if self.pixels is not None and self.pixels < 1:
            raise param_error("pixels", f"{self.pixels} must be >= 1")
        if self.spacing < 1:
            raise param_error("spacing", f"{self.spacing} must be >= 1")
        if self.box < 1:
            raise param_error("box", f"{self.box} must be >= 1")
        if self.layout == "scattered" and self.count() > self.box ** 2:
            raise param_error("pixels", f"{self.count()} pixels do not fit in a {self.box}x{self.box} box")
        if self.margin < 0:
            raise param_error("margin", f"{self.margin} must be >= 0")
        if (self.row is None) != (self.col is None):
            raise param_error("row" if self.row is None else "col", "row and col must be given together")
        if self.row is not None and (self.row < 0 or self.col < 0):
            raise param_error("row", f"({self.row}, {self.col}) must be non-negative")
        if not self.color or any(not 0.0 <= c <= 1.0 for c in self.color):
            raise param_error("color", f"{list(self.color)} must be one or more values in [0, 1]")

    def offsets(self) -> torch.Tensor:
        """K x 2 (row, col) offsets of the pixels from the bounding box's top-left pixel, which they touch."""
        n = self.count()
        if self.layout in SHAPES:
            rc = torch.tensor(SHAPES[self.layout])
        elif self.layout == "line":
            rc = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n) * self.spacing], 1)
        elif self.layout == "grid":
            cols = math.ceil(math.sqrt(n))
            i = torch.arange(n)
            rc = torch.stack([i // cols, i % cols], 1) * self.spacing
        else:  # scattered
            g = fixed_generator(self.pattern_seed)
            cells = torch.randperm(self.box ** 2, generator=g)[:n]
            rc = torch.stack([cells // self.box, cells % self.box], 1)
        return rc - rc.min(0).values

    def positions(self, h: int, w: int) -> torch.Tensor:
        """K x 2 absolute (row, col) of the trigger's pixels in an h x w image (param_error if outside)."""
        rc = self.offsets()
        bh, bw = (int(v) + 1 for v in rc.max(0).values)
        if self.row is not None:
            top, left = self.row, self.col
        else:
            top = self.margin if self.corner.startswith("top") else h - self.margin - bh
            left = self.margin if self.corner.endswith("left") else w - self.margin - bw
        if top < 0 or left < 0 or top + bh > h or left + bw > w:
            key = "row" if self.row is not None else "margin"
            raise param_error(key, f"the {bh}x{bw} trigger at ({top}, {left}) does not fit in {h}x{w} images")
        return rc + torch.tensor([top, left])

    def colour(self, channels: int) -> torch.Tensor:
        """The per-channel value (C,); param_error if ``color`` has neither 1 nor ``channels`` values."""
        if len(self.color) not in (1, channels):
            raise param_error("color", f"{len(self.color)} values for {channels}-channel images; give 1 or {channels}")
        return torch.tensor(self.color, dtype=torch.float32).expand(channels)


@register_attack
class Pixels(Attack):
    name = "pixels"
    label_mode = "dirty"
    description = "a few pixels set to a fixed colour (Tran et al.'s single-pixel / pattern triggers)"
    Params = PixelsParams
    presets = {
        "quick": PixelsParams(),
        # the authors' released CIFAR-10 configuration: one pixel at (11, 16), colour (101, 0, 25)
        "paper": PixelsParams(row=11, col=16, color=(101 / 255, 0.0, 25 / 255)),
    }

    def check_fit(self, height: int, width: int, channels: int) -> None:
        """Whether the trigger fits the images and the colour their channels."""
        self.params.positions(height, width)
        self.params.colour(channels)

    def mask(self, h: int, w: int) -> torch.Tensor:
        """h x w bool: the pixels the trigger sets."""
        m = torch.zeros(h, w, dtype=torch.bool)
        rc = self.params.positions(h, w)
        m[rc[:, 0], rc[:, 1]] = True
        return m

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        rc = self.params.positions(*x.shape[-2:]).to(x.device)
        value = self.params.colour(x.shape[1]).to(x.device, x.dtype)
        x = x.clone()
        x[:, :, rc[:, 0], rc[:, 1]] = value[None, :, None]
        return x
