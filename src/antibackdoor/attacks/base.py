"""The attack interface and registry.

An attack turns a clean training set into a ``PoisonedSet`` (with the ground truth that only the evaluation
may see) and applies its trigger to test images for the attack success rate. Its hyper-parameters are a
frozen dataclass ``Params`` with one instance per preset (``quick``, ``paper``), as for defenses; values are
type-checked once, when the attack is built, with errors that name ``--attack-param KEY``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import to_dict
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..models import MODELS
from ..parts import Part
from ..registry import Registry


@dataclass
class PoisonedSet:
    """A poisoned training set. Defenses get ``data`` only; the rest is ground truth for the metrics."""

    data: ImageSet  # images with triggers, observed (possibly flipped) labels
    poison_mask: torch.Tensor  # bool, N: which samples carry the backdoor trigger (and, dirty label, the target)
    true_labels: torch.Tensor  # int64, N: labels before poisoning
    target: int
    attack: str
    #: bool, N: samples the attack modified without making them backdoor samples (WaNet's noise-mode warps,
    #: IAB's cross-trigger images); they keep their true labels and are not in ``poison_mask``
    cover_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.cover_mask is None:
            self.cover_mask = torch.zeros(len(self.poison_mask), dtype=torch.bool)

    @property
    def num_poison(self) -> int:
        return int(self.poison_mask.sum())

    @property
    def num_cover(self) -> int:
        return int(self.cover_mask.sum())


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8, as saving a poisoned image would."""
    return (x.clamp(0, 1) * 255.0).round_().to(torch.uint8)


def map_uint8(fn: Callable[..., torch.Tensor], *images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``fn`` over uint8 image batches (as floats in [0, 1]; several inputs are sliced alike), quantised back
    to uint8: how every trigger is applied to stored images."""
    first = images[0]
    out = torch.empty_like(first)
    for s in range(0, first.shape[0], batch_size):
        out[s:s + batch_size] = quantize(fn(*(x[s:s + batch_size].float().div(255.0) for x in images)))
    return out


def param_error(key: str, message: str) -> ConfigError:
    """The one shape of an invalid attack parameter: ``--attack-param KEY: message``."""
    return ConfigError(f"--attack-param {key}: {message}")


def patch_fits(size: int, margin: int, height: int, width: int) -> None:
    """Raise ``param_error`` unless a ``size`` x ``size`` patch ``margin`` pixels from a corner fits, naming
    ``size`` when the patch alone is too large, else ``margin``."""
    if size > min(height, width):
        raise param_error("size", f"a {size}x{size} patch does not fit in {height}x{width} images")
    if size + margin > min(height, width):
        raise param_error("margin", f"a {size}x{size} patch at margin {margin} does not fit in {height}x{width} "
                                    "images")


def check_model(key: str, name: str) -> None:
    """Raise ``param_error`` unless ``name`` is a registered model (for attacks that train one)."""
    if name not in MODELS:
        raise param_error(key, f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")


class Attack(Part):
    """Base class: subclasses set ``name``, ``label_mode``, ``description`` and ``Params`` (a frozen
    dataclass; its defaults are the ``quick`` preset and, unless ``presets`` says otherwise, the ``paper``
    one) and implement ``apply`` (and ``prepare`` if the attack must learn something first).

    ``Params`` may define ``validate(where)`` (raise ``param_error``) for checks beyond the field types.
    ``label_mode`` is ``"dirty"`` (poisoned samples drawn from all classes and relabelled to the target) or
    ``"clean"`` (drawn from the target class only, labels kept; ``rate`` is then the fraction of the target
    class, as in A-ABL's CLB setting).
    """

    kind = "attack"
    option = "--attack-param"
    label_mode: ClassVar[str] = "dirty"
    #: the parameter that sets how many cover samples there are (named in the error when there are too few)
    cover_param: ClassVar[str] = "cross_ratio"

    def __init__(self, preset: str = "quick", overrides: dict[str, Any] | None = None, params: Any = None,
                 **kw: Any):
        super().__init__(preset, {**(overrides or {}), **kw} if params is None else None, params)
        self.prepared = False
        self.target: int | None = None

    # -- to implement -------------------------------------------------------------------------
    def prepare(self, train: ImageSet, target: int, generator: torch.Generator) -> None:
        """Learn what the trigger needs (a generator, an encoder, a robust model). Default: nothing."""
        self.prepared = True

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Add the trigger to a float batch in [0, 1] (N x C x H x W); returns a new batch in [0, 1]."""
        raise NotImplementedError

    def cover_count(self, num_poison: int) -> int:
        """How many cover samples (modified, true label kept, not poison) to add; default none."""
        return 0

    def cover_images(self, train: ImageSet, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The uint8 cover versions of ``train.x[idx]`` (attacks with ``cover_count`` > 0 implement it)."""
        raise NotImplementedError

    def check_fit(self, height: int, width: int, channels: int) -> None:
        """Raise ``param_error`` naming the key when the trigger does not fit images of this shape (a patch
        larger than the image). ``check`` calls it before the run directory exists. Default: fits any."""

    # -- shared behaviour ---------------------------------------------------------------------
    def _pool(self, train: ImageSet, target: int) -> torch.Tensor:
        """The samples that may be poisoned: all (dirty label) or the target class (clean label)."""
        if self.label_mode == "clean":
            return (train.y == target).nonzero().squeeze(1).cpu()
        return torch.arange(len(train))

    def check(self, train: ImageSet, rate: float, target: int) -> tuple[int, int]:
        """Check rate, target and the sample budget before anything is drawn or trained (the experiment calls
        it before creating the run directory); returns how many samples get poisoned and cover versions."""
        self.check_fit(int(train.x.shape[-2]), int(train.x.shape[-1]), train.channels)
        if not 0.0 < rate < 1.0:
            raise ConfigError(f"--poison-rate {rate}: must lie in (0, 1)")
        if not 0 <= target < train.num_classes:
            raise ConfigError(f"--target {target}: must be a class index in [0, {train.num_classes})")
        pool = len(self._pool(train, target))
        n = int(round(rate * pool))
        if n == 0:
            raise ConfigError(f"--poison-rate {rate}: selects no sample out of {pool}")
        n_cover = self.cover_count(n)
        if n + n_cover > len(train):
            raise ConfigError(
                f"--attack-param {self.cover_param}: attack {self.name} at --poison-rate {rate} needs {n} "
                f"poisoned + {n_cover} cover samples, more than the {len(train)} there are; lower one of them")
        return n, n_cover

    def select(self, train: ImageSet, rate: float, target: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of the samples to poison (seeded, reproducible; ``check`` has validated the counts)."""
        pool = self._pool(train, target)
        perm = torch.randperm(len(pool), generator=generator)[:int(round(rate * len(pool)))]
        return pool[perm].sort().values

    def apply_uint8(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Apply the trigger to uint8 images in batches and quantise the result back to uint8."""
        return map_uint8(self.apply, x, batch_size=batch_size)

    def poison_images(self, train: ImageSet, idx: torch.Tensor) -> torch.Tensor:
        """The poisoned uint8 versions of ``train.x[idx]``; attacks that do more than add the trigger to a
        training image (e.g. CLB's adversarial perturbation first) override this."""
        return self.apply_uint8(train.x[idx.to(train.x.device)])

    def poison(self, train: ImageSet, rate: float, target: int, generator: torch.Generator) -> PoisonedSet:
        """Poison a fraction ``rate`` of ``train`` towards class ``target``, then add the cover samples.

        Whether there are enough samples for both is checked before ``prepare`` (which may train for minutes).
        """
        _, n_cover = self.check(train, rate, target)
        self.target = target
        idx = self.select(train, rate, target, generator)
        if not self.prepared:
            self.prepare(train, target, generator)
        x = train.x.clone()
        y = train.y.clone()
        x[idx.to(x.device)] = self.poison_images(train, idx).to(x.device)
        if self.label_mode == "dirty":
            y[idx] = target
        mask = torch.zeros(len(train), dtype=torch.bool)
        mask[idx.cpu()] = True
        cover = torch.zeros(len(train), dtype=torch.bool)
        if n_cover:
            pool = (~mask).nonzero().squeeze(1)
            cover_idx = pool[torch.randperm(len(pool), generator=generator)[:n_cover]].sort().values
            x[cover_idx.to(x.device)] = self.cover_images(train, cover_idx, generator).to(x.device)
            cover[cover_idx] = True
        data = ImageSet(x, y, train.classes, train.mean, train.std, f"{train.name} + {self.name}")
        return PoisonedSet(data, mask, train.y.clone(), target, self.name, cover)

    def triggered_test(self, test: ImageSet, target: int) -> ImageSet:
        """Test images whose true class is not the target, with the trigger, labelled with the target."""
        keep = test.y != target
        x = self.apply_uint8(test.x[keep])
        return ImageSet(x, torch.full((int(keep.sum()),), target, dtype=torch.long), test.classes, test.mean,
                        test.std, f"{test.name} + {self.name} trigger")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label_mode": self.label_mode, **to_dict(self.params)}


ATTACKS: Registry[type[Attack]] = Registry("attack", "--attack")
register_attack = ATTACKS.register


def get_attack(name: str, preset: str = "quick", overrides: dict[str, Any] | None = None, **params: Any) -> Attack:
    """Attack ``name`` with the ``preset``'s parameters, updated by ``overrides`` and keyword ``params``."""
    return ATTACKS.lookup(name).create(preset, {**(overrides or {}), **params})
