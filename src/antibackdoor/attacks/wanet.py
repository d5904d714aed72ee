"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warping trigger.

The trigger is a fixed, smooth warping field: a k x k grid of random offsets (normalised to mean magnitude 1),
upsampled bicubically to the image size, scaled by ``s / H`` and added to the identity sampling grid (times
``grid_rescale``); ``F.grid_sample`` resamples the image along it. Defaults are the paper's CIFAR-10 values:
k = 4, s = 0.5, grid_rescale = 1. That sub-pixel warp is learned only from much data and long training: on
the mini CIFAR-10 quick setting it reaches ~36% ASR, s = 3 ~88% (docs/attacks.md).

Noise mode: besides the ``rate * N`` backdoor samples (warped, relabelled to the target), ``cross_ratio``
times as many other samples are warped with the trigger field plus per-sample random noise (up to one pixel)
and keep their true labels. They teach the network that only the exact field means "target", which makes the
trigger hard to detect; they are not in the poison mask (they carry no backdoor trigger) but in the poisoned set's
``cover_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import param
from ..data.imageset import ImageSet
from ..seeding import fixed_generator
from .base import Attack, map_uint8, param_error, register_attack


def warp_field(height: int, width: int, k: int, s: float, grid_rescale: float, seed: int,
               device: torch.device | None = None) -> torch.Tensor:
    """The 1 x H x W x 2 sampling grid (x, y in [-1, 1]) of the trigger, drawn from ``seed``."""
    g = fixed_generator(seed)
    ins = torch.rand((1, 2, k, k), generator=g) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    identity = torch.stack((xs, ys), dim=2)[None]
    grid = (identity + s * noise / height) * grid_rescale
    return grid.clamp(-1, 1).to(device)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample a float batch along ``grid`` (1 or N grids), bilinear, as in the paper."""
    if grid.shape[0] == 1 and x.shape[0] != 1:
        grid = grid.expand(x.shape[0], -1, -1, -1)
    out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.clamp(0, 1)


@dataclass(frozen=True)
class WaNetParams:
    k: int = param(4, doc="control grid size (paper, CIFAR-10)")
    s: float = param(0.5, doc="warping strength (paper); 3 is the strong quick setting, see docs/attacks.md")
    grid_rescale: float = param(1.0, doc="scale of the warped grid (paper)")
    cross_ratio: float = param(2.0, doc="noise-mode (cover) samples per backdoor sample (paper)")
    grid_seed: int = param(0, doc="seed of the warping field (the trigger)")

    def validate(self, where: str) -> None:
        if self.k < 2:
            raise param_error("k", f"{self.k} must be >= 2")
        if not self.cross_ratio >= 0:
            raise param_error("cross_ratio", f"{self.cross_ratio} must be >= 0")


@register_attack
class WaNet(Attack):
    name = "wanet"
    label = "WaNet"
    label_mode = "dirty"
    description = "smooth warping field (k 4, s 0.5), plus 2x noise-mode warps with true labels"
    Params = WaNetParams

    def grid(self, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        p = self.params
        return warp_field(height, width, p.k, p.s, p.grid_rescale, p.grid_seed, device)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return warp(x, self.grid(x.shape[-2], x.shape[-1], x.device))

    def noisy(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise mode: the trigger field plus per-sample uniform noise of up to one pixel (1 / H)."""
        h, w = x.shape[-2:]
        noise = (torch.rand((x.shape[0], h, w, 2), generator=generator) * 2 - 1).to(x.device)
        grid = (self.grid(h, w, x.device) + noise / h).clamp(-1, 1)
        return warp(x, grid)

    def cover_count(self, num_poison: int) -> int:
        return int(round(self.params.cross_ratio * num_poison))

    def cover_images(self, train: ImageSet, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise-mode warps of ``train.x[idx]`` (they keep their true labels)."""
        return map_uint8(lambda x: self.noisy(x, generator), train.x[idx.to(train.x.device)])
