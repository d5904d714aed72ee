"""CBD — Causality-inspired Backdoor Defense (Zhang et al., CVPR 2023).

1. f_B: a model trained on all data for a few epochs only (it picks up the backdoor, which is learned first,
   far better than the clean task), then frozen.
2. f_C: a fresh model trained on all data with per-sample weights w = L_B / (L_B + L_C) (the two models'
   cross-entropies of the sample; L_C detached), normalised to mean 1 over the batch: samples that f_B fits
   much better than f_C — the backdoor — get small weights. Plus the mutual-information term between f_C's
   and f_B's penultimate representations (weight ``mi_weight``), estimated adversarially: a discriminator T
   maximises E[T(r, z)] - E[T(r, z_shuffled)] under a Lipschitz constraint and f_C minimises it.

The run directory gets ``cbd_weights.png``: the final weights (f_B and the trained f_C, eval mode, no
augmentation) of clean vs poisoned samples; ``isolation.csv`` lists every sample's weight. CBD isolates
nothing, so TPR/FPR do not apply.

Choices where the sources disagree (docs/baselines.md):
- The MI term is on by default, as in the paper; the official code ships it off (``disentangle = 0``);
  ``mi=false`` reproduces that.
- The official code trains the discriminator for a whole epoch before each epoch of f_C; we alternate per
  batch (one discriminator step, then one f_C step on the same batch): the same number of steps of each.
- Lipschitz constraint: the official code divides every parameter (biases too) by the square root of a
  power-iteration estimate of its spectral norm; we divide each weight matrix by its exact spectral norm.
- Schedules (paper preset) follow the official code: f_B 5 epochs at SGD 0.1 (its learning-rate schedule
  is applied to f_C's optimizer only, so f_B stays at 0.1), f_C 100 epochs SGD 0.1, x0.1 at 20 and 70,
  batches of 64, weight decay 1e-4, crop + flip (plus Cutout there, which we do not have); discriminator
  Adam 0.2, x0.1 every 20 epochs, dropout 0.2, MI weight 0.01.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..caching import atomic_write
from ..config import key_path, param
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..models.features import capture, classifier_head
from ..plots import plot_cbd_weights
from ..seeding import seeded_rng
from ..stages import DefenseContext, sample_losses, train_stage
from ..training import Batch, StepOutput, TrainConfig
from .base import Defense, DefenseResult, register_defense

log = logging.getLogger("antibackdoor")


def cbd_weights(loss_backdoored: torch.Tensor, loss_clean: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """CBD's sample weight L_B / (L_B + L_C): near 0 where f_B fits the sample far better than f_C."""
    return loss_backdoored / (loss_backdoored + loss_clean + eps)


def normalise_weights(w: torch.Tensor) -> torch.Tensor:
    """Scale a batch's weights to mean 1 (the official code's w * B / sum(w))."""
    return w * (w.numel() / w.sum().clamp_min(1e-12))


class MIDiscriminator(nn.Module):
    """T(r, z): a 2-layer MLP on the concatenated representations (hidden width = z's dimension)."""

    def __init__(self, dim_r: int, dim_z: int, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim_r + dim_z, dim_z), nn.LeakyReLU(),
                                 nn.Dropout(dropout), nn.Linear(dim_z, 1))

    def forward(self, r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([r, z], dim=1)).squeeze(-1)

    @torch.no_grad()
    def lipschitz_(self) -> None:
        """Divide every weight matrix by its spectral norm (the WGAN-style constraint of the estimator)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.div_(torch.linalg.matrix_norm(m.weight.float(), ord=2).clamp_min(1e-12))


def mi_estimate(disc: MIDiscriminator, r: torch.Tensor, z: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """E[T(r, z)] - E[T(r, z[perm])]: large when z carries information about r."""
    return disc(r, z).mean() - disc(r, z[perm]).mean()


@dataclass(frozen=True)
class CBDParams:
    backdoored: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=5, optimizer="sgd", lr=0.1, weight_decay=1e-4, batch_size=64, crop=4, flip=True),
        doc="f_B: a short plain training on all the data, then frozen")
    clean: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=100, optimizer="sgd", lr=0.1, schedule="step", milestones=(20, 70), weight_decay=1e-4,
        batch_size=64, crop=4, flip=True), doc="f_C: a fresh model on all the data, loss weights L_B / (L_B + L_C)")
    mi: bool = param(True, doc="the mutual-information term (paper); the official code ships it off")
    mi_weight: float = param(0.01, doc="weight of the mutual-information term")
    mi_lr: float = param(0.2, doc="discriminator Adam learning rate")
    mi_lr_step: int = param(20, doc="discriminator lr x0.1 every this many epochs (0: constant)")
    mi_dropout: float = param(0.2, doc="discriminator dropout")

    def validate(self, where: str) -> None:
        if self.mi_weight < 0:
            raise ConfigError(f"{key_path(where, 'mi_weight')}: {self.mi_weight} must be >= 0")
        if not self.mi_lr > 0:
            raise ConfigError(f"{key_path(where, 'mi_lr')}: {self.mi_lr} must be > 0")
        if self.mi_lr_step < 0:
            raise ConfigError(f"{key_path(where, 'mi_lr_step')}: {self.mi_lr_step} must be >= 0")
        if not 0 <= self.mi_dropout < 1:
            raise ConfigError(f"{key_path(where, 'mi_dropout')}: {self.mi_dropout} must be in [0, 1)")


@register_defense
class CBD(Defense):
    name = "cbd"
    cached_stages = {"backdoored": "all"}
    label = "CBD"
    description = "CBD: a briefly trained backdoored model re-weights the clean model's loss, plus an MI penalty"
    Params = CBDParams
    presets = {
        "paper": CBDParams(),
        # CPU budget: the small CNN with Adam (as every quick stage); f_C the 40 epochs of `none`'s quick
        # recipe; crop without flip (a flip moves a corner trigger). f_B gets the official 5 epochs, in
        # batches of 32: on the 10x smaller data set, batches of 128 give it ~200 steps, after which it fits
        # the BadNets poison only loosely (median loss 0.10 vs 0.98 for clean samples); with 32 (~800 steps)
        # 0.02 vs 0.78, so that L_B / (L_B + L_C) is small for the poison, as the method needs.
        "quick": CBDParams(
            backdoored=TrainConfig(epochs=5, optimizer="adam", lr=1e-3, batch_size=32, crop=4, flip=False),
            clean=TrainConfig(epochs=40, optimizer="adam", lr=1e-3, crop=4, flip=False),
        ),
    }

    def weighted_loss(self, backdoored: nn.Module, disc: MIDiscriminator | None,
                      disc_opt: torch.optim.Optimizer | None):
        """f_C's objective for one batch: weighted CE (+ the MI term, after one discriminator step)."""
        p = self.params

        def loss_fn(model: nn.Module, batch: Batch) -> StepOutput:
            with capture(model, stages=False) as fz:
                logits = model(batch.x)
            with torch.no_grad(), capture(backdoored, stages=False) as fr:
                logits_b = backdoored(batch.x)
            y = batch.y
            ce = F.cross_entropy(logits.float(), y, reduction="none")
            ce_b = F.cross_entropy(logits_b.float(), y, reduction="none")
            raw = cbd_weights(ce_b, ce.detach())
            loss = (normalise_weights(raw) * ce).mean()
            parts = {"weighted_ce": loss, "ce": ce.mean(), "weight_raw": raw.mean()}
            if disc is not None:
                r, z = fr.penultimate.float(), fz.penultimate.float()
                n = len(y)
                device = y.device
                with torch.autocast(device.type, enabled=False):
                    for g in disc_opt.param_groups:
                        g["lr"] = p.mi_lr * (0.1 ** (batch.epoch // p.mi_lr_step) if p.mi_lr_step else 1.0)
                    perm = torch.randperm(n, generator=batch.generator).to(device)
                    d_est = mi_estimate(disc, r, z.detach(), perm)
                    disc_opt.zero_grad(set_to_none=True)
                    (-d_est).backward()
                    disc_opt.step()
                    disc.lipschitz_()
                    perm = torch.randperm(n, generator=batch.generator).to(device)
                    mi = mi_estimate(disc, r, z, perm)
                loss = loss + p.mi_weight * mi
                parts.update(mi=mi, disc_estimate=d_est)
            return StepOutput(loss, logits, parts)

        return loss_fn

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        p = self.params
        log.info("CBD 1/2: f_B, %d epochs on all %d samples, then frozen", p.backdoored.epochs, len(data))
        backdoored, hist_b = train_stage(ctx, data, p.backdoored, "backdoored")
        backdoored.eval()
        for q in backdoored.parameters():
            q.requires_grad_(False)
        model = ctx.fresh_model(1)
        disc = disc_opt = None
        if p.mi:
            dim = classifier_head(model).in_features
            with seeded_rng(ctx.seed, "cbd", "discriminator"):  # its initial weights, reproducibly
                disc = MIDiscriminator(classifier_head(backdoored).in_features, dim, p.mi_dropout).to(ctx.device)
            disc_opt = torch.optim.Adam(disc.parameters(), lr=p.mi_lr)
        state = self._disc_state_path(ctx)
        if disc is not None and state is not None and ctx.resume and state.exists():
            saved = torch.load(state, map_location=ctx.device, weights_only=True)
            disc.load_state_dict(saved["disc"])
            disc_opt.load_state_dict(saved["opt"])

        def save_disc(epoch: int, _model: nn.Module) -> None:
            if disc is not None and state is not None:
                payload = {"disc": disc.state_dict(), "opt": disc_opt.state_dict()}
                atomic_write(state, lambda tmp: torch.save(payload, tmp))

        log.info("CBD 2/2: f_C with loss weights L_B/(L_B+L_C)%s", " and the MI penalty" if p.mi else "")
        _, hist_c = train_stage(ctx, data, p.clean, "clean", model=model, seed_offset=1,
                                loss_fn=self.weighted_loss(backdoored, disc, disc_opt), on_epoch_end=save_disc)
        weights = cbd_weights(sample_losses(backdoored, data, ctx), sample_losses(model, data, ctx))
        info = {"mi": p.mi, "weight_median": float(weights.median()), "weight_mean": float(weights.mean())}
        return DefenseResult(model, scores=weights, score_name="cbd_weight", higher_is_suspicious=False, info=info,
                             history={"backdoored": hist_b, "clean": hist_c})

    @staticmethod
    def _disc_state_path(ctx: DefenseContext) -> Path | None:
        return None if ctx.workdir is None else ctx.workdir / "cbd_discriminator.pt"

    def write_plots(self, result: DefenseResult, poison_mask: torch.Tensor, run_dir: Path,
                    true_labels: torch.Tensor | None = None) -> list[Path]:
        if result.scores is None:
            return []

        return [plot_cbd_weights(result.scores, poison_mask, run_dir / "cbd_weights.png")]

