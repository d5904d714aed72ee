"""The attack interface and registry.

An attack turns a clean training set into a ``PoisonedSet`` (with the ground-truth poison mask that only
the evaluation may see) and applies its trigger to test images for the attack success rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..data.imageset import ImageSet
from ..errors import ConfigError


@dataclass
class PoisonedSet:
    """A poisoned training set. Defenses get ``data`` only; the rest is ground truth for the metrics."""

    data: ImageSet  # images with triggers, observed (possibly flipped) labels
    poison_mask: torch.Tensor  # bool, N: which samples carry the trigger
    true_labels: torch.Tensor  # int64, N: labels before poisoning
    target: int
    attack: str

    @property
    def num_poison(self) -> int:
        return int(self.poison_mask.sum())


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8, as saving a poisoned image would."""
    return (x.clamp(0, 1) * 255.0).round_().to(torch.uint8)


class Attack:
    """Base class: subclasses set ``name``/``label_mode`` and implement ``apply`` (and ``prepare`` if the
    attack must learn something first).

    Parameters are dataclass-like class attributes listed in ``params``; ``Attack(**overrides)`` sets them.
    ``label_mode`` is ``"dirty"`` (poisoned samples drawn from all classes and relabelled to the target) or
    ``"clean"`` (drawn from the target class only, labels kept; ``rate`` is then the fraction of the target
    class, as in A-ABL's CLB setting).
    """

    name: ClassVar[str] = ""
    label_mode: ClassVar[str] = "dirty"
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}

    def __init__(self, **overrides: Any):
        unknown = set(overrides) - set(self.params)
        if unknown:
            raise ConfigError(
                f"attack {self.name}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(self.params)) or 'none'}"
            )
        self.config: dict[str, Any] = {**self.params, **overrides}
        self.prepared = False
        self.target: int | None = None

    def __getattr__(self, key: str) -> Any:  # parameters read as attributes
        config = self.__dict__.get("config", {})
        if key in config:
            return config[key]
        raise AttributeError(key)

    # -- to implement -------------------------------------------------------------------------
    def prepare(self, train: ImageSet, target: int, generator: torch.Generator) -> None:
        """Learn what the trigger needs (a generator, an encoder, a robust model). Default: nothing."""
        self.prepared = True

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Add the trigger to a float batch in [0, 1] (N x C x H x W); returns a new batch in [0, 1]."""
        raise NotImplementedError

    # -- shared behaviour ---------------------------------------------------------------------
    def select(self, train: ImageSet, rate: float, target: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of the samples to poison (seeded, reproducible)."""
        if self.label_mode == "clean":
            pool = (train.y == target).nonzero().squeeze(1).cpu()
        else:
            pool = torch.arange(len(train))
        n = int(round(rate * len(pool)))
        if n == 0:
            raise ConfigError(f"--poison-rate {rate}: selects no sample out of {len(pool)}")
        perm = torch.randperm(len(pool), generator=generator)[:n]
        return pool[perm].sort().values

    def apply_uint8(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Apply the trigger to uint8 images in batches and quantise the result back to uint8."""
        out = torch.empty_like(x)
        for s in range(0, x.shape[0], batch_size):
            out[s:s + batch_size] = quantize(self.apply(x[s:s + batch_size].float().div(255.0)))
        return out

    def poison_images(self, train: ImageSet, idx: torch.Tensor) -> torch.Tensor:
        """The poisoned uint8 versions of ``train.x[idx]``; attacks that do more than add the trigger to a
        training image (e.g. CLB's adversarial perturbation first) override this."""
        return self.apply_uint8(train.x[idx.to(train.x.device)])

    def poison(self, train: ImageSet, rate: float, target: int, generator: torch.Generator) -> PoisonedSet:
        """Poison a fraction ``rate`` of ``train`` towards class ``target``."""
        if not 0.0 < rate < 1.0:
            raise ConfigError(f"--poison-rate {rate}: must lie in (0, 1)")
        if not 0 <= target < train.num_classes:
            raise ConfigError(f"--target {target}: must be a class index in [0, {train.num_classes})")
        self.target = target
        if not self.prepared:
            self.prepare(train, target, generator)
        idx = self.select(train, rate, target, generator)
        x = train.x.clone()
        y = train.y.clone()
        x[idx.to(x.device)] = self.poison_images(train, idx).to(x.device)
        if self.label_mode == "dirty":
            y[idx] = target
        mask = torch.zeros(len(train), dtype=torch.bool)
        mask[idx.cpu()] = True
        data = ImageSet(x, y, train.classes, train.mean, train.std, f"{train.name} + {self.name}")
        return PoisonedSet(data, mask, train.y.clone(), target, self.name)

    def triggered_test(self, test: ImageSet, target: int) -> ImageSet:
        """Test images whose true class is not the target, with the trigger, labelled with the target."""
        keep = test.y != target
        x = self.apply_uint8(test.x[keep])
        return ImageSet(x, torch.full((int(keep.sum()),), target, dtype=torch.long), test.classes, test.mean,
                        test.std, f"{test.name} + {self.name} trigger")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label_mode": self.label_mode, **self.config}


ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: register an attack under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    ATTACKS[cls.name] = cls
    return cls


def get_attack(name: str, **params: Any) -> Attack:
    cls = ATTACKS.get(name)
    if cls is None:
        raise ConfigError(f"--attack: unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    return cls(**params)


