"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warping trigger.

The trigger is a fixed, smooth warping field: a k x k grid of random offsets (normalised to mean magnitude 1),
upsampled bicubically to the image size, scaled by ``s / H`` and added to the identity sampling grid (times
``grid_rescale``); ``F.grid_sample`` resamples the image along it. Defaults are the paper's CIFAR-10 values:
k = 4, s = 0.5, grid_rescale = 1. That sub-pixel warp is learned only from much data and long training: on
the mini CIFAR-10 quick setting it reaches ~36% ASR, s = 3 ~88% (docs/attacks.md).

Noise mode: besides the ``rate * N`` backdoor samples (warped, relabelled to the target), ``cross_ratio``
times as many other samples are warped with the trigger field plus per-sample random noise (up to one pixel)
and keep their true labels. They teach the network that only the exact field means "target", which makes the
trigger hard to detect; they are not in the poison mask (they carry no backdoor trigger).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.imageset import ImageSet
from ..errors import ConfigError
from .base import Attack, PoisonedSet, quantize, register_attack


def warp_field(height: int, width: int, k: int, s: float, grid_rescale: float, seed: int,
               device: torch.device | None = None) -> torch.Tensor:
    """The 1 x H x W x 2 sampling grid (x, y in [-1, 1]) of the trigger, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
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


@register_attack
class WaNet(Attack):
    name = "wanet"
    label_mode = "dirty"
    description = "smooth warping field (k 4, s 0.5), dirty label, plus 2x noise-mode warps with true labels"
    params = {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0, "grid_seed": 0}

    def __init__(self, **overrides):
        super().__init__(**overrides)
        #: indices of the noise-mode samples of the last ``poison`` call (ground truth, like the mask)
        self.noise_index: torch.Tensor | None = None

    def grid(self, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        return warp_field(height, width, int(self.k), float(self.s), float(self.grid_rescale),
                          int(self.grid_seed), device)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return warp(x, self.grid(x.shape[-2], x.shape[-1], x.device))

    def noisy(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise mode: the trigger field plus per-sample uniform noise of up to one pixel (1 / H)."""
        h, w = x.shape[-2:]
        noise = (torch.rand((x.shape[0], h, w, 2), generator=generator) * 2 - 1).to(x.device)
        grid = (self.grid(h, w, x.device) + noise / h).clamp(-1, 1)
        return warp(x, grid)

    def poison(self, train: ImageSet, rate: float, target: int, generator: torch.Generator) -> PoisonedSet:
        """Backdoor samples as the base does, then ``cross_ratio`` times as many noise-mode samples."""
        poisoned = super().poison(train, rate, target, generator)
        pool = (~poisoned.poison_mask).nonzero().squeeze(1)
        n_cross = int(round(float(self.cross_ratio) * poisoned.num_poison))
        if n_cross > len(pool):
            raise ConfigError(f"attack wanet: --poison-rate {rate} with cross_ratio {self.cross_ratio} needs "
                              f"{poisoned.num_poison + n_cross} of {len(train)} samples")
        cross = pool[torch.randperm(len(pool), generator=generator)[:n_cross]].sort().values
        x = poisoned.data.x.clone()
        for s in range(0, n_cross, 1024):
            idx = cross[s:s + 1024].to(x.device)
            x[idx] = quantize(self.noisy(train.x[idx].float().div(255.0), generator))
        self.noise_index = cross
        poisoned.data = poisoned.data.with_images(x)
        return poisoned
