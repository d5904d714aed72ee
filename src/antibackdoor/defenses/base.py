"""The defense interface and registry.

A defense gets the (possibly poisoned) training images and their observed labels — never the poison
mask — and returns a model plus whatever it learned about the samples (scores, which it kept, new labels).
Hyper-parameters live in a frozen dataclass per defense, with one instance per preset (`quick`, `paper`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..data.imageset import ImageSet, PaperSettings
from ..detectors import Detector, get_detector
from ..errors import ConfigError
from ..metrics import suspicion
from ..parts import Part
from ..registry import Registry
from ..stages.context import DefenseContext
from ..training import TrainConfig

log = logging.getLogger("antibackdoor")

#: a forward pass alone (no gradient: scoring, label guessing, attention maps), in sample passes: about a third of
#: a forward + backward pass
FORWARD_PASS = 1.0 / 3.0


def train_passes(cfg: TrainConfig, n: float) -> float:
    """Sample passes of ``cfg`` on ``n`` images as the bench's estimate counts every TrainConfig of a defense's
    ``describe()``: epochs x images x (1 + PGD steps). A defense's ``extra_passes`` subtracts it for a
    TrainConfig whose real work differs."""
    steps = cfg.adversary.steps if cfg.adversary is not None else 0
    return float(cfg.epochs) * n * (1 + steps)


@dataclass
class DefenseResult:
    model: nn.Module
    #: False for samples the defense isolated as suspicious (None: none isolated); AIBD still trains on its
    #: isolated samples with new labels, so this is not 'trained on'
    kept: torch.Tensor | None = None
    #: one number per training sample; see score_name and higher_is_suspicious
    scores: torch.Tensor | None = None
    score_name: str = ""
    higher_is_suspicious: bool = True
    #: labels the final model was trained with, where the defense changed any (None: unchanged)
    new_labels: torch.Tensor | None = None
    #: JSON-serialisable facts about the run (thresholds, chosen q, ...)
    info: dict[str, Any] = field(default_factory=dict)
    #: per-stage training histories
    history: dict[str, list[dict]] = field(default_factory=dict)
    #: per-sample statistics the defense measured (one tensor of N values each, e.g. AIBD's flip counts), for
    #: its figures and for analysis; like ``scores``, they describe the run, not the defense object
    sample_stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def isolated(self) -> torch.Tensor | None:
        return None if self.kept is None else ~self.kept

    def suspicion(self) -> torch.Tensor | None:
        """The scores oriented so that higher means more suspicious (``metrics.suspicion``); None without."""
        return None if self.scores is None else suspicion(self.scores, self.higher_is_suspicious)

    def flags(self, n: int) -> dict[str, torch.Tensor]:
        """The boolean per-sample statistics over ``n`` samples (A-ABL's ``taken_back``, ``purged``), on the CPU:
        what the run records per sample (isolation.csv, suspicious.csv) and counts against the poison."""
        return sample_flags(self.sample_stats, n)


def sample_flags(stats: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The entries of a defense's ``sample_stats`` that are one boolean per sample (of ``n``), on the CPU."""
    return {name: v.cpu() for name, v in stats.items() if v.dtype == torch.bool and tuple(v.shape) == (n,)}


class Defense(Part):
    """Subclasses set ``name``, ``description``, ``Params`` (a frozen dataclass, which may define
    ``validate(where)``) and ``presets`` (``quick`` and ``paper``), and implement ``run``."""

    kind = "defense"
    option = "--defense-param"
    #: what the defense takes for granted about the data and the attack, in a user's words (``defend``'s
    #: report lists them, so a practitioner can judge whether they hold for their data)
    assumptions: ClassVar[tuple[str, ...]] = ()
    #: whether the defense reads ``DefenseContext.trusted`` (``uses_trusted``) or refuses to run without it
    #: (``needs_trusted``: ``run`` reserves a slice of the training data whose size is the fraction in its
    #: ``trusted_fraction`` parameter); ``defend`` evaluates on trusted data only when the defense does not use it
    uses_trusted: ClassVar[bool] = False
    needs_trusted: ClassVar[bool] = False
    #: the TrainConfigs of ``describe()`` (by key) that ``run`` trains through the stage cache from a fresh model
    #: with seed offset 0, each mapped to the data it trains on ("all": every training sample as given; another
    #: name: a subset chosen the same way in every cell of the same data): cells of the same poisoned data with the
    #: same such config train it once, and the bench's time estimate counts it once. None by default.
    cached_stages: ClassVar[dict[str, str]] = {}

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        raise NotImplementedError

    def extra_passes(self, n_train: int) -> float:
        """Work ``run`` does on ``n_train`` training images beyond what the bench's time estimate counts from the
        TrainConfigs in ``describe()`` (``train_passes`` of each), in *sample passes*: one forward + backward pass
        of one training image; a forward pass alone counts ``FORWARD_PASS``. A defense whose loops differ from
        its TrainConfigs (semi-supervised steps over several views, scoring every epoch) returns the difference
        here, so the estimate need not know any defense; it may be negative. None beyond them by default."""
        return 0.0

    def check_data(self, data: ImageSet) -> None:
        """ConfigError where the parameters cannot work on ``data`` (its image size, its number of classes):
        ``run`` and ``defend`` call it once the data are known, before the run directory exists, so such a
        setting stops with one line instead of failing inside the run. Nothing to check by default."""

    @property
    def paper_source(self) -> str:
        """The defense whose paper model on a dataset (``PaperSettings.model_for``) this one trains under
        ``--preset paper``: the one it takes its settings from."""
        return self.paper_settings_of or self.name

    def trusted_fraction(self) -> float | None:
        """The share of the training data to reserve as trusted clean data (None: the defense needs none)."""
        if not self.needs_trusted:
            return None
        fraction = float(self.params.trusted_fraction)
        if not 0 < fraction < 1:
            raise ConfigError(f"{self.name}.trusted_fraction: {fraction} must be in (0, 1)")
        return fraction

    def require_trusted(self, ctx: DefenseContext) -> ImageSet:
        """The trusted slice, or a clear error when the caller did not provide one."""
        if ctx.trusted is None or len(ctx.trusted) == 0:
            raise ConfigError(f"defense {self.name}: needs a trusted slice of clean training data "
                              "(DefenseContext.trusted); run_experiment reserves one, direct callers must pass it")
        return ctx.trusted

    def write_plots(self, result: DefenseResult, poison_mask: torch.Tensor, run_dir: Path,
                    true_labels: torch.Tensor | None = None) -> list[Path]:
        """Defense-specific figures for the run directory, drawn from ``result`` alone (the runner passes the
        ground truth, which the defense never saw)."""
        return []


DEFENSES: Registry[type[Defense]] = Registry("defense", "--defense")
register_defense = DEFENSES.register



class UsesDetector:
    """Mixed into a defense whose params name a detector (``detector``, ``detector_params``): the detector is
    built, and so checked, when the defense is (a bad detector setting stops the run before its directory
    exists); the dataset's paper settings for the detector's defense reach it below the user's
    ``detector_params``; ``describe`` holds the resolved detector. List it before the ``Defense`` base."""

    detector: Detector
    #: the detector's suspect model (``Detector.suspect_model``: all the data, seed offset 0)
    cached_stages: ClassVar[dict[str, str]] = {"model": "all"}

    def __init__(self, preset: str = "quick", overrides=None, params=None):
        super().__init__(preset, overrides, params)
        self.preset = preset
        self.detector = self._build_detector(None)

    def _build_detector(self, paper: PaperSettings | None) -> Detector:
        return get_detector(self.params.detector, self.preset, self.params.detector_params, paper)

    def apply_paper_settings(self, paper: PaperSettings) -> None:
        """A-ABL's split eps for ``ifgsm-sce``, ...: what the detector's own defense would get from the data set."""
        self.detector = self._build_detector(paper)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["detector_resolved"] = self.detector.describe()
        return d


def get_defense(name: str, preset: str = "quick", overrides: dict[str, Any] | None = None,
                paper: PaperSettings | None = None) -> Defense:
    """The defense with its preset, then the dataset's paper settings for it (``paper`` given: ``--preset
    paper`` only; they reach the parts it builds too), then ``overrides`` (the user's)."""
    return DEFENSES.lookup(name).create(preset, overrides, paper)
