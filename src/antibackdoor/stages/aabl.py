"""A-ABL's split (stage 2), shared by the ``a-abl`` defenses and the ``ifgsm-sce`` detector: the SCE loss of
every sample's iFGSM example on the naive model (low = adversarially robust = suspicious) and the threshold that
cuts it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..adversarial.pgd import PGDConfig
from ..data.imageset import ImageSet
from .context import DefenseContext
from .scores import adversarial_scores
from .select import otsu_threshold, top_count, top_fraction

log = logging.getLogger("antibackdoor")

SplitLoss = Literal["ce", "sce"]


def ifgsm_scores(model: nn.Module, data: ImageSet, ctx: DefenseContext, eps: float, steps: int,
                 step: float | None = None, loss: SplitLoss = "sce") -> torch.Tensor:
    """Per-sample ``loss`` of each sample's iFGSM adversarial example (budget ``eps``, ``steps`` steps of
    ``step``, default eps / steps), float32 on the CPU."""
    cfg = PGDConfig.ifgsm(eps, steps, step, loss=loss)
    return adversarial_scores(model, data, cfg, ctx, desc="split (iFGSM)").loss


@dataclass
class Split:
    """Which samples the split keeps (the adversarially vulnerable ones) and how it decided."""

    kept: torch.Tensor  # bool N
    threshold: float  # scores above it are kept
    otsu: float  # Otsu's threshold (equal to ``threshold`` unless the floor or the fallback acted)
    rule: Literal["otsu", "floor", "keep-all"]

    def info(self) -> dict:
        return {"threshold": self.threshold, "otsu_threshold": self.otsu, "split_rule": self.rule,
                "kept": int(self.kept.sum()), "isolated": int((~self.kept).sum())}


def robust_split(scores: torch.Tensor, log_scale: bool = False, min_isolated: float = 0.0) -> Split:
    """Keep the samples whose score is above Otsu's threshold (on log(score) with ``log_scale``).

    ``min_isolated`` > 0 is a floor: when Otsu isolates less than that fraction, the ``min_isolated`` lowest
    scores are isolated instead (``top_count`` of them, ties by index). When Otsu would isolate every sample,
    every sample is kept (there is nothing to train on otherwise). Both say so in the log.
    """
    s = scores.cpu()
    otsu = otsu_threshold(s, log_scale=log_scale)
    kept, threshold, rule = s > otsu, otsu, "otsu"  # compared in the scores' own dtype, as always
    n = len(s)
    if min_isolated > 0 and int((~kept).sum()) < top_count(n, min_isolated):
        isolated = top_fraction(-s.double(), min_isolated)
        log.info("split: Otsu's threshold %.4g isolates %d of %d samples (%.1f %%), below the floor min_isolated "
                 "= %g; isolating the %d lowest-scored samples instead", otsu, int((~kept).sum()), n,
                 100 * float((~kept).float().mean()), min_isolated, int(isolated.sum()))
        kept, rule = ~isolated, "floor"
        threshold = float(s[isolated].max()) if isolated.any() else otsu
    if int(kept.sum()) == 0:
        log.warning("split: Otsu's threshold %.4g isolates every sample; keeping all %d instead (nothing isolated)",
                    otsu, n)
        kept, rule = torch.ones(n, dtype=torch.bool), "keep-all"
    return Split(kept, threshold, otsu, rule)
