"""Batched on-device augmentation: random crop with zero padding and horizontal flip, no Python loops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad each image by ``padding`` pixels and take a random crop of the original size, per sample."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dev = x.device
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]  # N,1,H,1
    cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]  # N,1,1,W
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment(x: torch.Tensor, crop: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the configured augmentations to a uint8 or float batch."""
    x = random_crop(x, crop, generator)
    if flip:
        x = random_flip(x, generator)
    return x
