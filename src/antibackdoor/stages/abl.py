"""ABL's loss isolation (stages 1-2 of Li et al., NeurIPS 2021), shared by the ``abl`` defense and the
``abl-loss`` detector: a fresh model trained on all data with a bounded loss, then every sample's cross-entropy
under it (low = suspicious) and the ``isolation_ratio`` lowest isolated. ``ABLParams`` holds the whole method's
settings (the detector reads the isolation ones; fine-tuning and unlearning are the defense's)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import key_path, param
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..training import Batch, StepOutput, TrainConfig
from .context import DefenseContext
from .fit import train_stage
from .scores import sample_losses
from .select import top_fraction

log = logging.getLogger("antibackdoor")

Bound = Literal["lga", "flooding"]
BOUNDS: tuple[str, ...] = Bound.__args__


def bounded_loss(per_sample: torch.Tensor, bound: str = "lga", level: float = 0.5,
                 per_sample_bound: bool = True) -> torch.Tensor:
    """The isolation objective: LGA sign(L - level) * L or flooding |L - level| + level, applied to every
    sample's loss and then averaged (``per_sample_bound``) or to the batch-mean loss."""
    loss = per_sample if per_sample_bound else per_sample.mean()
    if bound == "lga":
        out = torch.sign(loss - level) * loss
    elif bound == "flooding":
        out = (loss - level).abs() + level
    else:
        raise ConfigError(f"abl.bound: {bound!r} is not one of {', '.join(BOUNDS)}")
    return out.mean()


def isolation_scores(model: nn.Module, data: ImageSet, ctx: DefenseContext) -> torch.Tensor:
    """ABL's score: each sample's cross-entropy under the isolation model (eval mode, no augmentation, whole
    batches, in the context's precision; low = suspicious)."""
    return sample_losses(model, data, ctx)


def isolate_lowest(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """ABL's isolation: a mask of the ``top_count(N, ratio)`` lowest-loss samples (at least one)."""
    return top_fraction(-scores.double(), ratio)


@dataclass(frozen=True)
class ABLParams:
    isolation: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=20, optimizer="sgd", lr=0.1, weight_decay=1e-4, batch_size=128, crop=0, flip=False),
        doc="stage 1: a fresh model trained on all the data with the bounded loss")
    bound: Bound = param("lga", doc="lga: sign(L-gamma)*L (paper); flooding: |L-b|+b (official default)")
    gamma: float = param(0.5, doc="the LGA floor gamma")
    flooding: float = param(0.5, doc="the flooding level b")
    per_sample: bool = param(False, doc="bound each loss (paper) instead of the batch mean (official code)")
    isolation_ratio: float = param(0.01, doc="share of the samples isolated (lowest isolation loss)")
    finetune: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=60, optimizer="sgd", lr=0.1, schedule="step", milestones=(40,), weight_decay=1e-4,
        batch_size=128, crop=4, flip=True), doc="stage 3: fine-tuning the isolation model on the kept samples "
                                                "(epochs 0: skipped); the abl defense only")
    unlearn: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=5, optimizer="sgd", lr=5e-4, weight_decay=1e-4, batch_size=128, crop=0, flip=False),
        doc="stage 4: gradient ascent on the isolated samples; the abl defense only")

    def validate(self, where: str) -> None:
        if not self.gamma > 0:
            raise ConfigError(f"{key_path(where, 'gamma')}: {self.gamma} must be > 0")
        if not self.flooding > 0:
            raise ConfigError(f"{key_path(where, 'flooding')}: {self.flooding} must be > 0")
        if not 0 < self.isolation_ratio < 1:
            raise ConfigError(f"{key_path(where, 'isolation_ratio')}: {self.isolation_ratio} must be in (0, 1)")

    @property
    def level(self) -> float:
        return self.gamma if self.bound == "lga" else self.flooding



#: CPU budget: the quick CNN with Adam (SGD 0.1 does not suit it, see stages/recipes.py); unlearning keeps the
#: paper preset's number of ascent steps (~4 per epoch: 500 isolated samples in batches of 128; the official
#: config's batches of 64 give 8) for the ~50 samples that 1 % of the mini dataset isolates, by using batches of
#: 16. On Blend it destroys the model: docs/baselines.md, "ABL on Blend".
QUICK_ABL = ABLParams(
    isolation=TrainConfig(epochs=20, optimizer="adam", lr=1e-3, crop=0, flip=False),
    finetune=TrainConfig(epochs=30, optimizer="adam", lr=1e-3, schedule="cosine", crop=4, flip=False),
    unlearn=TrainConfig(epochs=5, optimizer="sgd", lr=5e-4, weight_decay=1e-4, batch_size=16, crop=0, flip=False),
)


def isolation_objective(p: ABLParams):
    """The bounded loss of ``p`` as a ``train(loss_fn=...)`` objective (logs the plain CE as ``ce``)."""

    def loss_fn(model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.x)
        per = F.cross_entropy(logits.float(), batch.y, reduction="none")
        return StepOutput(bounded_loss(per, p.bound, p.level, p.per_sample), logits, {"ce": per.mean()})

    return loss_fn


def abl_isolate(data: ImageSet, ctx: DefenseContext,
                p: ABLParams) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[dict]]:
    """Stages 1-2: the isolation model (stage ``isolation``, seed offset 0), every sample's loss and the
    isolated mask."""
    log.info("ABL 1/4: isolation training with the %s bound (level %g, %s) on all %d samples", p.bound,
             p.level, "per sample" if p.per_sample else "batch mean", len(data))
    model, history = train_stage(ctx, data, p.isolation, "isolation", loss_fn=isolation_objective(p))
    scores = isolation_scores(model, data, ctx)
    return model, scores, isolate_lowest(scores, p.isolation_ratio), history
