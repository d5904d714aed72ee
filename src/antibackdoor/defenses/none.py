"""No defense: standard training on all data, the baseline every defense is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import param
from ..data.imageset import ImageSet
from ..training import TrainConfig
from .base import Defense, DefenseContext, DefenseResult, register_defense
from .stages import train_stage

# Plain training recipes, also the backdoored models that post-training defenses (NAD, D-BR) start from.
# quick: A-ABL's quick stage 1 too, so `none` shows what that stage learns: Adam 2e-3 with a cosine decay over
# 25 epochs, crop without flip (docs/a-abl.md)
QUICK_PLAIN = TrainConfig(epochs=25, optimizer="adam", lr=2e-3, crop=4, flip=False, schedule="cosine")
PAPER_PLAIN = TrainConfig(epochs=100, optimizer="sgd", lr=0.1, schedule="step", milestones=(50, 75, 90), crop=4,
                          flip=True)


@dataclass(frozen=True)
class NoDefenseParams:
    train: TrainConfig = param(factory=TrainConfig, doc="plain training on all the data")


@register_defense
class NoDefense(Defense):
    name = "none"
    description = "standard training on all data (no defense)"
    Params = NoDefenseParams
    presets = {"quick": NoDefenseParams(QUICK_PLAIN), "paper": NoDefenseParams(PAPER_PLAIN)}

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        model, hist = train_stage(ctx, data, self.params.train, "train")
        return DefenseResult(model, history={"train": hist})
