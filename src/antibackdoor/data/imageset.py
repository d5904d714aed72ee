"""In-memory image datasets as uint8 tensors.

Everything downstream (poisoning, training, adversarial scoring) slices these tensors by index; keeping
uint8 on the compute device makes a batch a single gather with no DataLoader, and poisoned images are
quantised exactly as a real poisoned file would be.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..config import deep_update
from ..errors import DataError
from .rules import check_same_images, check_training_labels


@dataclass
class ImageSet:
    """Images ``x`` (uint8, N x C x H x W) with labels ``y`` (int64, N)."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "dataset"

    def __post_init__(self) -> None:
        self.validate()

    # -- shape ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.x.device

    # -- derived sets --------------------------------------------------------------------------
    def subset(self, index: torch.Tensor) -> ImageSet:
        """Rows selected by an index or boolean mask (a copy)."""
        index = index.to(self.x.device)
        return replace(self, x=self.x[index], y=self.y[index])

    def with_labels(self, y: torch.Tensor) -> ImageSet:
        return replace(self, y=y.to(self.y.device, torch.int64))

    def with_images(self, x: torch.Tensor) -> ImageSet:
        return replace(self, x=x)

    def to(self, device: torch.device | str) -> ImageSet:
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def float_images(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images in [0, 1] as float32, optionally for a subset."""
        x = self.x if index is None else self.x[index]
        return x.float().div_(255.0)

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.y.cpu(), minlength=self.num_classes)

    # -- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Reject malformed data with a message that names the problem (the data rules that training data must
        meet as well, every class with a sample and so on, are ``rules.check_training_labels``)."""
        if self.x.dtype != torch.uint8:
            raise DataError(f"{self.name}: images have dtype {self.x.dtype}; expected uint8 (0..255)")
        if self.x.dim() != 4 or self.x.shape[1] not in (1, 3):
            raise DataError(
                f"{self.name}: images have shape {tuple(self.x.shape)}; expected N x C x H x W with C in (1, 3)"
            )
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise DataError(
                f"{self.name}: {self.x.shape[0]} images but labels of shape {tuple(self.y.shape)}"
            )
        if self.y.dtype != torch.int64:
            raise DataError(f"{self.name}: labels have dtype {self.y.dtype}; expected integers")
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
            raise DataError(
                f"{self.name}: labels span {int(self.y.min())}..{int(self.y.max())}, "
                f"outside [0, {self.num_classes})"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(f"{self.name}: normalisation constants for {len(self.mean)} channel(s) (mean) and "
                            f"{len(self.std)} (std), but the images have {self.channels}")


@dataclass(frozen=True)
class PaperSettings:
    """What the papers used on a dataset: facts about the data that the ``paper`` preset applies, and only it
    (``quick`` keeps its CPU model and its presets' values on every dataset).

    ``defense_params`` are keyed by defense name, so a setting reaches only the defense it was meant for, and
    the parts that declare themselves its own (``params_for``): a variant of it (``a-abl+``) or the detector
    that is its scorer (``ifgsm-sce`` takes A-ABL's split settings, ``aibd-flip`` AIBD's flip counting).
    """

    model: str = "resnet18"  # the papers' architecture on this dataset
    models: dict[str, str] = field(default_factory=dict)  # defense name -> model, where a paper used another
    defense_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # defense name -> overrides

    def model_for(self, defense: str) -> str:
        return self.models.get(defense, self.model)

    def params_for(self, part: Any) -> dict[str, Any]:
        """The settings for ``part`` (a defense or detector, class or instance), as overrides of its preset.

        They are those of the defense named by ``part.paper_settings_of`` (empty: ``part.name``). A part with a
        ``paper_param_names`` mapping (the defense's parameter -> the part's, dotted for a nested field; ``*``:
        every other parameter, under that field) takes only the parameters it maps, renamed: a detector shares
        a defense's scoring, not its training.
        """
        source = getattr(part, "paper_settings_of", "") or part.name
        params = copy.deepcopy(self.defense_params.get(source, {}))
        names = getattr(part, "paper_param_names", None)
        if names is None:
            return params
        out: dict[str, Any] = {}
        for key, value in params.items():
            target = names.get(key) or (f"{names['*']}.{key}" if "*" in names else None)
            if target is None:
                continue
            *parents, leaf = target.split(".")
            node = out
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
        return out


def with_paper_settings(part: Any, overrides: dict[str, Any] | None,
                        paper: PaperSettings | None) -> dict[str, Any]:
    """``overrides`` (the user's) on top of the dataset's paper settings for ``part`` (``paper`` given:
    ``--preset paper`` only): the one resolution order of defenses and detectors, preset < data < user."""
    if paper is None:
        return dict(overrides or {})
    return deep_update(paper.params_for(part), overrides or {})


@dataclass
class GroundTruth:
    """What only the evaluation may know about a data set that arrives poisoned (``outside:``): the poison was
    written into the data before the tool saw it, so a run has ``--attack none`` and no attack to ask. The
    runner reads it for TPR/FPR and ASR; a defense never sees it."""

    poison_mask: torch.Tensor  # bool, N over the training set: which samples carry the trigger
    true_labels: torch.Tensor  # int64, N: labels before poisoning
    target: int
    trigger: str
    #: test images whose true class is not the target, with the trigger, labelled with the target (for the ASR)
    triggered_test: ImageSet


@dataclass
class DatasetSplits:
    """A train/test pair plus what the papers used on this dataset (applied by ``--preset paper``), and the
    ground truth of a data set that comes poisoned (``truth``; None for every ordinary data set)."""

    train: ImageSet
    test: ImageSet
    paper: PaperSettings = field(default_factory=PaperSettings)
    truth: GroundTruth | None = None

    def validate(self) -> None:
        """The data rules of ``rules.py`` (also what ``defend`` applies), and each set's own checks."""
        self.train.validate()
        self.test.validate()
        where = self.train.name.removesuffix(" (train)")
        check_same_images(self.train.x.shape, self.test.x.shape, where, "train", "test", "nchw")
        check_training_labels(self.train.y, self.train.classes, where, y_test=self.test.y)


def from_numpy_nhwc(x, y, name: str, classes: list[str] | None = None, mean=None, std=None) -> ImageSet:
    """Build an ImageSet from NHWC (or NHW) uint8 arrays, checking shape and dtype first."""
    import numpy as np

    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype != np.uint8:
        raise DataError(f"{name}: images have dtype {x.dtype}; expected uint8 (0..255)")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{name}: images have shape {x.shape}; expected N x H x W x C with C in (1, 3)")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{name}: {x.shape[0]} images but labels of shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: labels have dtype {y.dtype}; expected integers")
    if classes is None:
        n = int(y.max()) + 1 if y.size else 0
        classes = [str(i) for i in range(n)]
    c = x.shape[-1]
    xt = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    xt = torch.from_numpy(xt if xt.flags.writeable else xt.copy())
    if mean is None:
        mean = tuple(float(v) for v in (xt.float().mean(dim=(0, 2, 3)) / 255.0)) if len(xt) else (0.5,) * c
    if std is None:
        std = tuple(float(v) for v in (xt.float().std(dim=(0, 2, 3)) / 255.0)) if len(xt) else (0.25,) * c
    return ImageSet(xt, torch.from_numpy(y.astype(np.int64)), list(classes), tuple(mean), tuple(std), name)
