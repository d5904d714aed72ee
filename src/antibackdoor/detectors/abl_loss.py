"""ABL's loss isolation as a detector (Li et al., NeurIPS 2021): stages 1-2 of the ``abl`` defense, unchanged.

A fresh model is trained on all data with ABL's bounded loss (LGA or flooding), which keeps clean samples
from being fitted tightly while backdoor samples, learned much faster, still reach a low loss; every sample's
cross-entropy under that model is its score (low = suspicious), and ABL's own rule isolates the
``isolation_ratio`` lowest (1 %). The detector calls ``stages.abl.abl_isolate`` with ABL's parameters, as the
defense does, so on the same data, context and seed its scores and isolation are the ``abl`` defense's, bit for
bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import param
from ..stages.abl import QUICK_ABL, ABLParams, abl_isolate
from .base import Detector, IsolationRule, Scored, register_detector, rule_param


@dataclass(frozen=True)
class ABLLossParams:
    abl: ABLParams = param(factory=ABLParams, doc="ABL's isolation settings (isolation, bound, gamma, flooding, "
                                                  "per_sample, isolation_ratio; finetune/unlearn are unused)")
    rule: IsolationRule = rule_param()  # native: the isolation_ratio lowest losses


@register_detector
class ABLLoss(Detector):
    name = "abl-loss"
    description = "ABL's isolation: CE loss after bounded-loss (LGA) training; the lowest 1% are isolated"
    Params = ABLLossParams
    presets = {"quick": ABLLossParams(QUICK_ABL), "paper": ABLLossParams(ABLParams())}
    needs_model = False  # trains its own isolation model with the bounded loss
    has_native_rule = True
    higher_is_suspicious = False
    score_name = "isolation_ce"  # the abl defense's name for the same scores
    paper_settings_of = "abl"
    paper_param_names = {"*": "abl"}  # every ABL setting: the detector holds all of ABLParams

    def _score(self, data, ctx, model):
        p = self.params.abl
        _, scores, isolated, history = abl_isolate(data, ctx, p)
        return Scored(scores, isolated, info={"bound": p.bound, "level": p.level, "per_sample": p.per_sample,
                                              "isolation_epochs": len(history)})
