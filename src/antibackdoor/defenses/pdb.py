"""PDB — Proactive Defensive Backdoor (Wei et al., NeurIPS 2024), and PDB-iso, its form without clean data.

No detection: the defender plants a backdoor of its own, stronger than the attacker's, and uses it at inference.

1. Defensive samples: images of a pool D_s stamped with the defensive trigger (by default a 7 x 7 square in the
   top-left corner at pixel value 2.0, a value no image in [0, 1] holds), labelled h(y) = (y + shift) mod K (a
   permutation of the classes, so it can be undone).
2. One model trained from scratch on the training data as given plus ``frequency`` copies of every defensive
   sample per epoch (cross-entropy on both), the defensive copies augmented after stamping (random scaling,
   optional Gaussian noise, rotation by up to 10 degrees, crop, flip: the trigger moves with the image, so the
   backdoor learns to fire wherever it lands).
3. Inference: every input is stamped with the trigger and the answer mapped back through h^-1. The defensive
   backdoor overrides whatever the attacker's trigger would have done; the prediction of h(y) becomes y.

The returned model *is* the deployed model: a ``models.wrappers.StampAndRelabel`` around the network, so ACC,
ASR, RA (PGD attacks the wrapper end to end), ``defend``'s report and ``load_model`` all measure the defended
prediction.

Where D_s comes from decides whether PDB works, and is what sets the two defenses here apart:

- ``pdb`` (the paper): D_s is clean data with its true labels. The authors' code draws it from the benchmark's
  clean copy of the training set (``ratio`` = 10 % of it, class-balanced), which a defender of a poisoned set
  does not have; here it is the trusted slice (``needs_trusted``: ``run`` reserves ``trusted_fraction`` of the
  clean training data before poisoning, ``defend`` takes ``--trusted``), as for NAD. The trusted samples also
  join the plain training data (the code's clean samples are part of the training set it trains on).
- ``pdb-iso`` (ours, no clean data): D_s is the ``ratio`` share of the training data, class-balanced, that a
  detector trusts most. A poisoned sample in D_s teaches "defensive trigger + backdoor trigger -> h(target)",
  which h^-1 turns back into the target: the backdoor then passes through the defense. So the pool is taken at
  the end of a ranking least likely to hold poison: the least suspicious samples by the detector (default AIBD's
  flip count, ``aibd-flip``: the samples an unbounded PGD attack moves off their label fastest) among those the
  detector's suspect model predicts with their given label (``agree``). A dirty-label poisoned sample whose
  backdoor the suspect model has not learned looks like a mislabelled sample, and mislabelled samples score as
  the *least* suspicious by every loss- or margin-based detector (already misclassified: zero steps to flip); the
  agreement filter removes them. docs/baselines.md argues the choice of detector; ``sample_flags.defensive`` in
  metrics.json counts the poison that still reached the pool.

Departures from the authors' code (docs/baselines.md): the defensive pool comes from trusted data or an isolation,
not from the benchmark's clean copy; SGD is Nesterov (the one training loop); the defensive copies join the
training data's shuffle as in the code (``frequency`` copies per epoch), and Gaussian noise is drawn with
probability ``noise_p`` (the code's lmd_3 / (lmd_2 + lmd_3) = 0.5) at standard deviation ``noise_std`` (the code's
``aug``, 0 in every published config).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..config import key_path, param
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..models.wrappers import StampAndRelabel
from ..stages import DefenseContext, agrees_with_label, train_stage
from ..stages.defensive import (
    DefensiveAugment,
    DefensiveSet,
    DefensiveTrigger,
    defensive_set,
    label_map,
    least_suspicious,
    pdb_loss,
    rotate,
    validate_defensive,
    validate_ratio,
)
from ..stages.recipes import QUICK_PLAIN
from ..training import TrainConfig
from .base import Defense, DefenseResult, UsesDetector, register_defense

#: the shared pieces, importable from here as before
__all__ = ["PDB", "DefensiveAugment", "DefensiveSet", "DefensiveTrigger", "PDBIso", "defensive_set", "label_map",
           "least_suspicious", "pdb_loss", "rotate"]

log = logging.getLogger("antibackdoor")


# -- the two defenses ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PDBCore:
    """What both forms share: the training, the defensive backdoor and its augmentation."""

    train: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=100, batch_size=256, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine",
        crop=4, flip=True), doc="the one training, from scratch, on the data plus the defensive copies (crop/flip "
                                "apply to the data's samples)")
    frequency: int = param(5, doc="copies of every defensive sample in each epoch (the authors' sample_frequency)")
    shift: int = param(1, doc="the label map h(y) = (y + shift) mod K, undone at inference")
    trigger: DefensiveTrigger = param(factory=DefensiveTrigger, doc="the defensive trigger")
    augment: DefensiveAugment = param(factory=DefensiveAugment, doc="augmentation of the defensive copies, after "
                                                                    "stamping")

    def validate(self, where: str) -> None:
        validate_defensive(where, self.frequency, self.shift)


@dataclass(frozen=True)
class PDBParams(PDBCore):
    trusted_fraction: float = param(0.1, doc="share of the clean training data reserved as trusted: the defensive "
                                             "pool (the authors' ratio)")

    def validate(self, where: str) -> None:
        super().validate(where)
        if not 0 < self.trusted_fraction < 1:
            raise ConfigError(f"{key_path(where, 'trusted_fraction')}: {self.trusted_fraction} must be in (0, 1)")


@dataclass(frozen=True)
class PDBIsoParams(PDBCore):
    ratio: float = param(0.1, doc="size of the defensive pool as a share of the training data (the authors' "
                                  "ratio), the same number from every class")
    detector: str = param("aibd-flip", doc="the detector whose least suspicious samples form the pool "
                                           "(antibackdoor detectors lists them)")
    detector_params: dict[str, Any] = param(factory=dict, doc="overrides of the detector's preset (same preset as "
                                                              "the run)")
    agree: bool = param(True, doc="only samples the detector's suspect model predicts with their given label may "
                                  "join the pool (model-based detectors)")

    def validate(self, where: str) -> None:
        super().validate(where)
        validate_ratio(where, self.ratio)
        if not isinstance(self.detector_params, dict):
            raise ConfigError(f"{key_path(where, 'detector_params')}: expected a mapping, got "
                              f"{self.detector_params!r}")


#: quick: `none`'s recipe (Adam 2e-3, 25 epochs, cosine, crop without flip) for the data's samples; the defensive
#: copies keep the authors' augmentation (their flip included: it is part of how the defensive backdoor is taught)
QUICK_TRAIN = QUICK_PLAIN


class _PDBBase(Defense):
    """The training and the wrapper both forms share; subclasses choose the pool."""

    def check_data(self, data: ImageSet) -> None:
        """The checks that need the data: the trigger leaves part of the image uncovered, h moves every class
        (``run`` and ``defend`` call this before the run directory exists; ``run`` below again, for direct
        callers)."""
        p = self.params
        p.trigger.check_fits(data.x.shape[2], data.x.shape[3], f"{self.option} trigger")
        if p.shift % data.num_classes == 0:
            raise ConfigError(f"{key_path(self.option, 'shift')}: {p.shift} is a multiple of the {data.num_classes} "
                              "classes, so h(y) = y: the label map must move every class")

    def train_defended(self, data: ImageSet, pool: ImageSet, ctx: DefenseContext, cfg: TrainConfig | None = None,
                       stage: str = "pdb", seed_offset: int | str = "pdb",
                       model: nn.Module | None = None) -> tuple[nn.Module, dict]:
        """Train on ``data`` plus the defensive copies of ``pool`` with ``cfg`` (default the ``train`` parameter);
        return the wrapped (deployed) model and the stage's history; ``model`` given, training continues from it
        instead of a fresh one. A ``cfg`` with an adversary trains
        adversarially, the defensive rows' trigger left untouched by the adversary (``pdb_loss``)."""
        p = self.params
        cfg = p.train if cfg is None else cfg
        ds = defensive_set(data, pool, p.frequency, p.shift, p.trigger)
        log.info("%s: training on %d samples + %d defensive copies (%d pool samples x %d), h(y) = (y + %d) mod %d%s",
                 self.name, ds.plain, len(ds.data) - ds.plain, len(pool), p.frequency, p.shift, data.num_classes,
                 ", adversarially" if cfg.adversary is not None else "")
        loss = pdb_loss(ds, p.augment, cfg.adversary)
        net, hist = train_stage(ctx, ds.data, replace(cfg, adversary=None), stage, seed_offset=seed_offset,
                                loss_fn=loss, model=model)
        _, c, height, width = data.x.shape
        wrapped = StampAndRelabel(net, p.trigger.pattern(c, height, width), p.trigger.mask(height, width),
                                  label_map(data.num_classes, p.shift)).to(ctx.device)
        ctx.note_trained(wrapped, ctx.is_trained(net))
        return wrapped, hist

    def draw_pool(self, data: ImageSet, suspicion: torch.Tensor, eligible: torch.Tensor,
                  per_class: int) -> tuple[torch.Tensor, ImageSet]:
        """The defensive pool: in every class the ``per_class`` eligible samples of lowest ``suspicion``
        (``least_suspicious``), as a mask and as data; a warning names the classes with fewer eligible ones."""
        chosen = least_suspicious(suspicion, data.y, eligible, per_class, data.num_classes)
        pool = data.subset(chosen)
        short = [data.classes[c] for c, n in enumerate(pool.class_counts().tolist()) if n < per_class]
        if short:
            log.warning("%s: fewer than %d eligible samples in class(es) %s", self.name, per_class, ", ".join(short))
        return chosen, pool

    def describe_pool(self, pool: ImageSet, num_classes: int) -> dict[str, Any]:
        p = self.params
        return {"pool": len(pool), "pool_per_class": pool.class_counts().tolist(), "frequency": p.frequency,
                "shift": p.shift, "label_map": label_map(num_classes, p.shift), "trigger": p.trigger.shape,
                "trigger_size": p.trigger.size, "trigger_value": p.trigger.value}


@register_defense
class PDB(_PDBBase):
    name = "pdb"
    label = "PDB (trusted)"
    description = "PDB: plant a defensive backdoor from trusted clean data, stamp it at inference and undo its labels"
    Params = PDBParams
    needs_trusted = True
    assumptions = (
        "A small set of clean, correctly labelled training data is available (the trusted data): the defensive "
        "backdoor is taught on it, and poison in it would carry the attacker's backdoor through the defense.",
        "Nothing is known about the trigger or the target; the defensive trigger (a patch of a pixel value no "
        "image holds) is learned more strongly than the attacker's, and at inference it overrides it.",
        "Every prediction of the returned model stamps the defensive trigger on the input and maps the answer "
        "back: the model is only defended when used as returned (antibackdoor.load_model does so).",
    )
    presets = {
        "paper": PDBParams(),
        "quick": PDBParams(train=QUICK_TRAIN),
    }

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        self.check_data(data)
        trusted = self.require_trusted(ctx).to(data.x.device)
        log.info("PDB: defensive pool = the %d trusted samples; they join the training data too", len(trusted))
        plain = replace(data, x=torch.cat([data.x, trusted.x]), y=torch.cat([data.y, trusted.y.to(data.y.device)]))
        model, hist = self.train_defended(plain, trusted, ctx)
        info = {"trusted": len(trusted), **self.describe_pool(trusted, data.num_classes)}
        return DefenseResult(model, info=info, history={"pdb": hist})


@register_defense
class PDBIso(UsesDetector, _PDBBase):
    name = "pdb-iso"
    label = "PDB-iso (no clean data)"
    paper_settings_of = "pdb"
    description = ("PDB without clean data: the defensive pool is the samples a detector trusts most, then PDB's "
                   "training and inference")
    Params = PDBIsoParams
    assumptions = (
        "No clean data is needed: the defensive backdoor is taught on the ratio share of the training data (the "
        "same number from every class) that the detector finds least suspicious among the samples its suspect "
        "model predicts with their given label.",
        "That share holds (almost) no poison: a poisoned sample in it teaches the defensive trigger together with "
        "the attacker's, and the attacker's backdoor then survives the defense. Triggers the detector cannot rank "
        "(blended or warping ones) put this at risk.",
        "Every prediction of the returned model stamps the defensive trigger on the input and maps the answer "
        "back: the model is only defended when used as returned (antibackdoor.load_model does so).",
    )
    presets = {
        "paper": PDBIsoParams(),
        "quick": PDBIsoParams(train=QUICK_TRAIN),
    }

    def per_class(self, data: ImageSet) -> int:
        """int(N x ratio / K), the authors' count of defensive samples a class; ConfigError where it is 0."""
        p = self.params
        n = int(len(data) * p.ratio / data.num_classes)
        if n < 1:
            raise ConfigError(f"{key_path(self.option, 'ratio')}: {p.ratio} of {len(data)} samples leaves no "
                              f"defensive sample for any of the {data.num_classes} classes")
        return n

    def check_data(self, data: ImageSet) -> None:
        super().check_data(data)
        self.per_class(data)

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        p = self.params
        self.check_data(data)
        log.info("PDB-iso: scoring every sample with %s", p.detector)
        det = self.detector.score(data, ctx)
        eligible = torch.ones(len(data), dtype=torch.bool)
        if p.agree and det.model is not None:
            eligible = agrees_with_label(det.model, data, ctx)
        elif p.agree:
            log.warning("PDB-iso: %s trains no suspect model, so agree has nothing to filter with", p.detector)
        per_class = self.per_class(data)
        chosen, pool = self.draw_pool(data, det.suspicion(), eligible, per_class)
        log.info("PDB-iso: defensive pool = %d samples (%d a class), %d eligible", len(pool), per_class,
                 int(eligible.sum()))
        model, hist = self.train_defended(data, pool, ctx)
        info = {"detector": p.detector, "agree": p.agree, "eligible": int(eligible.sum()),
                **{f"detector_{k}": v for k, v in det.info.items()}, **self.describe_pool(pool, data.num_classes)}
        return DefenseResult(model, scores=det.scores, score_name=det.score_name,
                             higher_is_suspicious=det.higher_is_suspicious, info=info, history={"pdb": hist},
                             sample_stats={"defensive": chosen, "agrees": eligible.cpu().bool()})
