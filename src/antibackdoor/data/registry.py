"""Dataset registry: a name (or ``prefix:ARG``) maps to a loader, so the CLI and benchmark grid find it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..registry import Registry
from .imageset import DatasetSplits

Loader = Callable[[str | None, Path], DatasetSplits]


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    loader: Loader
    description: str
    takes_argument: bool = False
    #: where the loader looks (for `antibackdoor datasets`), given the data root
    where: Callable[[Path], str] | None = None
    #: whether the data is there, given the data root
    present: Callable[[Path], bool] | None = None
    #: how tables name it (the papers' spelling, e.g. ``CIFAR-10``); empty: the name
    label: str = ""

    def display_label(self) -> str:
        return self.label or self.name


DATASETS: Registry[DatasetEntry] = Registry("dataset", "--dataset")


def register_dataset(name: str, description: str, takes_argument: bool = False, where=None, present=None,
                     label: str = ""):
    """Decorator registering ``loader(arg, data_root) -> DatasetSplits`` under ``name``."""

    def deco(fn: Loader) -> Loader:
        DATASETS.register(DatasetEntry(name, fn, description, takes_argument, where, present, label))
        return fn

    return deco


def default_data_root() -> Path:
    """``$ANTIBACKDOOR_DATA`` or ``~/.cache/antibackdoor``."""
    env = os.environ.get("ANTIBACKDOOR_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "antibackdoor"


def load_dataset(spec: str, data_root: str | Path | None = None) -> DatasetSplits:
    """Load ``spec`` (``cifar10-mini``, ``cifar10``, ``fashion-mnist``, ``npz:PATH`` ...) as train/test splits."""
    root = Path(data_root).expanduser() if data_root else default_data_root()
    name, _, arg = spec.partition(":")
    entry = DATASETS.lookup(name, shown=spec)
    if entry.takes_argument and not arg:
        raise ConfigError(f"--dataset: {name} needs an argument, e.g. {name}:PATH")
    if not entry.takes_argument and arg:
        raise ConfigError(f"--dataset: {name} takes no argument (got {spec!r})")
    splits = entry.loader(arg or None, root)
    splits.validate()
    return splits
