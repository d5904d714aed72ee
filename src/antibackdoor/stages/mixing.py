"""Mixing augmentations over a batch and its soft targets, for the defenses that train with them (ASD and DBD's
MixMatch, VaB's AttentionMix): MixUp, CutMix and AttentionMix.

Each mixes every row with the row of one random permutation of the batch and mixes the targets by the share of
the image each row keeps, so a trigger in one image is diluted or cut by the content of another. All draws come
from the caller's generator (a resumed epoch replays them); everything is batched, on the images' device.

A ``Mixer`` is called as ``mixer(model, x, targets, generator, precision)``; only AttentionMix reads the model
(its attention maps come from the model being trained).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..models.features import capture, stage_modules
from ..precision import Precision
from ..seeding import rng_from
from ..selfsup import mixup


class Mixer(Protocol):
    def __call__(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
                 precision: Precision) -> tuple[torch.Tensor, torch.Tensor]: ...


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    dist = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    with rng_from(generator):
        return float(dist.sample())


def cutmix(x: torch.Tensor, targets: torch.Tensor, alpha: float,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al. 2019): one box per batch, of area about (1 - l) of the image with l ~ Beta(alpha,
    alpha) and a uniformly drawn centre (clipped at the border), is pasted from a permuted row into every row;
    the targets mix by the area each row keeps, which is returned."""
    n, _, h, w = x.shape
    lam = _beta(alpha, generator)
    cut = (1.0 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(h, (1,), generator=generator))
    cx = int(torch.randint(w, (1,), generator=generator))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    perm = torch.randperm(n, generator=generator).to(x.device)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return out, kept * targets + (1.0 - kept) * targets[perm], kept


@torch.no_grad()
def feature_attention(model: nn.Module, x: torch.Tensor, precision: Precision) -> torch.Tensor:
    """VaB's attention map: the channel sum of the squared output of the model's last stage, resized (nearest)
    to the image and scaled to [0, 1] per sample; N x 1 x H x W, fp32. The pass runs in the model's current
    mode (train mode during training, as the training loop's other no-gradient passes).

    A last stage of one pixel (VGG-16 at 32 px, any model on small images) says nothing about where the model
    looks; the last stage with more than one pixel is read instead. A map with no contrast is all zeros."""
    stages = list(stage_modules(model))
    with capture(model, stages=stages, penultimate=False) as feats, precision.autocast():
        model(precision.batch(x))
    wide = [s for s in stages if feats.stages[s].shape[-2:].numel() > 1]
    att = feats.stages[(wide or stages)[-1]].float().pow(2).sum(1, keepdim=True)
    att = F.interpolate(att, size=tuple(x.shape[-2:]), mode="nearest")
    low = att.amin(dim=(2, 3), keepdim=True)
    span = att.amax(dim=(2, 3), keepdim=True) - low
    return torch.where(span > 0, (att - low) / span.clamp_min(torch.finfo(att.dtype).tiny), torch.zeros_like(att))


def attention_mix(x: torch.Tensor, attention: torch.Tensor, targets: torch.Tensor, threshold: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AttentionMix (VaB, Zhu et al. 2023): only the region where a sample's own attention is at least
    ``threshold`` is mixed, with the same region of a permuted partner.

    w: the share of the sample's attention inside its region; c: the share of the partner's attention that
    falls inside it. Inside the region the image becomes w/(w+c) of itself and c/(w+c) of the partner, outside
    it stays itself; the targets keep 1 - w*c/(w+c) of their own and take w*c/(w+c) of the partner's (so a
    region that carries little of either attention moves little of the label). Returns the images, the
    targets and the mixed area's share of each image.
    """
    mask = attention >= threshold
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    partner = attention[perm]
    eps = 1e-12
    w = (attention * mask).sum(dim=(1, 2, 3), keepdim=True) / (attention.sum(dim=(1, 2, 3), keepdim=True) + eps)
    c = (partner * mask).sum(dim=(1, 2, 3), keepdim=True) / (partner.sum(dim=(1, 2, 3), keepdim=True) + eps)
    own, other = w / (w + c + eps), c / (w + c + eps)
    mixed = torch.where(mask, own * x + other * x[perm], x)
    moved = (w * (1.0 - own)).flatten(1)  # the label share that goes to the partner
    return mixed, (1.0 - moved) * targets + moved * targets[perm], mask.float().mean(dim=(1, 2, 3))


@dataclass(frozen=True)
class MixUp:
    """MixUp as MixMatch uses it: one l ~ Beta(alpha, alpha) per batch, l' = max(l, 1 - l) (selfsup.mixup)."""

    alpha: float

    def __call__(self, model, x, targets, generator, precision):
        mixed, mixed_targets, _ = mixup(x, targets, self.alpha, generator)
        return mixed, mixed_targets


@dataclass(frozen=True)
class CutMix:
    alpha: float

    def __call__(self, model, x, targets, generator, precision):
        mixed, mixed_targets, _ = cutmix(x, targets, self.alpha, generator)
        return mixed, mixed_targets


@dataclass(frozen=True)
class AttentionMix:
    """AttentionMix with the attention of the model being trained (``feature_attention``)."""

    threshold: float

    def __call__(self, model, x, targets, generator, precision):
        attention = feature_attention(model, x, precision)
        mixed, mixed_targets, _ = attention_mix(x, attention, targets, self.threshold, generator)
        return mixed, mixed_targets


def no_mix(model, x, targets, generator, precision):
    """The identity: the images and targets as they are (ablations without a mixing augmentation)."""
    return x, targets
