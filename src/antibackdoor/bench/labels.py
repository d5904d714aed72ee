"""How tables name the parts: the display labels the parts carry (``Part.label``; a dataset's or model's
``label``: the papers' spelling), with a choice's parameters."""

from __future__ import annotations

from typing import Any

from ..attacks import ATTACKS
from ..data import DATASETS
from ..defenses import DEFENSES
from ..models import MODELS

#: the attack name ``none`` (clean training data) is no registered attack
CLEAN = "clean"


def params_text(params: dict[str, Any]) -> str:
    """``{"naive": {"epochs": 20}}`` -> ``(naive.epochs=20)``."""
    flat: list[str] = []

    def walk(d: Any, prefix: str) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat.append(f"{prefix[:-1]}={d}")

    walk(params, "")
    return "(" + ", ".join(flat) + ")" if flat else ""


def part_label(kind: str, name: str) -> str:
    """The display label of a registered attack, defense, dataset or model (its name when unknown)."""
    if kind == "attack" and name == "none":
        return CLEAN
    registry = {"attack": ATTACKS, "defense": DEFENSES, "dataset": DATASETS, "model": MODELS}[kind]
    part = registry.get(name.partition(":")[0] if kind == "dataset" else name)
    return part.display_label() if part is not None and not (kind == "dataset" and ":" in name) else name


def label(kind: str, name: str, params: dict[str, Any] | None = None) -> str:
    """The display label of an attack or defense with its parameters (when any)."""
    base = part_label(kind, name)
    text = params_text(params or {})
    return f"{base} {text}" if text else base
