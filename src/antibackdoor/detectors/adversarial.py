"""The two adversarial scorers of the core methods, as detectors (their numbers are unchanged: the same
functions with the same arguments as the defenses call).

- ``ifgsm-sce`` (A-ABL stage 2): the SCE loss of every sample's iFGSM example (eps 2/255, 5 steps) on the
  suspect model; low loss = adversarially robust = suspicious; Otsu's threshold is A-ABL's rule.
- ``aibd-flip`` (AIBD steps 2-3): unbounded PGD flip counts k, amplified by Eq. 4; high = suspicious. AIBD
  itself picks its isolation rate by retraining per q (the ``aibd`` defense); as a detector the rule is Otsu
  (or ``top`` with a fixed q), optionally restricted to the guessed target class as in AIBD's quick preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adversarial.pgd import PGDConfig
from ..defenses.aibd import AIBDParams, amplified_scores, flip_config, flip_counts, guess_target, rank_desc
from ..defenses.stages import adversarial_scores
from ..training import TrainConfig
from .base import PAPER_SUSPECT, QUICK_SUSPECT, Detector, IsolationRule, register_detector


@dataclass(frozen=True)
class IFGSMParams:
    model: TrainConfig = field(default_factory=lambda: QUICK_SUSPECT)
    eps: float = 2 / 255
    steps: int = 5
    step: float | None = None  # None: eps / steps
    loss: str = "sce"
    rule: IsolationRule = field(default_factory=lambda: IsolationRule("otsu"))


@register_detector
class IFGSMSCE(Detector):
    name = "ifgsm-sce"
    description = "A-ABL's split: SCE loss of the iFGSM example (eps 2/255, 5 steps); low = robust = suspicious"
    Params = IFGSMParams
    presets = {"quick": IFGSMParams(), "paper": IFGSMParams(model=PAPER_SUSPECT)}
    higher_is_suspicious = False
    score_name = "sce_adv"

    def _score(self, data, ctx, model):
        p = self.params
        cfg = PGDConfig.ifgsm(p.eps, p.steps, p.step, loss=p.loss)
        return adversarial_scores(model, data, cfg, ctx, desc="split (iFGSM)").loss, None, {}


@dataclass(frozen=True)
class AIBDFlipParams:
    model: TrainConfig = field(default_factory=lambda: QUICK_SUSPECT)
    pgd_step: float = 1 / 255
    pgd_cap: int = 255
    grad_norm_p: float = 1.0
    amplify: bool = True
    target_filter: bool = False  # isolate only samples whose label is the guessed target class
    target_fraction: float = 0.01
    rule: IsolationRule = field(default_factory=lambda: IsolationRule("otsu"))


@register_detector
class AIBDFlip(Detector):
    name = "aibd-flip"
    description = "AIBD's score: PGD steps until the label flips, amplified by Eq. 4; high = suspicious"
    Params = AIBDFlipParams
    presets = {"quick": AIBDFlipParams(), "paper": AIBDFlipParams(model=PAPER_SUSPECT)}
    higher_is_suspicious = True
    score_name = "aibd_k_amplified"

    def _score(self, data, ctx, model):
        p = self.params
        aibd = AIBDParams(pgd_step=p.pgd_step, pgd_cap=p.pgd_cap, grad_norm_p=p.grad_norm_p)
        stats = adversarial_scores(model, data, flip_config(aibd), ctx, desc="aibd flip counting")
        k = flip_counts(stats, p.pgd_cap)
        scores = amplified_scores(k, stats.grad_norm) if p.amplify else k.double()
        self._labels = stats.flip_label.clone()
        info = {"never_flipped": int((stats.flip_step < 0).sum())}
        if p.target_filter:
            # scores outside the guessed target class drop below every candidate's
            y = data.y.cpu()
            target, votes = guess_target(rank_desc(scores), y, p.target_fraction, data.num_classes)
            scores = torch.where(y == target, scores, scores.min() - 1 - (scores.max() - scores))
            info.update(target=target, target_vote_count=votes)
        return scores, None, info
