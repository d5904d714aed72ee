"""The defensive backdoor of PDB, shared by every defense that plants one (``pdb``, ``pdb-iso``, ``a-abl-pdb``).

The defender's trigger (a patch of a pixel value no image holds) and its augmentation, the label map h(y) =
(y + shift) mod K that inference undoes, the training set with the defensive copies appended, the loss that stamps
and augments those copies (optionally under a PGD adversary that may not touch the trigger), and the one rule that
draws a class-balanced pool from a ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..adversarial.pgd import PGDConfig, adversarial_examples
from ..config import key_path, param
from ..data.augment import augment
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..training import Batch, StepOutput


# -- the defensive trigger and its augmentation ----------------------------------------------------------------------
@dataclass(frozen=True)
class DefensiveTrigger:
    """The defender's trigger: a mask in the top-left corner (the paper's best position) filled with ``value``."""

    shape: Literal["square", "frame", "dotted-frame"] = param(
        "square", doc="square: a size x size patch in the top-left corner (the authors' trigger_type 1); frame: "
                      "the image border, size pixels wide (type 0); dotted-frame: every second pixel of that "
                      "border (type 2)")
    size: int = param(7, doc="the square's side, or the frame's width, in pixels")
    value: float = param(2.0, doc="the stamped pixel value in every channel; images lie in [0, 1], so 2.0 is a "
                                  "value no image (and no attacker's trigger) holds")

    def validate(self, where: str) -> None:
        if self.size < 1:
            raise ConfigError(f"{key_path(where, 'size')}: {self.size} must be >= 1")
        if not math.isfinite(self.value):
            raise ConfigError(f"{key_path(where, 'value')}: {self.value} must be a finite number")

    def check_fits(self, height: int, width: int, where: str) -> None:
        """A ConfigError unless the trigger leaves part of a ``height`` x ``width`` image uncovered."""
        side = min(height, width)
        covers = self.size >= side if self.shape == "square" else 2 * self.size >= side
        if covers:
            raise ConfigError(f"{key_path(where, 'size')}: a {self.shape} of {self.size} pixels covers the whole "
                              f"{height}x{width} image")

    def mask(self, height: int, width: int) -> torch.Tensor:
        """1 x 1 x H x W: 1 where the trigger goes, 0 elsewhere."""
        m = torch.zeros(1, 1, height, width)
        s = self.size
        if self.shape == "square":
            m[..., :s, :s] = 1
            return m
        border = torch.zeros(height, width, dtype=torch.bool)
        border[:s, :] = border[-s:, :] = border[:, :s] = border[:, -s:] = True
        if self.shape == "dotted-frame":  # every second pixel along each side
            rows = torch.arange(height)[:, None].expand(height, width)
            cols = torch.arange(width)[None, :].expand(height, width)
            along_rows = (rows < s) | (rows >= height - s)
            along_cols = (cols < s) | (cols >= width - s)
            border = (along_rows & (cols % 2 == 0)) | (along_cols & (rows % 2 == 0))
        m[0, 0][border] = 1
        return m

    def pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """1 x C x H x W, ``value`` everywhere (the mask says where it shows)."""
        return torch.full((1, channels, height, width), float(self.value))


@dataclass(frozen=True)
class DefensiveAugment:
    """The augmentation of the defensive copies, applied after stamping (the authors' order), in this order."""

    scale_p: float = param(0.2, doc="probability of multiplying a stamped image (trigger included) by a factor "
                                    "drawn from [scale_min, 1]")
    scale_min: float = param(0.5, doc="the smallest such factor")
    noise_p: float = param(0.5, doc="probability of adding Gaussian noise (the code's lmd_3 / (lmd_2 + lmd_3))")
    noise_std: float = param(0.0, doc="its standard deviation in pixel units (the code's aug; 0: no noise)")
    rotate: float = param(10.0, doc="largest rotation in degrees (nearest pixel, zero fill; 0: none)")
    rotate_p: float = param(0.5, doc="probability of a rotation")
    crop: int = param(4, doc="random-crop padding in pixels (0: off)")
    flip: bool = param(True, doc="mirror a random half left-right (the trigger then sits in the top-right corner)")

    def validate(self, where: str) -> None:
        for name in ("scale_p", "noise_p", "rotate_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{key_path(where, name)}: {v} must be a probability in [0, 1]")
        if not 0.0 < self.scale_min <= 1.0:
            raise ConfigError(f"{key_path(where, 'scale_min')}: {self.scale_min} must lie in (0, 1]")
        for name in ("noise_std", "rotate", "crop"):
            v = getattr(self, name)
            if not v >= 0:
                raise ConfigError(f"{key_path(where, name)}: {v} must be >= 0")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a float batch of stamped images (N x C x H x W); every draw from ``generator``."""
        n, dev = x.shape[0], x.device

        def chosen(p: float) -> torch.Tensor:
            return (torch.rand(n, generator=generator) < p).to(dev)[:, None, None, None]

        if self.scale_p > 0:
            factor = (self.scale_min + (1 - self.scale_min) * torch.rand(n, generator=generator)).to(dev)
            x = torch.where(chosen(self.scale_p), x * factor[:, None, None, None], x)
        if self.noise_p > 0 and self.noise_std > 0:
            noise = torch.randn(x.shape, generator=generator).to(dev) * self.noise_std
            x = torch.where(chosen(self.noise_p), x + noise, x)
        if self.rotate_p > 0 and self.rotate > 0:
            angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(self.rotate)
            x = torch.where(chosen(self.rotate_p), rotate(x, angle.to(dev)), x)
        return augment(x, self.crop, self.flip, generator)

    def with_trigger(self, x: torch.Tensor, mask: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented views of the stamped batch ``x`` and where each one's trigger landed (bool N x 1 x H x W):
        the trigger's ``mask`` rides through the same draws as one more channel (scaled by at least ``scale_min``,
        moved by the rotation, crop and flip)."""
        n = x.shape[0]
        both = self(torch.cat([x, mask.to(x.dtype).expand(n, -1, -1, -1)], 1), generator)
        return both[:, :-1], both[:, -1:] > self.scale_min / 2

def validate_defensive(where: str, frequency: int, shift: int) -> None:
    """The checks every defense planting a defensive backdoor makes of its copies per epoch and its label map."""
    if frequency < 1:
        raise ConfigError(f"{key_path(where, 'frequency')}: {frequency} must be >= 1")
    if shift < 1:
        raise ConfigError(f"{key_path(where, 'shift')}: {shift} must be >= 1 (h must move every class)")


def validate_ratio(where: str, ratio: float) -> None:
    """A pool drawn as a share of the training data: the share lies in (0, 1]."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"{key_path(where, 'ratio')}: {ratio} must be in (0, 1]")


def rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate each image by its angle (radians) about its centre; nearest pixel, zeros where nothing maps."""
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# -- the defensive set and the training ------------------------------------------------------------------------------
def label_map(num_classes: int, shift: int) -> list[int]:
    """h as a list: h[y] = (y + shift) mod K. The wrapper's output class i reads the network's class h[i]."""
    return [(y + shift) % num_classes for y in range(num_classes)]


@dataclass
class DefensiveSet:
    """The training data plus ``frequency`` defensive copies of each pool sample, as one ImageSet (rows past
    ``plain`` are defensive: their images are the pool's unstamped, their labels h(y)), and what the loss
    needs to stamp and augment those rows."""

    data: ImageSet
    plain: int
    pool: torch.Tensor  # uint8 M x C x H x W, on the data's device
    mask: torch.Tensor  # 1 x 1 x H x W
    pattern: torch.Tensor  # 1 x C x H x W

    def stamped(self, rows: torch.Tensor) -> torch.Tensor:
        """Pool images ``rows`` in [0, 1] with the trigger pasted in."""
        x = self.pool[rows].float().div_(255.0)
        return x * (1 - self.mask) + self.pattern * self.mask


def defensive_set(data: ImageSet, pool: ImageSet, frequency: int, shift: int,
                  trigger: DefensiveTrigger) -> DefensiveSet:
    """``data`` followed by ``frequency`` copies of ``pool`` relabelled by h."""
    h = torch.tensor(label_map(data.num_classes, shift), device=pool.y.device)
    x = torch.cat([data.x, pool.x.to(data.x.device).repeat(frequency, 1, 1, 1)])
    y = torch.cat([data.y, h[pool.y].to(data.y.device).repeat(frequency)])
    _, c, height, width = data.x.shape
    dev = data.x.device
    return DefensiveSet(replace(data, x=x, y=y), len(data), pool.x.to(dev), trigger.mask(height, width).to(dev),
                        trigger.pattern(c, height, width).to(dev))


class _Pinned(nn.Module):
    """``model`` on inputs whose ``pinned`` pixels are reset to ``fixed``: what the adversary attacks during adversarial
    training with a defensive trigger, so it perturbs the image around the trigger but never the trigger itself (at
    inference the wrapper stamps the trigger over whatever the input holds)."""

    def __init__(self, model: nn.Module, fixed: torch.Tensor, pinned: torch.Tensor):
        super().__init__()
        self.model, self.fixed, self.pinned = model, fixed, pinned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.where(self.pinned, self.fixed, x))


def pdb_loss(ds: DefensiveSet, aug: DefensiveAugment, adversary: PGDConfig | None = None):
    """Cross-entropy on the batch, whose defensive rows are replaced by their pool image stamped and augmented
    (the loop's own crop/flip of those rows is discarded). ``loss_plain`` and ``loss_defensive`` in the history
    are the two rows' shares of the loss (they add up to it).

    With ``adversary`` (the loop's own adversary off), every row is then replaced by its PGD example, the defensive
    rows' trigger pixels pinned: adversarial training of the network behind a defensive trigger."""
    m = ds.pool.shape[0]

    def loss_fn(model: nn.Module, batch: Batch) -> StepOutput:
        x = batch.x
        defensive = batch.index >= ds.plain
        pinned = None
        if bool(defensive.any()):
            rows = (batch.index[defensive] - ds.plain) % m
            if adversary is None:
                views = aug(ds.stamped(rows), batch.generator)
            else:
                views, marks = aug.with_trigger(ds.stamped(rows), ds.mask, batch.generator)
                pinned = torch.zeros_like(x[:, :1], dtype=torch.bool)
                pinned[defensive] = marks
            x = x.clone()
            x[defensive] = views.to(x.dtype)
        if adversary is not None:
            x = batch.precision.batch(x)
            target = model if pinned is None else _Pinned(model, x, pinned)
            x_adv = adversarial_examples(target, x, batch.y, adversary, generator=batch.generator,
                                         precision=batch.precision)
            x = x_adv if pinned is None else torch.where(pinned, x, x_adv)
            model.train()
        logits = model(batch.precision.batch(x))
        per = F.cross_entropy(logits.float(), batch.y, reduction="none")
        n = per.numel()
        parts = {"loss_plain": per[~defensive].sum() / n, "loss_defensive": per[defensive].sum() / n}
        return StepOutput(per.mean(), logits, parts)

    return loss_fn


def least_suspicious(suspicion: torch.Tensor, labels: torch.Tensor, eligible: torch.Tensor,
                     per_class: int, num_classes: int) -> torch.Tensor:
    """Bool N: in every class, the ``per_class`` eligible samples of lowest suspicion (all eligible ones where a
    class has fewer); ties by position."""
    order = torch.argsort(suspicion.double().cpu(), stable=True)
    labels, eligible = labels.cpu(), eligible.cpu().bool()
    order = order[eligible[order]]
    by_class = order[torch.sort(labels[order], stable=True).indices]  # ascending suspicion within each class
    counts = torch.bincount(labels[order], minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(by_class)) - starts[labels[by_class]]
    chosen = torch.zeros(len(labels), dtype=torch.bool)
    chosen[by_class[rank < per_class]] = True
    return chosen
