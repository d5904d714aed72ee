"""The two adversarial scorers of the core methods, as detectors (their numbers are unchanged: the same
functions with the same arguments as the defenses call).

- ``ifgsm-sce`` (A-ABL stage 2): the SCE loss of every sample's iFGSM example (eps 2/255, 5 steps) on the
  suspect model; low loss = adversarially robust = suspicious; Otsu's threshold is A-ABL's rule.
- ``aibd-flip`` (AIBD steps 2-3): unbounded PGD flip counts k, amplified by Eq. 4; high = suspicious. AIBD
  itself picks its isolation rate by retraining per q (the ``aibd`` defense); as a detector the rule is Otsu
  (or ``top`` with a fixed q), optionally restricted to the target class that the class-surplus test finds, as
  in AIBD's quick preset (no class with a significant surplus: no restriction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import key_path, param
from ..errors import ConfigError
from ..stages.aabl import ifgsm_scores
from ..stages.aibd import TARGET_FRACTIONS, flip_scores, flip_statistics, guess_target, rank_desc
from ..surplus import ALPHA
from ..training import TrainConfig
from .base import PAPER_SUSPECT, Detector, IsolationRule, Scored, register_detector, rule_param, suspect_param


@dataclass(frozen=True)
class IFGSMParams:
    model: TrainConfig = suspect_param()
    eps: float = param(2 / 255, doc="iFGSM budget (L-inf, pixel units)")
    steps: int = param(5, doc="iFGSM steps")
    step: float | None = param(None, doc="iFGSM step (None: eps / steps)")
    loss: Literal["ce", "sce"] = param("sce", doc="loss the attack maximises and the score is")
    rule: IsolationRule = rule_param("otsu")


@register_detector
class IFGSMSCE(Detector):
    name = "ifgsm-sce"
    description = "A-ABL's split: SCE loss of the iFGSM example (eps 2/255, 5 steps); low = robust = suspicious"
    Params = IFGSMParams
    presets = {"quick": IFGSMParams(), "paper": IFGSMParams(model=PAPER_SUSPECT)}
    higher_is_suspicious = False
    score_name = "sce_adv"
    paper_settings_of = "a-abl"  # e.g. split eps 1/255 on 64x64 Tiny-ImageNet under --preset paper
    paper_param_names = {"split_eps": "eps", "split_steps": "steps", "split_step": "step", "split_loss": "loss",
                         "naive": "model"}

    def _score(self, data, ctx, model):
        p = self.params
        return Scored(ifgsm_scores(model, data, ctx, p.eps, p.steps, p.step, p.loss))


@dataclass(frozen=True)
class AIBDFlipParams:
    model: TrainConfig = suspect_param()
    pgd_step: float = param(1 / 255, doc="step of the unbounded flip-counting PGD")
    pgd_cap: int = param(255, doc="most PGD steps; never-flipped samples get k = cap")
    grad_norm_p: float = param(1.0, doc="norm of Eq. 4's input gradient (1 = L1, 2 = L2)")
    amplify: bool = param(True, doc="apply Eq. 4 (False: score by the raw k)")
    target_filter: bool = param(False, doc="score only samples of the target class the surplus test finds")
    target_fractions: tuple[float, ...] = param(TARGET_FRACTIONS, doc="depths (fractions) of the surplus test")
    alpha: float = param(ALPHA, doc="level of the surplus test (Bonferroni-adjusted p below it: a target)")
    rule: IsolationRule = rule_param("otsu")

    def validate(self, where: str) -> None:
        if self.pgd_cap < 1 or not self.pgd_step > 0:
            raise ConfigError(f"{where}: pgd_cap >= 1 and pgd_step > 0 are required")
        if not self.target_fractions or any(not 0 < f <= 1 for f in self.target_fractions):
            raise ConfigError(f"{key_path(where, 'target_fractions')}: {list(self.target_fractions)} must "
                              "be fractions in (0, 1]")


@register_detector
class AIBDFlip(Detector):
    name = "aibd-flip"
    description = "AIBD's score: PGD steps until the label flips, amplified by Eq. 4; high = suspicious"
    Params = AIBDFlipParams
    presets = {"quick": AIBDFlipParams(), "paper": AIBDFlipParams(model=PAPER_SUSPECT)}
    higher_is_suspicious = True
    score_name = "aibd_k_amplified"
    paper_settings_of = "aibd"  # its flip counting and surplus test; its suspect recipe stays A-ABL's naive stage
    paper_param_names = {name: name for name in ("pgd_step", "pgd_cap", "grad_norm_p", "amplify", "target_filter",
                                                 "target_fractions", "alpha")}

    def _score(self, data, ctx, model):
        p = self.params
        stats = flip_statistics(model, data, ctx, p.pgd_step, p.pgd_cap, p.grad_norm_p)
        scores, _ = flip_scores(stats, p.pgd_cap, p.amplify)
        info = {"never_flipped": int((stats.flip_step < 0).sum())}
        if p.target_filter:
            # scores outside the guessed target class drop below every candidate's
            y = data.y.cpu()
            surplus = guess_target(rank_desc(scores), y, list(data.classes), p.target_fractions, p.alpha)
            if surplus.target is not None:
                scores = torch.where(y == surplus.target, scores, scores.min() - 1 - (scores.max() - scores))
            info.update(target=surplus.target, target_best=surplus.best, target_p=surplus.p, target_filter=True,
                        target_filter_applied=surplus.target is not None, target_surplus=surplus.as_dict())
        return Scored(scores, labels=stats.flip_label.clone(), info=info)
