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

from ..config import merge, param, to_dict
from ..data.imageset import ImageSet, PaperSettings, with_paper_settings
from ..defenses.a_abl import AABL
from ..defenses.base import DefenseContext
from ..errors import ConfigError

log = logging.getLogger("antibackdoor")

RuleKind = Literal["native", "otsu", "top", "threshold"]
RULES: tuple[str, ...] = RuleKind.__args__

#: the suspect-model recipes shared by the model-based detectors: A-ABL's naive stage (quick: 40 epochs of
#: AdamW with crop, no flip, which learns patch backdoors firmly on the mini CIFAR-10; paper: 20 epochs), so
#: that a detector and A-ABL given the same context train the same model
QUICK_SUSPECT = AABL.presets["quick"].naive
PAPER_SUSPECT = AABL.presets["paper"].naive


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
            raise ConfigError(f"{where}.rule.value: {self.value} must be a fraction in [0, 1] for 'top'")


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
        s = self.scores.double()
        return s if self.higher_is_suspicious else -s


def apply_rule(scores: torch.Tensor, higher_is_suspicious: bool, rule: IsolationRule,
               native: torch.Tensor | None = None) -> tuple[torch.Tensor, float | None]:
    """The isolated mask of ``rule`` and the threshold it used (None for a native or top rule)."""
    from ..defenses.stages import otsu_threshold

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
        count = int(round(rule.value * len(s)))
        order = torch.sort(s if higher_is_suspicious else -s, descending=True, stable=True).indices
        mask = torch.zeros(len(s), dtype=torch.bool)
        mask[order[:count]] = True
        return mask, None
    raise ConfigError(f"rule: {rule.kind!r} is not one of {', '.join(RULES)}")


class Detector:
    """Subclasses set ``name``, ``Params`` (a frozen dataclass, with ``rule`` and, if they need a model,
    ``model``), ``presets``, ``needs_model``, and implement ``_score``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type]
    presets: ClassVar[dict[str, Any]] = {}
    needs_model: ClassVar[bool] = True
    #: whether the detector has a decision of its own (rule ``native``): its paper's rule
    has_native_rule: ClassVar[bool] = False
    higher_is_suspicious: ClassVar[bool] = True
    score_name: ClassVar[str] = "score"
    #: the defense whose scorer this detector is: under ``--preset paper`` the dataset's paper settings for
    #: that defense (``PaperSettings.defense_params``) reach the detector as they reach the defense, so both
    #: split alike (and isolate-then-train trains that defense's paper model); empty: none
    paper_settings_of: ClassVar[str] = ""
    #: which of that defense's parameters the detector takes, renamed to its own (``PaperSettings.params_for``);
    #: the others (its training recipes) do not concern the detector
    paper_param_names: ClassVar[dict[str, str]] = {}

    def __init__(self, preset: str = "quick", overrides: dict[str, Any] | None = None, params: Any = None):
        if params is None:
            if preset not in self.presets:
                raise ConfigError(f"--preset: {preset!r} unknown for detector {self.name}; known: "
                                  f"{', '.join(self.presets)}")
            params = merge(self.presets[preset], overrides or {}, f"detector_params ({self.name})")
        params.rule.validate(f"detector_params ({self.name})")
        if params.rule.kind == "native" and not self.has_native_rule:
            raise ConfigError(f"detector_params ({self.name}).rule.kind: {self.name} has no rule of its own; "
                              "use otsu, top or threshold")
        validate = getattr(params, "validate", None)
        if validate is not None:
            validate()
        self.params = params

    # -- to implement -----------------------------------------------------------------------------
    def _score(self, data: ImageSet, ctx: DefenseContext,
               model: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """Per-sample scores, the native isolation (None if the detector has no rule of its own) and info.

        Subclasses may also set ``self._labels`` (proposed labels for isolated samples)."""
        raise NotImplementedError

    # -- shared behaviour -------------------------------------------------------------------------
    def suspect_model(self, data: ImageSet, ctx: DefenseContext, stage: str = "naive") -> nn.Module:
        """Train the suspect model of ``params.model`` on all of ``data`` (seed offset 0, like A-ABL's naive
        stage, so that a detector and A-ABL given the same context train the same model)."""
        from ..defenses.stages import train_stage

        log.info("%s: training the suspect model on all %d samples", self.name, len(data))
        model, _ = train_stage(ctx, data, self.params.model, stage)
        return model

    def score(self, data: ImageSet, ctx: DefenseContext, model: nn.Module | None = None) -> DetectionResult:
        """Score every sample of ``data`` (training a suspect model first when one is needed and not given)."""
        if self.needs_model and model is None:
            model = self.suspect_model(data, ctx)
        self._labels = None
        scores, native, info = self._score(data, ctx, model)
        scores = scores.double().cpu()
        isolated, threshold = apply_rule(scores, self.higher_is_suspicious, self.params.rule, native)
        info = {"rule": self.params.rule.kind, "threshold": threshold, "isolated": int(isolated.sum()),
                "kept": int((~isolated).sum()), **info}
        log.info("%s: %s rule isolated %d of %d samples", self.name, self.params.rule.kind, int(isolated.sum()),
                 len(scores))
        return DetectionResult(scores, self.higher_is_suspicious, isolated, self.score_name, self._labels,
                               model if self.needs_model else None, info)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **to_dict(self.params)}


DETECTORS: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    DETECTORS[cls.name] = cls
    return cls


def get_detector(name: str, preset: str = "quick", overrides: dict[str, Any] | None = None,
                 paper: PaperSettings | None = None) -> Detector:
    """The detector with its preset, then the dataset's paper settings for its defense (``paper`` given:
    ``--preset paper`` only, see ``Detector.paper_settings_of``), then ``overrides`` (the user's)."""
    cls = DETECTORS.get(name)
    if cls is None:
        raise ConfigError(f"detector: unknown detector {name!r}; known: {', '.join(sorted(DETECTORS))}")
    return cls(preset, with_paper_settings(cls, overrides, paper))
