"""D-ST — secure training from scratch with sample distinguishment (Chen et al., NeurIPS 2022).

1. Separation (stages/separation.py): D_c (20 % lowest FCT), D_p (5 % highest), the uncertain rest.
2. Sensitivity-aware semi-supervised contrastive learning of a fresh feature extractor on all samples
   (two SimCLR views per image, kornia augmentations: random resized crop, flip, colour jitter, grayscale):
   a sample of D_c counts the other D_c samples of its label as positives (supervised contrastive loss),
   a sample of D_p or of the uncertain part has only its own other view as positive (its label is not
   trusted). A 2-layer projection head (128-d, normalised) is trained with it and then dropped.
3. The extractor is frozen and the model's final linear layer trained on D_c and D_p with
   CE(D_c) - ``poison_weight`` * CE(D_p) per batch (same augmentations); a batch without D_p (or D_c)
   samples contributes 0 for that part.

Choices where the sources disagree (docs/baselines.md):
- The official loss yields NaN for a batch without poisoned samples (the mean cross-entropy of an empty
  selection); we count the empty part as 0.
- Positives: the official mask zeroes only the rows of poisoned/uncertain anchors, so a clean anchor still
  counts same-labelled poisoned or uncertain samples as positives — which pulls poison (labelled as the
  target class) towards the genuine target class; the paper treats their labels as unknown, so we zero
  their columns as well.
- Schedules (paper preset) follow the official scripts (after SupContrast): 200 epochs SGD 0.5, cosine to 0,
  10 warm-up epochs (per epoch, the official warms up per batch; its cosine stops at 0.5e-3), temperature
  0.1 (the loss scaled by 0.1 / 0.07 as in SupContrast), weight decay 1e-4, batches of 512; the linear layer
  10 epochs SGD 5, no weight decay, batches of 512.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import key_path, param
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..models.features import capture, classifier_head
from ..precision import Precision
from ..seeding import rng_from, seeded_rng
from ..stages import DefenseContext, train_stage
from ..stages.separation import QUICK_SEPARATION, SeparationParams, separate
from ..training import Batch, StepOutput, TrainConfig
from ._separation import separation_result, write_separation
from .base import Defense, DefenseResult, register_defense

log = logging.getLogger("antibackdoor")

BASE_TEMPERATURE = 0.07  # SupContrast's loss scale: the loss is multiplied by temperature / 0.07


def sensitivity_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor,
                                 temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss over two views (z1, z2: N x D, L2-normalised) where only ``labelled``
    samples share positives by label; every sample's other view is always a positive."""
    n = len(labels)
    z = torch.cat([z1, z2]).float()
    y = torch.cat([labels, labels])
    known = torch.cat([labelled, labelled])
    ident = torch.arange(n, device=z.device).repeat(2)
    positive = ((y[:, None] == y[None, :]) & known[:, None] & known[None, :]) | (ident[:, None] == ident[None, :])
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    positive &= ~self_mask
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(self_mask, 0.0)
    mean_pos = (log_prob * positive).sum(1) / positive.sum(1)
    return -(temperature / BASE_TEMPERATURE) * mean_pos.mean()


def mixed_head_loss(logits: torch.Tensor, labels: torch.Tensor, clean: torch.Tensor, poisoned: torch.Tensor,
                    poison_weight: float = 0.001) -> torch.Tensor:
    """CE over the batch's D_c samples minus poison_weight * CE over its D_p samples; an empty part adds 0
    (the official code's mean over an empty selection is NaN)."""
    zero = logits.sum() * 0.0  # keeps the graph, so an all-empty batch still back-propagates (a zero gradient)
    ce_c = F.cross_entropy(logits[clean], labels[clean]) if clean.any() else zero
    ce_p = F.cross_entropy(logits[poisoned], labels[poisoned]) if poisoned.any() else zero
    return ce_c - poison_weight * ce_p


def simclr_augmentation(channels: int, size: int, crop_scale: float = 0.2) -> nn.Module:
    """SimCLR/SupContrast's training views with kornia: random resized crop (scale crop_scale..1), flip,
    colour jitter (0.4, 0.4, 0.4, 0.1; p 0.8), grayscale (p 0.2); brightness/contrast only for 1 channel."""
    import kornia.augmentation as K

    ops: list[nn.Module] = [K.RandomResizedCrop((size, size), scale=(crop_scale, 1.0), cropping_mode="resample"),
                            K.RandomHorizontalFlip()]
    if channels == 3:
        ops += [K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2)]
    else:
        ops += [K.ColorJitter(0.4, 0.4, p=0.8)]
    return nn.Sequential(*ops)


def augmented(aug: nn.Module, x: torch.Tensor, generator: torch.Generator, precision: Precision,
              views: int = 1) -> list[torch.Tensor]:
    """``views`` augmented copies of the batch, seeded from the loop's generator (kornia draws from the global
    RNG, so it runs in a forked RNG state: resumable and without side effects), computed in fp32 and handed
    back in ``precision``'s memory layout."""
    with rng_from(generator, x.device), torch.autocast(x.device.type, enabled=False):
        return [precision.batch(aug(x.float()).clamp_(0, 1)) for _ in range(views)]


class ContrastiveNet(nn.Module):
    """The model's feature extractor (its penultimate features) followed by a projection head."""

    def __init__(self, model: nn.Module, proj_dim: int = 128):
        super().__init__()
        self.model = model
        dim = classifier_head(model).in_features
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with capture(self.model, stages=False) as feats:
            self.model(x)
        return F.normalize(self.projection(feats.penultimate).float(), dim=1)


class FrozenFeatures(nn.Module):
    """Trains only the model's final linear layer: the rest is frozen and kept in eval mode (BatchNorm
    statistics included) whatever mode the training loop sets."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        head = classifier_head(model)
        self._head_params = {id(q) for q in head.parameters()}
        for q in model.parameters():
            q.requires_grad_(id(q) in self._head_params)

    def train(self, mode: bool = True) -> FrozenFeatures:
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def release(self) -> nn.Module:
        for q in self.model.parameters():
            q.requires_grad_(True)
        return self.model


@dataclass(frozen=True)
class DSTParams:
    separation: SeparationParams = param(factory=SeparationParams, doc="the FCT split into D_c, D_p and the rest")
    contrastive: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=200, optimizer="sgd", lr=0.5, schedule="cosine", warmup_epochs=10, weight_decay=1e-4,
        batch_size=512, crop=0, flip=False), doc="contrastive training of a fresh extractor (crop and flip stay "
                                                 "off: D-ST draws its own views)")
    temperature: float = param(0.1, doc="contrastive temperature")
    proj_dim: int = param(128, doc="projection head output dimension")
    crop_scale: float = param(0.2, doc="smallest crop area of the random resized crop")
    head: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=10, optimizer="sgd", lr=5.0, weight_decay=0.0, batch_size=512, crop=0, flip=False),
        doc="the final linear layer on D_c and D_p, extractor frozen (crop and flip stay off)")
    poison_weight: float = param(0.001, doc="lambda of the head loss CE(D_c) - lambda * CE(D_p)")

    def validate(self, where: str) -> None:
        self.separation.validate(key_path(where, 'separation'))
        if not self.temperature > 0:
            raise ConfigError(f"{key_path(where, 'temperature')}: {self.temperature} must be > 0")
        if self.proj_dim < 1:
            raise ConfigError(f"{key_path(where, 'proj_dim')}: {self.proj_dim} must be >= 1")
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"{key_path(where, 'crop_scale')}: {self.crop_scale} must be in (0, 1]")
        if self.poison_weight < 0:
            raise ConfigError(f"{key_path(where, 'poison_weight')}: {self.poison_weight} must be >= 0")
        for key in ("contrastive", "head"):
            cfg = getattr(self, key)
            if cfg.crop or cfg.flip:
                raise ConfigError(f"{key_path(where, key)}: crop/flip must be off (D-ST draws its own kornia views)")


@register_defense
class DST(Defense):
    name = "d-st"
    label = "D-ST"
    description = "D-ST: FCT separation, sensitivity-aware contrastive training from scratch, then a mixed-CE head"
    Params = DSTParams
    presets = {
        "paper": DSTParams(),
        # CPU budget: the small CNN, separation as in D-BR's quick preset; 50 contrastive epochs of Adam
        # (cosine) in batches of 256 instead of 200 of SGD 0.5 in 512 (5.5 s per epoch on 2 cores); the
        # linear layer 10 epochs of Adam in batches of 64, ~200 steps on the ~1,300 samples of D_c and D_p
        # as the official 10 epochs in batches of 512 take on 12,500.
        "quick": DSTParams(
            separation=QUICK_SEPARATION,
            contrastive=TrainConfig(epochs=50, optimizer="adam", lr=1e-3, schedule="cosine", batch_size=256,
                                    crop=0, flip=False),
            head=TrainConfig(epochs=10, optimizer="adam", lr=1e-2, batch_size=64, crop=0, flip=False),
        ),
    }

    def contrastive_loss(self, aug: nn.Module, labelled: torch.Tensor):
        p = self.params

        def loss_fn(net: nn.Module, batch: Batch) -> StepOutput:
            v1, v2 = augmented(aug, batch.x, batch.generator, batch.precision, views=2)
            z = net(torch.cat([v1, v2]))
            z1, z2 = z.split(len(batch.y))
            loss = sensitivity_contrastive_loss(z1, z2, batch.y, labelled[batch.index], p.temperature)
            return StepOutput(loss)

        return loss_fn

    def head_loss(self, aug: nn.Module, clean: torch.Tensor, poisoned: torch.Tensor):
        p = self.params

        def loss_fn(model: nn.Module, batch: Batch) -> StepOutput:
            (x,) = augmented(aug, batch.x, batch.generator, batch.precision)
            logits = model(x)
            c, q = clean[batch.index], poisoned[batch.index]
            return StepOutput(mixed_head_loss(logits.float(), batch.y, c, q, p.poison_weight), logits)

        return loss_fn

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        p = self.params
        log.info("D-ST 1/3: sample distinguishment")
        sep = separate(ctx, data, p.separation)
        aug = simclr_augmentation(data.channels, data.image_size, p.crop_scale)
        log.info("D-ST 2/3: sensitivity-aware contrastive learning from scratch (%d epochs)", p.contrastive.epochs)
        model = ctx.fresh_model(1)
        with seeded_rng(ctx.seed, "d-st", "projection"):
            net = ContrastiveNet(model, p.proj_dim).to(ctx.device)
        labelled = sep.clean.to(ctx.device)
        _, hist_c = train_stage(ctx, data, p.contrastive, "contrastive", model=net, seed_offset=1,
                                loss_fn=self.contrastive_loss(aug, labelled))
        log.info("D-ST 3/3: linear layer on D_c (%d) and D_p (%d), extractor frozen", int(sep.clean.sum()),
                 int(sep.poisoned.sum()))
        part = sep.clean | sep.poisoned
        frozen = FrozenFeatures(model)
        _, hist_h = train_stage(ctx, data.subset(part), p.head, "head", model=frozen, seed_offset=2,
                                loss_fn=self.head_loss(aug, sep.clean[part].to(ctx.device),
                                                       sep.poisoned[part].to(ctx.device)))
        model = frozen.release().eval()
        return separation_result(sep, model, {"contrastive": hist_c, "head": hist_h})

    def write_plots(self, result: DefenseResult, poison_mask: torch.Tensor, run_dir: Path,
                    true_labels: torch.Tensor | None = None) -> list[Path]:
        return write_separation(result, poison_mask, run_dir)
