"""ABL's loss isolation as a detector (Li et al., NeurIPS 2021): stages 1-2 of the ``abl`` defense, unchanged.

A fresh model is trained on all data with ABL's bounded loss (LGA or flooding), which keeps clean samples
from being fitted tightly while backdoor samples, learned much faster, still reach a low loss; every sample's
cross-entropy under that model is its score (low = suspicious), and ABL's own rule isolates the
``isolation_ratio`` lowest (1 %). The detector calls ``ABL.isolate`` with ABL's parameters, so on the same
data, context and seed its scores and isolation are the ``abl`` defense's, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import param
from ..defenses.abl import ABL, ABLParams
from .base import Detector, IsolationRule, register_detector, rule_param


@dataclass(frozen=True)
class ABLLossParams:
    abl: ABLParams = param(factory=ABLParams, doc="ABL's isolation settings (isolation, bound, gamma, flooding, "
                                                  "per_sample, isolation_ratio; finetune/unlearn are unused)")
    rule: IsolationRule = rule_param()  # native: the isolation_ratio lowest losses

    def validate(self) -> None:
        where = "detector_params (abl-loss).abl"
        self.abl.isolation.validate(f"{where}.isolation")
        self.abl.validate(where)


@register_detector
class ABLLoss(Detector):
    name = "abl-loss"
    description = "ABL's isolation: CE loss after bounded-loss (LGA) training; the lowest 1% are isolated"
    Params = ABLLossParams
    presets = {"quick": ABLLossParams(ABL.presets["quick"]), "paper": ABLLossParams(ABL.presets["paper"])}
    needs_model = False  # trains its own isolation model with the bounded loss
    has_native_rule = True
    higher_is_suspicious = False
    score_name = "isolation_ce"  # the abl defense's name for the same scores
    paper_settings_of = "abl"
    paper_param_names = {"*": "abl"}  # every ABL setting: the detector holds all of ABLParams

    def _score(self, data, ctx, model):
        p = self.params.abl
        _, scores, isolated, history = ABL(params=p).isolate(data, ctx)
        return scores, isolated, {"bound": p.bound, "level": p.level, "per_sample": p.per_sample,
                                  "isolation_epochs": len(history)}
