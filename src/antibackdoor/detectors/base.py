"""The detector interface and registry: score every training sample, then propose an isolation.

A detector sees what a defense sees (the possibly poisoned images and their observed labels, never the poison
mask) and returns one continuous score per sample plus the set it proposes to isolate. Scores are continuous so
that any threshold rule and a ROC curve apply; the isolation is the detector's own rule (its paper's decision,
e.g. activation clustering's small cluster) or a generic one (Otsu, top fraction, fixed threshold).

Detectors that need a model trained on the data (a "suspect" model) train it through the same DefenseContext
and model factory as defenses, with the recipe in their ``model`` parameter, or take one that the caller
already trained (benchmarks train one per attack and score it with every detector).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..config import key_path, param
from ..data.imageset import ImageSet, PaperSettings
from ..errors import ConfigError
from ..metrics import suspicion
from ..parts import Part
from ..registry import Registry
from ..stages import DefenseContext, otsu_threshold, top_fraction, train_stage
from ..stages.recipes import PAPER_SUSPECT, QUICK_SUSPECT

log = logging.getLogger("antibackdoor")

RuleKind = Literal["native", "otsu", "top", "threshold"]
RULES: tuple[str, ...] = RuleKind.__args__

#: the suspect-model recipes (``stages.recipes``) are A-ABL's naive stage, so that a detector and A-ABL given the
#: same context train the same model
__all__ = ["PAPER_SUSPECT", "QUICK_SUSPECT"]


def suspect_param(preset: str = "quick") -> Any:
    """The ``model`` field of a model-based detector's Params (the suspect model's training recipe)."""
    recipe = QUICK_SUSPECT if preset == "quick" else PAPER_SUSPECT
    return param(factory=lambda: recipe, doc="training recipe of the suspect model (A-ABL's naive stage)")


@dataclass(frozen=True)
class IsolationRule:
    """How scores become an isolated set.

    ``native``: the detector's own decision (its paper's rule); ``otsu``: Otsu's threshold on the scores;
    ``top``: the ``value`` fraction of most suspicious samples; ``threshold``: scores at or beyond ``value``
    (on the suspicious side).
    """

    kind: RuleKind = param("native", doc="native (the detector's own rule), otsu, top (fraction) or threshold")
    value: float = param(0.0, doc="the fraction for top, the score for threshold")

    def validate(self, where: str) -> None:
        if self.kind == "top" and not 0.0 <= self.value <= 1.0:
            raise ConfigError(f"{key_path(where, 'value')}: {self.value} must be a fraction in [0, 1] for 'top'")


def rule_param(kind: str = "native", value: float = 0.0) -> Any:
    """The ``rule`` field of a detector's Params, defaulting to ``IsolationRule(kind, value)``."""
    return param(factory=lambda: IsolationRule(kind, value), doc="how the scores become an isolated set")


@dataclass
class DetectionResult:
    """Per-sample scores and the proposed isolation (``isolated``: True = suspected poisoned)."""

    scores: torch.Tensor  # float64, N
    higher_is_suspicious: bool
    isolated: torch.Tensor  # bool, N
    score_name: str = ""
    #: labels the detector proposes for isolated samples (AIBD: the adversarial label; -1 = none)
    labels: torch.Tensor | None = None
    #: the suspect model the scores came from (None for model-free detectors)
    model: nn.Module | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> torch.Tensor:
        return ~self.isolated

    def suspicion(self) -> torch.Tensor:
        """Scores oriented so that higher always means more suspicious (for ROC curves and top-q rules)."""
        return suspicion(self.scores, self.higher_is_suspicious)


def apply_rule(scores: torch.Tensor, higher_is_suspicious: bool, rule: IsolationRule,
               native: torch.Tensor | None = None) -> tuple[torch.Tensor, float | None]:
    """The isolated mask of ``rule`` and the threshold it used (None for a native or top rule)."""
    s = scores.double().cpu()
    if rule.kind == "native":
        if native is None:
            raise ConfigError("rule 'native': this detector has no rule of its own; use otsu, top or threshold")
        return native.bool().cpu().clone(), None
    if rule.kind == "otsu":
        t = otsu_threshold(s)
        return (s > t if higher_is_suspicious else s <= t), t
    if rule.kind == "threshold":
        t = float(rule.value)
        return (s >= t if higher_is_suspicious else s <= t), t
    if rule.kind == "top":
        return top_fraction(suspicion(s, higher_is_suspicious), rule.value), None
    raise ConfigError(f"rule: {rule.kind!r} is not one of {', '.join(RULES)}")


@dataclass
class Scored:
    """What a detector's scorer returns: one score per sample, its own isolation (None for a detector without a
    rule of its own), the labels it proposes for isolated samples (None: none; -1 for a sample without one, e.g.
    AIBD's adversarial label of a sample that never flipped) and facts for the record."""

    scores: torch.Tensor
    native: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Detector(Part):
    """Subclasses set ``name``, ``Params`` (a frozen dataclass, with ``rule`` and, if they need a model,
    ``model``), ``presets``, ``needs_model``, and implement ``_score``."""

    kind = "detector"
    #: a detector's parameters are set through the defense that composes it (``isolate-then-train``, ``defend
    #: --detector``): errors name the key as the user types it
    option = "--defense-param detector_params"
    needs_model: ClassVar[bool] = True
    #: whether the detector has a decision of its own (rule ``native``): its paper's rule
    has_native_rule: ClassVar[bool] = False
    higher_is_suspicious: ClassVar[bool] = True
    score_name: ClassVar[str] = "score"
    #: which of its defense's parameters (``paper_settings_of``) the detector takes, renamed to its own
    #: (``PaperSettings.params_for``); the others (its training recipes) do not concern the detector
    paper_param_names: ClassVar[dict[str, str]] = {}

    def check_params(self) -> None:
        super().check_params()
        if self.params.rule.kind == "native" and not self.has_native_rule:
            raise ConfigError(f"{self.option}.rule.kind: {self.name} has no rule of its own; use otsu, top or "
                              "threshold")

    # -- to implement -----------------------------------------------------------------------------
    def _score(self, data: ImageSet, ctx: DefenseContext, model: nn.Module | None) -> Scored:
        """Per-sample scores, the native isolation (None if the detector has no rule of its own), proposed
        labels and info."""
        raise NotImplementedError

    # -- shared behaviour -------------------------------------------------------------------------
    def suspect_model(self, data: ImageSet, ctx: DefenseContext, stage: str = "naive") -> nn.Module:
        """Train the suspect model of ``params.model`` on all of ``data`` (seed offset 0, like A-ABL's naive
        stage, so that a detector and A-ABL given the same context train the same model)."""
        log.info("%s: training the suspect model on all %d samples", self.name, len(data))
        model, _ = train_stage(ctx, data, self.params.model, stage)
        return model

    def score(self, data: ImageSet, ctx: DefenseContext, model: nn.Module | None = None) -> DetectionResult:
        """Score every sample of ``data`` (training a suspect model first when one is needed and not given)."""
        if self.needs_model and model is None:
            model = self.suspect_model(data, ctx)
        found = self._score(data, ctx, model)
        scores = found.scores.double().cpu()
        isolated, threshold = apply_rule(scores, self.higher_is_suspicious, self.params.rule, found.native)
        info = {"rule": self.params.rule.kind, "threshold": threshold, "isolated": int(isolated.sum()),
                "kept": int((~isolated).sum()), **found.info}
        log.info("%s: %s rule isolated %d of %d samples", self.name, self.params.rule.kind, int(isolated.sum()),
                 len(scores))
        return DetectionResult(scores, self.higher_is_suspicious, isolated, self.score_name, found.labels,
                               model if self.needs_model else None, info)


DETECTORS: Registry[type[Detector]] = Registry("detector", "detector")
register_detector = DETECTORS.register


def get_detector(name: str, preset: str = "quick", overrides: dict[str, Any] | None = None,
                 paper: PaperSettings | None = None) -> Detector:
    """The detector with its preset, then the dataset's paper settings for its defense (``paper`` given:
    ``--preset paper`` only, see ``Part.paper_settings_of``), then ``overrides`` (the user's)."""
    return DETECTORS.lookup(name).create(preset, overrides, paper)
