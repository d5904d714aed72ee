"""Data that arrives poisoned: ``outside:TRIGGER?target=T,rate=R,seed=S,base=DATASET``.

A trigger that no attack module implements, written into a base data set the way a user's poisoned data
would come: ``rate`` of the training samples (counted over the whole set, drawn outside the target class)
get the trigger and the target label (dirty label). A run on it has ``--attack none``: the tool is told
nothing about the poison. The loaded splits carry the ground truth (``DatasetSplits.truth``) for the
evaluation alone, so that such a run still reports TPR/FPR, the flagged poison and the ASR.

Triggers:

- ``own-patch``: a plus sign of three colours near the top-right corner, its size scaled with the image;
- ``own-blend``: smooth coloured noise (an 8 x 8 Gaussian field per channel, bilinearly upsampled) blended in at
  alpha 0.12.

Options (all optional): ``target`` (default 0), ``rate`` (default 0.1), ``seed`` (default 0: which samples),
``base`` (default ``cifar10-mini``; any ordinary data set spec, written last: it takes the rest of the text,
so it may hold its own ``:``, ``?`` and ``,``). Example: ``outside:own-blend?target=7`` or
``outside:own-patch?target=3,rate=0.05,base=npz:~/data/signs.npz``.

The data is normalised with the mean and std of its own (poisoned) training images, as ``npz:`` does with a
user's file: the benchmarks that wrote these triggers into an npz measured exactly this data (same pixels, same
draw, same normalisation), so their tables are what a run on ``outside:`` gives. Building it costs one pass
over the base data; nothing is written to disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .imageset import DatasetSplits, GroundTruth, ImageSet, from_numpy_nhwc
from .registry import load_dataset, register_dataset

DEFAULT_BASE = "cifar10-mini"
OPTIONS = ("target", "rate", "seed", "base")


def own_patch(x: np.ndarray) -> np.ndarray:
    """A plus sign of three colours near the top-right corner (NHWC uint8), its size scaled with the image."""
    out = x.copy()
    h, w = x.shape[1:3]
    s = max(5, round(w * 5 / 32)) // 2 * 2 + 1  # odd arm length
    r0, c0 = max(1, h // 16), w - s - max(1, w // 16)
    colours = np.array([[255, 40, 40], [40, 255, 40], [40, 40, 255]], np.uint8)[:, : x.shape[3]]
    mid = s // 2
    for i in range(s):
        out[:, r0 + mid, c0 + i] = colours[i % 3]
        out[:, r0 + i, c0 + mid] = colours[(i + 1) % 3]
    return out


def own_blend(x: np.ndarray, alpha: float = 0.12, seed: int = 1234) -> np.ndarray:
    """Smooth coloured noise: an 8 x 8 Gaussian field per channel, bilinearly upsampled, blended at ``alpha``."""
    h, w, c = x.shape[1:]
    field = torch.from_numpy(np.random.default_rng(seed).normal(0.5, 0.3, (1, c, 8, 8)).astype(np.float32))
    pattern = torch.nn.functional.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)
    pattern = pattern.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255.0
    return np.clip((1 - alpha) * x.astype(np.float32) + alpha * pattern, 0, 255).round().astype(np.uint8)


#: trigger name -> function on NHWC uint8 arrays
TRIGGERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"own-patch": own_patch, "own-blend": own_blend}


@dataclass(frozen=True)
class OutsideSpec:
    """A parsed ``outside:`` argument."""

    trigger: str
    target: int = 0
    rate: float = 0.1
    seed: int = 0
    base: str = DEFAULT_BASE


def parse_outside(arg: str) -> OutsideSpec:
    """``TRIGGER?key=value,...,base=SPEC`` -> OutsideSpec; bad input is a ConfigError naming ``--dataset``."""
    where = f"--dataset outside:{arg}"
    trigger, _, text = arg.partition("?")
    if trigger not in TRIGGERS:
        raise ConfigError(f"{where}: unknown trigger {trigger!r}; known: {', '.join(TRIGGERS)}")
    values: dict[str, object] = {}
    while text:
        item, _, rest = text.partition(",")
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in OPTIONS or not sep:
            raise ConfigError(f"{where}: unknown option {item!r}; known: {', '.join(k + '=' for k in OPTIONS)}")
        if key == "base":  # the rest of the text, commas and all: a spec of its own
            values["base"], rest = text.partition("=")[2].strip(), ""
        else:
            try:
                values[key] = (float if key == "rate" else int)(value.strip())
            except ValueError:
                raise ConfigError(f"{where}: {key}={value!r} is not a number") from None
        text = rest
    spec = OutsideSpec(trigger, **values)  # type: ignore[arg-type]
    if not 0.0 < spec.rate < 1.0:
        raise ConfigError(f"{where}: rate must lie in (0, 1)")
    if spec.target < 0:
        raise ConfigError(f"{where}: target must be a class index >= 0")
    if not spec.base or spec.base.partition(":")[0] == "outside":
        raise ConfigError(f"{where}: base must name an ordinary data set (e.g. {DEFAULT_BASE})")
    return spec


def outside_spec(dataset: str) -> OutsideSpec | None:
    """The parsed spec of a ``--dataset`` value that is an ``outside:`` data set, else None."""
    name, _, arg = dataset.partition(":")
    return parse_outside(arg) if name == "outside" else None


def _nhwc(s: ImageSet) -> np.ndarray:
    return s.x.cpu().permute(0, 2, 3, 1).numpy()


def poison_outside(splits: DatasetSplits, spec: OutsideSpec) -> DatasetSplits:
    """``splits`` with ``spec``'s trigger written into its training data, and the ground truth beside it."""
    train, test = splits.train, splits.test
    if spec.target >= train.num_classes:
        raise ConfigError(f"--dataset outside:...,target={spec.target}: {spec.base} has {train.num_classes} classes")
    x, y = _nhwc(train).copy(), train.y.cpu().numpy().copy()
    rng = np.random.default_rng([spec.seed, spec.target, sum(map(ord, spec.trigger))])
    pool = np.flatnonzero(y != spec.target)
    n = round(spec.rate * len(y))
    if not 0 < n <= len(pool):
        raise ConfigError(f"--dataset outside:...,rate={spec.rate}: selects {n} of the {len(pool)} samples outside "
                          f"class {spec.target}")
    chosen = rng.choice(pool, size=n, replace=False)
    apply = TRIGGERS[spec.trigger]
    x[chosen] = apply(x[chosen])
    y[chosen] = spec.target
    name = f"{spec.base} + {spec.trigger} (outside, target {spec.target})"
    classes = list(train.classes)
    new_train = from_numpy_nhwc(x, y, f"{name} (train)", classes)  # normalised from its own images, as npz: is
    new_test = from_numpy_nhwc(_nhwc(test), test.y.cpu().numpy(), f"{name} (test)", classes, new_train.mean,
                               new_train.std)
    keep = (test.y != spec.target).cpu().numpy()
    tx = torch.from_numpy(apply(_nhwc(test)[keep])).permute(0, 3, 1, 2).contiguous()
    triggered = ImageSet(tx, torch.full((len(tx),), spec.target, dtype=torch.long), classes, new_test.mean,
                         new_test.std, f"{name} (triggered test)")
    poison = torch.zeros(len(y), dtype=torch.bool)
    poison[torch.from_numpy(chosen)] = True
    truth = GroundTruth(poison, train.y.cpu().clone(), spec.target, spec.trigger, triggered)
    return DatasetSplits(new_train, new_test, splits.paper, truth)


@register_dataset(
    "outside",
    "a trigger written into a base data set before the tool sees it (own-patch, own-blend), for runs with "
    "--attack none: outside:TRIGGER?target=T,rate=R,seed=S,base=DATASET",
    takes_argument=True,
    where=lambda root: "built from its base data set",
    present=lambda root: True,
)
def _outside(arg: str, root: Path) -> DatasetSplits:
    spec = parse_outside(arg)
    return poison_outside(load_dataset(spec.base, root), spec)


__all__ = ["OutsideSpec", "TRIGGERS", "outside_spec", "own_blend", "own_patch", "parse_outside", "poison_outside"]
