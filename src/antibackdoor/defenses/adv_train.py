"""PGD adversarial training (Madry et al. 2018) on all data: A-ABL's "Adv. Train" baseline."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import param
from ..data.imageset import ImageSet
from ..stages import DefenseContext, train_stage
from ..stages.recipes import PAPER_AT, QUICK_AT
from ..training import TrainConfig
from .base import Defense, DefenseResult, register_defense


@dataclass(frozen=True)
class AdvTrainParams:
    train: TrainConfig = param(factory=lambda: PAPER_AT, doc="adversarial training on all the data (adversary: the "
                                                              "PGD attack)")


@register_defense
class AdvTrain(Defense):
    name = "adv-train"
    cached_stages = {"train": "all"}
    label = "Adv. Train"
    description = "PGD adversarial training on all data (eps 8/255, step 2/255, 10 steps in the paper preset)"
    Params = AdvTrainParams
    presets = {"quick": AdvTrainParams(QUICK_AT), "paper": AdvTrainParams(PAPER_AT)}

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        model, hist = train_stage(ctx, data, self.params.train, "adv_train")
        return DefenseResult(model, history={"adv_train": hist})
