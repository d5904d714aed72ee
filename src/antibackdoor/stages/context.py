"""What a defense or a detector may use besides the data: how to build a fresh model, the device, the seed,
where to checkpoint, the precision, the stage cache and (for some defenses) trusted clean data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.imageset import ImageSet
from ..precision import Precision, as_precision
from ..seeding import seeded_rng

ModelFactory = Callable[[], nn.Module]


@dataclass
class DefenseContext:
    """Everything a stage needs that is not the data (one per run; detectors and defenses share it)."""

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
