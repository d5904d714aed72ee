"""Sample distinguishment (the "SD module" shared by D-BR and D-ST; Chen et al., NeurIPS 2022).

Poisoned samples are more *sensitive* to transformations than clean ones in the feature space of a model
that has learned the backdoor: rotating or shifting an image moves or breaks its trigger, so its features
change a lot. The FCT score (feature consistency towards transformations) of a sample x is
mean_d (f(x) - f(tau(x)))_d^2 over the penultimate features f, where tau is a random rotation (up to
``rotate`` degrees) followed by a random integer shift (up to ``translate`` of the image size), with zero
padding and nearest-neighbour sampling. High FCT = suspicious.

1. A briefly trained model: plain cross-entropy for ``warmup`` epochs without augmentation (2 in the paper).
2. Intra-class fine-tuning (``intra``): minimise the mean cosine similarity between the class centres of the
   penultimate features in each batch, which pushes the poisoned samples (labelled as the target class)
   away from the genuine target-class samples.
3. FCT of every sample under one seeded draw of tau per sample, and quantile thresholds: the
   ``clean_ratio`` lowest scores are D_c (clean), the ``poison_ratio`` highest D_p (poisoned), the rest
   uncertain.

The functions are plain so that a detector can call ``fct_scores`` or ``quantile_split`` alone.
Differences from the official code: the same draw of tau scores the samples and places them against the
thresholds (the official code draws tau again when it separates, so a sample's FCT at separation is not
the one the thresholds were computed from), and the split is by rank (exactly ``top_count(N, ratio)`` samples in
D_c and D_p, ties by index) rather than "<= the score at that rank", which adds ties and one sample.

``Separation.result`` (the D-BR/D-ST result) and ``write_separation`` live with those defenses
(``defenses/_separation.py``); this module is the scorer a detector may call too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import key_path, param
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..models.features import capture
from ..precision import Precision
from ..seeding import generator
from ..training import Batch, StepOutput, TrainConfig
from .context import DefenseContext
from .fit import train_stage
from .scores import sample_features
from .select import top_fraction

log = logging.getLogger("antibackdoor")


@dataclass(frozen=True)
class SeparationParams:
    warmup: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=2, optimizer="sgd", lr=0.01, weight_decay=5e-4, batch_size=128, crop=0, flip=False),
        doc="step 1: a briefly trained model (plain cross-entropy, no augmentation)")
    intra: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=10, optimizer="sgd", lr=0.01, weight_decay=5e-4, batch_size=128, crop=0, flip=False),
        doc="step 2: intra-class fine-tuning (spreads the class centres apart)")
    rotate: float = param(180.0, doc="FCT rotation in degrees, uniform in [-rotate, rotate]")
    translate: float = param(0.2, doc="FCT shift: fraction of the image size, per axis")
    clean_ratio: float = param(0.20, doc="alpha_c: share of the samples in D_c (lowest FCT)")
    poison_ratio: float = param(0.05, doc="alpha_p: share of the samples in D_p (highest FCT)")

    def validate(self, where: str) -> None:
        self.warmup.validate(key_path(where, 'warmup'))
        self.intra.validate(key_path(where, 'intra'))
        for key in ("clean_ratio", "poison_ratio"):
            value = getattr(self, key)
            if not 0 < value < 1:
                raise ConfigError(f"{where}.{key}: {value} must be in (0, 1)")
        if self.clean_ratio + self.poison_ratio > 1:
            raise ConfigError(f"{where}: clean_ratio + poison_ratio = {self.clean_ratio + self.poison_ratio} "
                              "must be <= 1")
        if not 0 <= self.rotate <= 180:
            raise ConfigError(f"{key_path(where, 'rotate')}: {self.rotate} must be in [0, 180] degrees")
        if not 0 <= self.translate < 1:
            raise ConfigError(f"{key_path(where, 'translate')}: {self.translate} must be in [0, 1)")


#: D-BR's and D-ST's quick separation: the small CNN with Adam, 2 + 10 epochs as in the paper, no augmentation
QUICK_SEPARATION = SeparationParams(
    warmup=TrainConfig(epochs=2, optimizer="adam", lr=1e-3, crop=0, flip=False),
    intra=TrainConfig(epochs=10, optimizer="adam", lr=1e-4, crop=0, flip=False))

#: the codes of the three parts in ``DefenseResult.sample_stats["sd_part"]``
PARTS = {"clean": 0, "uncertain": 1, "poisoned": 2}


# -- the pieces ----------------------------------------------------------------------------------------------
def intra_class_loss(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean pairwise cosine similarity of the batch's class centres (diagonal zeroed, classes present in the
    batch only): minimising it spreads the classes apart."""
    onehot = F.one_hot(labels, num_classes).to(features.dtype)
    counts = onehot.sum(0)
    present = counts > 0
    centres = (onehot.T @ features)[present] / counts[present, None]
    centres = F.normalize(centres, dim=1)
    sim = centres @ centres.T
    off_diagonal = 1.0 - torch.eye(len(sim), device=sim.device, dtype=sim.dtype)
    return (sim * off_diagonal).mean()


@dataclass
class FCTDraw:
    """One seeded draw of the transformation tau per sample: rotation angles (degrees) and integer shifts."""

    angle: torch.Tensor  # N
    shift: torch.Tensor  # N x 2 (x, y) pixels


def draw_transforms(n: int, size: int, rotate: float, translate: float, generator: torch.Generator) -> FCTDraw:
    """Uniform angles in [-rotate, rotate] and shifts rounded from uniform [-translate*size, translate*size]
    (torchvision's RandomRotation + RandomAffine(translate))."""
    angle = (torch.rand(n, generator=generator) * 2 - 1) * rotate
    max_shift = translate * size
    shift = torch.round((torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift)
    return FCTDraw(angle, shift)


def apply_transforms(x: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by ``angle`` degrees, then shift it by ``shift`` pixels (nearest
    neighbour, zero padding), in one batched affine warp."""
    from kornia.geometry.transform import get_rotation_matrix2d, warp_affine

    n, _, h, w = x.shape
    dev = x.device
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=dev).expand(n, 2)
    matrix = get_rotation_matrix2d(centre, angle.to(dev, torch.float32), torch.ones(n, 2, device=dev))
    matrix = matrix.clone()
    matrix[:, :, 2] += shift.to(dev, torch.float32)
    return warp_affine(x.float(), matrix, dsize=(h, w), mode="nearest", padding_mode="zeros", align_corners=True)


def fct_scores(model: nn.Module, data: ImageSet, draw: FCTDraw, device: torch.device | str = "cpu",
               batch_size: int = 512, precision: Precision | str | None = None) -> torch.Tensor:
    """FCT of every sample: mean squared change of its penultimate features under its transformation
    (eval mode, whole batches, in ``precision``; None: the active one). High = sensitive = suspicious."""
    plain = sample_features(model, data, device, batch_size=batch_size, precision=precision)

    def tau(xb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return apply_transforms(xb, draw.angle[index], draw.shift[index])

    moved = sample_features(model, data, device, transform=tau, batch_size=batch_size, precision=precision)
    return (plain - moved).pow(2).mean(dim=1)


def quantile_split(scores: torch.Tensor, clean_ratio: float,
                   poison_ratio: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """D_c = the ``top_count(N, clean_ratio)`` lowest scores, D_p = the ``top_count(N, poison_ratio)`` highest;
    returns both masks and the thresholds gamma_c (highest score in D_c) and gamma_p (lowest score in D_p)."""
    clean = top_fraction(-scores.double(), clean_ratio)
    poisoned = top_fraction(scores.double(), poison_ratio)
    if (clean & poisoned).any():
        raise ConfigError(f"separation: clean_ratio {clean_ratio} and poison_ratio {poison_ratio} overlap")
    return clean, poisoned, float(scores[clean].max()), float(scores[poisoned].min())


# -- the module ----------------------------------------------------------------------------------------------
@dataclass
class Separation:
    scores: torch.Tensor  # FCT, one per sample
    clean: torch.Tensor  # mask of D_c
    poisoned: torch.Tensor  # mask of D_p
    gamma_clean: float
    gamma_poison: float
    history: dict[str, list[dict]]

    @property
    def uncertain(self) -> torch.Tensor:
        return ~(self.clean | self.poisoned)

    def part(self) -> torch.Tensor:
        """Each sample's part as a code of ``PARTS`` (0 = D_c, 1 = uncertain, 2 = D_p), for sample_stats."""
        code = torch.full(self.scores.shape, PARTS["uncertain"], dtype=torch.int64)
        code[self.clean] = PARTS["clean"]
        code[self.poisoned] = PARTS["poisoned"]
        return code

    def info(self) -> dict:
        return {"threshold": self.gamma_poison, "gamma_clean": self.gamma_clean, "gamma_poison": self.gamma_poison,
                "clean": int(self.clean.sum()), "uncertain": int(self.uncertain.sum()),
                "poisoned": int(self.poisoned.sum())}


def intra_loss_fn(num_classes: int):
    """The intra-class fine-tuning objective for train(loss_fn=...)."""

    def loss_fn(model: nn.Module, batch: Batch) -> StepOutput:
        with capture(model, stages=False) as feats:
            logits = model(batch.x)
        loss = intra_class_loss(feats.penultimate.float(), batch.y, num_classes)
        return StepOutput(loss, logits)

    return loss_fn


def separate(ctx: DefenseContext, data: ImageSet, p: SeparationParams, prefix: str = "sd") -> Separation:
    """The whole SD module: brief training, intra-class fine-tuning, FCT under one seeded draw, split."""
    log.info("separation: %d warm-up epochs, %d intra-class epochs, FCT (rotate %g, translate %g)",
             p.warmup.epochs, p.intra.epochs, p.rotate, p.translate)
    model, hist_w = train_stage(ctx, data, p.warmup, f"{prefix}_warmup", seed_offset=11)
    _, hist_i = train_stage(ctx, data, p.intra, f"{prefix}_intra", model=model, seed_offset=12,
                            loss_fn=intra_loss_fn(data.num_classes))
    draw = draw_transforms(len(data), data.image_size, p.rotate, p.translate, generator(ctx.seed, "fct"))
    scores = fct_scores(model, data, draw, ctx.device, precision=ctx.compute_precision())
    if not torch.isfinite(scores).all():
        raise ConfigError("separation: the FCT scores are not finite (the fine-tuned model diverged); lower "
                          "separation.intra.lr")
    clean, poisoned, g_c, g_p = quantile_split(scores, p.clean_ratio, p.poison_ratio)
    log.info("separation: D_c %d (FCT <= %.4g), D_p %d (FCT >= %.4g), uncertain %d", int(clean.sum()), g_c,
             int(poisoned.sum()), g_p, int((~(clean | poisoned)).sum()))
    return Separation(scores, clean, poisoned, g_c, g_p, {f"{prefix}_warmup": hist_w, f"{prefix}_intra": hist_i})
