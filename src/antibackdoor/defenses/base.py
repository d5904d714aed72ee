"""The defense interface and registry.

A defense gets the (possibly poisoned) training images and their observed labels — never the poison
mask — and returns a model plus whatever it learned about the samples (scores, which it kept, new labels).
Hyper-parameters live in a frozen dataclass per defense, with one instance per preset (`quick`, `paper`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import merge, to_dict
from ..data.imageset import ImageSet, PaperSettings, with_paper_settings
from ..errors import ConfigError
from ..precision import Precision, as_precision
from ..seeding import seeded_rng

log = logging.getLogger("antibackdoor")

ModelFactory = Callable[[], nn.Module]


@dataclass
class DefenseContext:
    """What a defense may use besides the data: how to build a fresh model, where to checkpoint, etc."""

    model_factory: ModelFactory
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    workdir: Path | None = None  # checkpoints and stage outputs; None = no checkpoints
    resume: bool = False
    #: trained stage models shared between runs (bench.stage_cache.StageCache); consulted by train_stage
    stage_cache: Any = None
    #: the precision every stage computes in (None: the active one, see ``precision.py``)
    precision: Precision | None = None
    #: a small set of clean data the defender trusts: the slice ``run`` reserves before poisoning for defenses
    #: that declare ``needs_trusted`` (it holds no poison and is not part of the training data), or the set
    #: the user vouches for (``defend --trusted``); None when there is none
    trusted: ImageSet | None = None

    #: ids of models that ``train_stage`` handed out freshly initialised and never trained (0 epochs)
    _untrained: set[int] = field(default_factory=set, init=False, repr=False)

    def compute_precision(self) -> Precision:
        """The resolved precision of this defense's training and scoring."""
        return as_precision(self.precision, self.device)

    def note_trained(self, model: nn.Module, trained: bool) -> None:
        """Record whether a stage trained ``model`` (``train_stage`` calls this)."""
        if trained:
            self._untrained.discard(id(model))
        else:
            self._untrained.add(id(model))

    def is_trained(self, model: nn.Module) -> bool:
        """False for a model no stage trained: a split-only run (final epochs 0) returns its freshly
        initialised final model, whose ACC/ASR/RA would describe random weights, so the run reports none."""
        return id(model) not in self._untrained

    def checkpoint(self, stage: str) -> Path | None:
        return None if self.workdir is None else self.workdir / f"{stage}.ckpt"

    def fresh_model(self, offset: int | str = 0) -> nn.Module:
        """A newly initialised model, seeded by ``derive_seed(seed, "model", offset)`` so that reruns and
        resumes start from the same weights, different offsets (and seeds) from different ones; built under a
        forked RNG, so the caller's global random state is left as it was."""
        with seeded_rng(self.seed, "model", offset):
            model = self.model_factory()
        return model.to(self.device)


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

    def flags(self, n: int) -> dict[str, torch.Tensor]:
        """The boolean per-sample statistics over ``n`` samples (A-ABL's ``taken_back``, ``purged``), on the CPU:
        what the run records per sample (isolation.csv, suspicious.csv) and counts against the poison."""
        return sample_flags(self.sample_stats, n)


def sample_flags(stats: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The entries of a defense's ``sample_stats`` that are one boolean per sample (of ``n``), on the CPU."""
    return {name: v.cpu() for name, v in stats.items() if v.dtype == torch.bool and tuple(v.shape) == (n,)}


class Defense:
    """Subclasses set ``name``, ``Params`` (a frozen dataclass, which may define ``validate()``) and
    ``presets`` (``quick`` and ``paper``), and implement ``run``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type]
    presets: ClassVar[dict[str, Any]] = {}
    #: what the defense takes for granted about the data and the attack, in a user's words (``defend``'s
    #: report lists them, so a practitioner can judge whether they hold for their data)
    assumptions: ClassVar[tuple[str, ...]] = ()
    #: whether the defense reads ``DefenseContext.trusted`` (``uses_trusted``) or refuses to run without it
    #: (``needs_trusted``: ``run`` reserves a slice of the training data whose size is the fraction in its
    #: ``trusted_fraction`` parameter); ``defend`` evaluates on trusted data only when the defense does not use it
    uses_trusted: ClassVar[bool] = False
    needs_trusted: ClassVar[bool] = False
    #: the defense whose per-dataset paper settings (``PaperSettings.defense_params``) this one takes, for a
    #: variant of a paper's defense (``a-abl+``: those of ``a-abl``); empty: its own name
    paper_settings_of: ClassVar[str] = ""

    def __init__(self, preset: str = "quick", overrides: dict[str, Any] | None = None, params: Any = None):
        if params is None:
            if preset not in self.presets:
                raise ConfigError(f"--preset: {preset!r} unknown for defense {self.name}; known: "
                                  f"{', '.join(self.presets)}")
            params = merge(self.presets[preset], overrides or {}, f"defense_params ({self.name})")
        self.params = params
        self.validate_params()

    def validate_params(self) -> None:
        """Reject out-of-range values at construction, before a run directory exists, with an error naming
        the key: every TrainConfig field is checked, then the Params' own ``validate()`` if it has one."""
        from ..training import TrainConfig

        if dataclasses.is_dataclass(self.params):
            for f in dataclasses.fields(self.params):
                value = getattr(self.params, f.name)
                if isinstance(value, TrainConfig):
                    value.validate(f"{self.name}.{f.name}")
        validate = getattr(self.params, "validate", None)
        if validate is not None:
            validate()

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        raise NotImplementedError

    @property
    def paper_source(self) -> str:
        """The defense whose paper model on a dataset (``PaperSettings.model_for``) this one trains under
        ``--preset paper``: the one it takes its settings from."""
        return self.paper_settings_of or self.name

    def apply_paper_settings(self, paper: PaperSettings) -> None:
        """Hand the dataset's paper settings to the registered parts this defense builds (isolate-then-train:
        its detector). Its own parameters got theirs before it was built (``get_defense``); nothing here."""

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

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **to_dict(self.params)}


DEFENSES: dict[str, type[Defense]] = {}


def register_defense(cls: type[Defense]) -> type[Defense]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    DEFENSES[cls.name] = cls
    return cls


def get_defense(name: str, preset: str = "quick", overrides: dict[str, Any] | None = None,
                paper: PaperSettings | None = None) -> Defense:
    """The defense with its preset, then the dataset's paper settings for it (``paper`` given: ``--preset
    paper`` only; they reach the parts it builds too), then ``overrides`` (the user's)."""
    cls = DEFENSES.get(name)
    if cls is None:
        raise ConfigError(f"--defense: unknown defense {name!r}; known: {', '.join(sorted(DEFENSES))}")
    defense = cls(preset, with_paper_settings(cls, overrides, paper))
    if paper is not None:
        defense.apply_paper_settings(paper)
    return defense
