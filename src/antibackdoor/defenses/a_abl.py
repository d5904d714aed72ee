"""A-ABL (Zhao & Wressnegger, AISec 2024): adversarially robust anti-backdoor learning.

1. Naive training on all data (Adam, lr 1e-3; 20 epochs in the paper).
2. Attack every sample with iFGSM (eps 2/255, 5 steps; 1/255 on 64x64 data), score it by the SCE loss of
   its adversarial example and split with Otsu's threshold: low loss = adversarially robust = isolated
   (patch triggers such as BadNets/Trojan land here); the vulnerable rest is kept.
3. PGD adversarial training from scratch on the kept subset (eps 8/255, step 2/255, 10 steps; SGD lr 0.1,
   x0.1 at epochs 50/75/90 of 100), which suppresses the stealthy triggers (Blend, WaNet, SSBA) left in it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..adversarial.pgd import PGDConfig
from ..data.imageset import ImageSet
from ..training import TrainConfig
from .adv_train import PAPER_AT, QUICK_AT
from .base import Defense, DefenseContext, DefenseResult, register_defense
from .none import QUICK_PLAIN
from .stages import adversarial_scores, otsu_threshold, train_stage

log = logging.getLogger("antibackdoor")



@dataclass(frozen=True)
class AABLParams:
    naive: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, optimizer="adam", lr=1e-3))
    split_eps: float = 2 / 255
    split_steps: int = 5
    split_step: float | None = None  # None: eps / steps
    split_loss: str = "sce"  # loss maximised by iFGSM and used as the score
    final: TrainConfig = field(default_factory=lambda: PAPER_AT)


@register_defense
class AABL(Defense):
    name = "a-abl"
    description = "A-ABL: naive training, iFGSM+SCE Otsu split, PGD adversarial training on the vulnerable subset"
    Params = AABLParams
    assumptions = (
        "Nothing is known about the trigger, the target class or the poison rate, and no clean data is needed.",
        "A model trained normally on all the data learns the backdoor as a strong feature: poisoned samples keep "
        "their label under a small iFGSM perturbation (split_eps), so their adversarial loss is low and they fall "
        "below Otsu's threshold. Patch-like triggers behave so; blended, warping or other stealthy triggers "
        "usually do not and stay in the kept set.",
        "Adversarial training (PGD, eps 8/255) on the kept set suppresses the triggers left in it; a trigger that "
        "changes images by more than that budget is not suppressed by it.",
        "Otsu's threshold always cuts the score distribution somewhere, so clean samples are isolated too (on "
        "clean data typically 10-25 %): isolation alone is no evidence of poison; a class with a surplus is.",
    )
    presets = {
        "paper": AABLParams(),
        # The split only works once the naive model has learned the backdoor firmly: crop without flip (a flip
        # moves a corner patch to the other corner) and a schedule that ends at a low loss. 25 epochs of Adam
        # at 2e-3 with a cosine decay isolate as much poison as 40 at a constant 1e-3 in 60 % of the time
        # (mini CIFAR-10, BadNets, targets 0 and 3: docs/a-abl.md; benchmarks/probe_quick_speed.py).
        "quick": AABLParams(naive=QUICK_PLAIN, final=QUICK_AT),
    }

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        p = self.params
        # Stage 1: naive training on everything.
        log.info("A-ABL stage 1/3: naive training on all %d samples", len(data))
        naive, naive_hist = train_stage(ctx, data, p.naive, "naive")
        # Stage 2: adversarial split.
        log.info("A-ABL stage 2/3: iFGSM split (eps %.4g, %d steps, %s)", p.split_eps, p.split_steps, p.split_loss)
        scores = self.split_scores(naive, data, ctx)
        threshold = otsu_threshold(scores)
        kept = scores > threshold  # vulnerable (high adversarial SCE loss) samples are kept
        if int(kept.sum()) == 0:
            kept[:] = True
        log.info("split: Otsu threshold %.4g; kept %d vulnerable, isolated %d robust samples", threshold,
                 int(kept.sum()), int((~kept).sum()))
        # Stage 3: adversarial training from scratch on the vulnerable subset.
        log.info("A-ABL stage 3/3: PGD adversarial training on the %d kept samples", int(kept.sum()))
        model, final_hist = train_stage(ctx, data.subset(kept), p.final, "adv_train", seed_offset=1)
        return DefenseResult(
            model, kept=kept, scores=scores, score_name="sce_adv", higher_is_suspicious=False,
            info={"threshold": threshold, "kept": int(kept.sum()), "isolated": int((~kept).sum())},
            history={"naive": naive_hist, "adv_train": final_hist},
        )

    def split_scores(self, model, data: ImageSet, ctx: DefenseContext):
        """Per-sample SCE loss of the iFGSM adversarial example (low = robust = suspicious)."""
        p = self.params
        cfg = PGDConfig.ifgsm(p.split_eps, p.split_steps, p.split_step, loss=p.split_loss)
        return adversarial_scores(model, data, cfg, ctx, desc="split (iFGSM)").loss
