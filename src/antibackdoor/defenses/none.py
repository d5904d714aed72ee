"""No defense: standard training on all data, the baseline every defense is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import param
from ..data.imageset import ImageSet
from ..stages import DefenseContext, train_stage
from ..stages.recipes import PAPER_PLAIN, QUICK_PLAIN
from ..training import TrainConfig
from .base import Defense, DefenseResult, register_defense


@dataclass(frozen=True)
class NoDefenseParams:
    train: TrainConfig = param(factory=TrainConfig, doc="plain training on all the data")


@register_defense
class NoDefense(Defense):
    name = "none"
    cached_stages = {"train": "all"}
    label = "No defense"
    description = "standard training on all data (no defense)"
    Params = NoDefenseParams
    presets = {"quick": NoDefenseParams(QUICK_PLAIN), "paper": NoDefenseParams(PAPER_PLAIN)}

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        model, hist = train_stage(ctx, data, self.params.train, "train")
        return DefenseResult(model, history={"train": hist})
