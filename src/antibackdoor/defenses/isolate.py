"""Isolate, then train: any registered detector composed with a treatment of what it isolated.

This is the common shape of A-ABL, AIBD, ABL and D-ST/D-BR — score every sample, isolate some, train somehow —
so that comparisons such as A-ABL's Table 2 (naive training on its kept subset), Table 4 (adversarial training
on D-ST's split) and Table 5 (strong-augmentation splits) are configurations of this one defense:

- ``detector`` / ``detector_params``: which detector, with overrides of its preset (same preset as the run);
- ``treatment``: ``drop`` (train on the kept samples only), ``relabel`` (isolated samples get the detector's
  proposed label, e.g. AIBD's adversarial label, else a random other class; samples without one are dropped),
  ``unlearn`` (isolated samples get loss weight -``unlearn_weight``: gradient ascent, as in ABL);
- ``train``: the final recipe; give it an ``adversary`` for adversarial training, ``adversary: null`` for
  naive training;
- ``start``: ``fresh`` (a new model; A-ABL) or ``suspect`` (fine-tune the detector's suspect model; AIBD, ABL).

The quick preset is A-ABL's quick configuration and gives A-ABL's numbers: the suspect model and the final
model are trained with the same stage names and seeds as the ``a-abl`` defense.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..config import key_path, param
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..metrics import roc_auc, roc_curve_points
from ..plots import plot_roc
from ..seeding import generator
from ..stages import DefenseContext, Treatment, train_stage, treat
from ..stages.recipes import PAPER_AT, QUICK_AT
from ..training import TrainConfig
from .base import Defense, DefenseResult, UsesDetector, register_defense

log = logging.getLogger("antibackdoor")


@dataclass(frozen=True)
class IsolateParams:
    detector: str = param("ifgsm-sce", doc="the detector (antibackdoor detectors lists them)")
    detector_params: dict[str, Any] = param(factory=dict, doc="overrides of the detector's preset (same preset "
                                                              "as the run), e.g. detector_params.rule.kind=top")
    treatment: Treatment = param("drop", doc="what happens to isolated samples: drop, relabel or unlearn")
    train: TrainConfig = param(factory=lambda: PAPER_AT,
                               doc="final training (adversary null: naive training)")
    start: Literal["fresh", "suspect"] = param("fresh", doc="final model: a fresh one, or the detector's suspect "
                                                            "model fine-tuned")
    unlearn_weight: float = param(1.0, doc="unlearn: isolated samples get loss weight -unlearn_weight")

    def validate(self, where: str) -> None:
        if not isinstance(self.detector_params, dict):
            raise ConfigError(f"{key_path(where, 'detector_params')}: expected a mapping, got "
                              f"{self.detector_params!r}")


@register_defense
class IsolateThenTrain(UsesDetector, Defense):
    name = "isolate-then-train"
    description = "any detector + a treatment (drop / relabel / unlearn) + naive or adversarial training"
    Params = IsolateParams
    presets = {
        "quick": IsolateParams(train=QUICK_AT),
        "paper": IsolateParams(train=PAPER_AT),
    }

    @property
    def paper_source(self) -> str:
        """Under ``--preset paper`` the run trains the paper model of the detector's defense (AIBD's WRN-16-1
        on GTSRB for ``aibd-flip``), so the detector scores the model that defense splits with."""
        return self.detector.paper_settings_of or self.name

    def write_plots(self, result: DefenseResult, poison_mask: torch.Tensor, run_dir, true_labels=None) -> list:
        """The detector's ROC curve (the runner passes the ground truth, which the defense never sees)."""
        suspicion = result.suspicion()
        if suspicion is None or not poison_mask.any() or poison_mask.all():
            return []
        fpr, tpr = roc_curve_points(suspicion, poison_mask)
        return [plot_roc({self.params.detector: (fpr, tpr, roc_auc(suspicion, poison_mask))}, run_dir / "roc.png",
                         title=f"{self.params.detector}: ROC of the isolation scores")]

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        p = self.params
        log.info("isolate-then-train: detector %s", p.detector)
        det = self.detector.score(data, ctx)
        isolated = det.isolated.clone()
        if int(isolated.sum()) == len(data):
            log.warning("isolate-then-train: the detector isolated every sample; keeping all of them")
            isolated[:] = False
        labels, weight = treat(data.y.cpu(), isolated, p.treatment, data.num_classes,
                               generator(ctx.seed, "isolate", "relabel"), det.labels, p.unlearn_weight)
        use = weight != 0
        log.info("isolate-then-train: %s treatment of %d isolated samples; training on %d samples", p.treatment,
                 int(isolated.sum()), int(use.sum()))
        start = None
        if p.start == "suspect":
            if det.model is None:
                raise ConfigError(f"isolate-then-train.start: 'suspect' needs a model-based detector, and "
                                  f"{p.detector} trains none")
            start = copy.deepcopy(det.model)
        train_set = data.subset(use).with_labels(labels[use])
        sw = weight[use] if bool((weight[use] != 1).any()) else None
        model, hist = train_stage(ctx, train_set, p.train, "adv_train" if p.train.adversary else "train",
                                  sample_weight=sw, seed_offset=1, model=start)
        changed = bool((labels != data.y.cpu()).any())
        info = {"detector": p.detector, "treatment": p.treatment, **det.info}
        return DefenseResult(model, kept=~isolated, scores=det.scores, score_name=det.score_name,
                             higher_is_suspicious=det.higher_is_suspicious,
                             new_labels=labels if changed else None, info=info, history={"train": hist})
