"""The semi-supervised step that DBD, ASD and VaB train with: a labelled pool (samples whose label is trusted) and
an unlabelled pool (samples whose label is dropped), MixMatch-style (Berthelot et al. 2019).

One step: draw a batch from each pool (index slices of the uint8 images on the device), augment the labelled
samples and K views of the unlabelled ones on the device, guess the unlabelled samples' labels from the model's
mean prediction over their views and sharpen it, mix (MixUp over both pools for MixMatch; any ``Mixer``), and
minimise L_x + w_u * L_u: the soft-target cross-entropy on the labelled part and, on the unlabelled part, the
squared error of the probabilities (MixMatch) or a soft-target cross-entropy (VaB), with w_u ramped up over the
training. The unlabelled samples' labels are never read.

What differs between the methods is a ``SemiSpec`` (views, sharpening, what is mixed, the unlabelled loss), the
mixer, the weight schedule and an optional ``adjust`` of the targets (VaB's suppression); the loop, its
precision and its random streams are the same. Interleaving labelled and unlabelled batches (the MixMatch
code's device for per-GPU BatchNorm statistics) is replaced by one forward pass over the whole mixed batch,
which gives BatchNorm the statistics of the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import augment
from ..data.imageset import ImageSet
from ..precision import Precision
from ..selfsup import guess_labels, mean_prediction, mixmatch_loss, sharpen_hard
from .mixing import Mixer

Sampling = Literal["passes", "random"]
#: ``adjust(labelled_targets, unlabelled_guesses, labelled_index, unlabelled_index)`` -> both adjusted (one row
#: per sample, before the views are stacked and mixed); the guesses are None when the batch has no unlabelled part
Adjust = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor],
                  tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class SemiSpec:
    """How one step treats its two pools (MixMatch's defaults)."""

    temperature: float = 0.5  # sharpening of the guessed labels; 0: the one-hot of the argmax
    views: int = 2  # K: augmented views of each unlabelled sample
    labelled_views: int = 1  # augmented views of each labelled sample
    mix_unlabelled: bool = True  # one mix over both pools (MixMatch); False: only the labelled views are mixed
    unlabelled_loss: Literal["mse", "ce"] = "mse"  # squared error of probabilities, or soft-target CE


class PoolSampler:
    """Batches of sample indices (CPU, int64) drawn from one pool with the caller's generator.

    ``passes``: shuffled passes over the pool, a new shuffle when fewer than a batch remain (a DataLoader with
    shuffle and drop_last that restarts when exhausted, as the MixMatch code cycles its loaders); a pool
    smaller than a batch gives the whole pool. ``random``: ``batch`` draws with replacement (DBD).
    """

    def __init__(self, pool: torch.Tensor, batch: int, mode: Sampling, generator: torch.Generator):
        self.pool, self.batch, self.mode, self.generator = pool.cpu(), batch, mode, generator
        self.order = self.pool[:0]
        self.pos = 0

    def __len__(self) -> int:
        return len(self.pool)

    def next(self) -> torch.Tensor:
        if self.mode == "random":
            return self.pool[torch.randint(len(self.pool), (self.batch,), generator=self.generator)]
        size = min(self.batch, len(self.pool))
        if self.pos + size > len(self.order):
            self.order = self.pool[torch.randperm(len(self.pool), generator=self.generator)]
            self.pos = 0
        self.pos += size
        return self.order[self.pos - size:self.pos]


def linear_rampup(weight: float, progress: float, rampup: int) -> float:
    """MixMatch's unlabelled weight: ``weight`` * clip(progress / rampup, 0, 1), progress in epochs (fractional
    within an epoch); a rampup of 0 counts as 1 epoch."""
    return weight * min(max(progress / max(rampup, 1), 0.0), 1.0)


def guess(model: nn.Module, views: list[torch.Tensor], temperature: float, precision: Precision) -> torch.Tensor:
    """The guessed labels of unlabelled samples: the sharpened mean prediction over their views (no gradient,
    in the model's current mode and the run's precision); temperature 0 gives the one-hot of the argmax."""
    with precision.autocast():
        batches = [precision.batch(v) for v in views]
        if temperature > 0:
            return guess_labels(model, batches, temperature)
        return sharpen_hard(mean_prediction(model, batches))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-sum_k t_k log softmax_k, averaged over rows (fp32); targets need not sum to 1 (VaB's suppressed ones)."""
    return -(F.log_softmax(logits.float(), 1) * targets).sum(1).mean()


def semisup_losses(model: nn.Module, data: ImageSet, li: torch.Tensor, ui: torch.Tensor, spec: SemiSpec, *,
                   crop: int, flip: bool, mixer: Mixer, generator: torch.Generator, precision: Precision,
                   device: torch.device | str, adjust: Adjust | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L_x and L_u of one batch: ``li`` labelled and ``ui`` unlabelled sample indices (``ui`` may be empty: L_u is
    0). Only ``data.y[li]`` is read of the labels."""
    k = data.num_classes
    xl = [augment(data.x[li].to(device), crop, flip, generator).float().div_(255.0)
          for _ in range(spec.labelled_views)]
    tl = F.one_hot(data.y[li].to(device), k).float()
    xu = [augment(data.x[ui].to(device), crop, flip, generator).float().div_(255.0)
          for _ in range(spec.views)] if ui.numel() else []
    tu = guess(model, xu, spec.temperature, precision) if xu else None
    if adjust is not None:
        tl, tu = adjust(tl, tu, li, ui)
    tl_all = tl.repeat(spec.labelled_views, 1)
    nl = tl_all.shape[0]
    if xu and spec.mix_unlabelled:
        inputs, targets = mixer(model, torch.cat([*xl, *xu]), torch.cat([tl_all, *([tu] * len(xu))]), generator,
                                precision)
        tx, tu_all = targets[:nl], targets[nl:]
    else:
        mixed, tx = mixer(model, torch.cat(xl), tl_all, generator, precision)
        inputs = torch.cat([mixed, *xu])
        tu_all = torch.cat([tu] * len(xu)) if xu else None
    with precision.autocast():
        logits = model(precision.batch(inputs))
    if tu_all is None:
        return soft_cross_entropy(logits, tx), torch.zeros((), device=logits.device)
    if spec.unlabelled_loss == "mse":
        return mixmatch_loss(logits[:nl], tx, logits[nl:], tu_all)
    return soft_cross_entropy(logits[:nl], tx), soft_cross_entropy(logits[nl:], tu_all)


def semisup_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: ImageSet, labelled: torch.Tensor,
                  spec: SemiSpec, *, epoch: int, iterations: int, batch_size: int, crop: int, flip: bool,
                  mixer: Mixer, weight_u: Callable[[float], float], generator: torch.Generator,
                  precision: Precision, device: torch.device | str, sampling: Sampling = "passes",
                  unlabelled: torch.Tensor | None = None, unlabelled_batch: int | None = None,
                  adjust: Adjust | None = None) -> dict[str, float]:
    """``iterations`` steps of L_x + weight_u(epoch + step / iterations) * L_u on ``labelled`` and ``unlabelled``
    (boolean masks over ``data``; by default the unlabelled pool is the rest), in train mode and ``precision``;
    every draw (batches, augmentation, mixing) comes from ``generator``. An empty unlabelled pool trains on the
    labelled one alone. Returns the epoch's mean loss, L_x, L_u and the last weight."""
    unlabelled = ~labelled if unlabelled is None else unlabelled
    lab = PoolSampler(labelled.cpu().nonzero().squeeze(1), batch_size, sampling, generator)
    unl = PoolSampler(unlabelled.cpu().nonzero().squeeze(1),
                      batch_size if unlabelled_batch is None else max(unlabelled_batch, 1), sampling, generator)
    if not len(lab):
        raise ValueError("semi-supervised epoch: the labelled pool is empty")
    scaler = precision.scaler()
    model.train()
    sums = {"loss": 0.0, "lx": 0.0, "lu": 0.0}
    w = 0.0
    for it in range(iterations):
        li = lab.next().to(data.device)
        ui = (unl.next() if len(unl) else unl.pool).to(data.device)
        lx, lu = semisup_losses(model, data, li, ui, spec, crop=crop, flip=flip, mixer=mixer, generator=generator,
                                precision=precision, device=device, adjust=adjust)
        w = weight_u(epoch + it / iterations)
        loss = lx + w * lu
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sums["loss"] += float(loss.detach())
        sums["lx"] += float(lx.detach())
        sums["lu"] += float(lu.detach())
    return {key: value / max(iterations, 1) for key, value in sums.items()} | {"lambda_u": w}
