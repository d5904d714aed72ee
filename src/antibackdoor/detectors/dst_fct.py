"""D-ST/D-BR's sample distinguishment as a detector (Chen et al., NeurIPS 2022): the FCT split, unchanged.

The SD module (stages/separation.py) trains a model briefly, fine-tunes it with the intra-class loss and
scores every sample by its feature consistency towards transformations (FCT: the mean squared change of its
penultimate features under a random rotation + shift; high = suspicious). It splits the data by rank into D_c
(the ``clean_ratio`` lowest), D_p (the ``poison_ratio`` highest) and the uncertain (A-ABL: "suspicious") rest.
The detector calls ``separate`` with the defenses' parameters, so on the same data, context and seed its
scores and parts are those of the ``d-st`` and ``d-br`` defenses.

Its own rule (``keep``) says which parts stay, the two columns of A-ABL's Table 4: ``clean+suspicious``
isolates D_p (what D-ST and D-BR treat as poisoned), ``clean`` isolates everything but D_c.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import param
from ..stages.separation import QUICK_SEPARATION, SeparationParams, separate
from .base import Detector, IsolationRule, Scored, register_detector, rule_param

Keep = Literal["clean+suspicious", "clean"]


@dataclass(frozen=True)
class FCTParams:
    separation: SeparationParams = param(factory=SeparationParams, doc="the SD module (warm-up, intra-class "
                                                                       "fine-tuning, FCT transformation, ratios)")
    keep: Keep = param("clean+suspicious", doc="native rule: keep D_c + uncertain (isolate D_p, as D-ST) or D_c "
                                               "only (A-ABL Table 4's 'Clean')")
    rule: IsolationRule = rule_param()


@register_detector
class DSTFCT(Detector):
    name = "dst-fct"
    description = "D-ST/D-BR's split: FCT (feature change under rotation + shift); the highest 5% are isolated"
    Params = FCTParams
    presets = {"quick": FCTParams(QUICK_SEPARATION), "paper": FCTParams(SeparationParams())}
    needs_model = False  # trains its own warm-up + intra-class model
    has_native_rule = True
    higher_is_suspicious = True
    score_name = "fct"  # the d-st / d-br defenses' name for the same scores
    paper_settings_of = "d-st"
    paper_param_names = {"separation": "separation"}  # the SD module; not D-ST's training stages

    def _score(self, data, ctx, model):
        sep = separate(ctx, data, self.params.separation)
        isolated = sep.poisoned if self.params.keep == "clean+suspicious" else ~sep.clean
        info = {k: v for k, v in sep.info().items() if k != "threshold"}  # the rule's threshold is the base's
        return Scored(sep.scores, isolated, info={"keep": self.params.keep, **info})
