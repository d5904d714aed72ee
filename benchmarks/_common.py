"""What the benchmark scripts share: number formatting, ``NAME:KEY=VALUE`` entries and a finished run's
per-sample table with the ground truth rebuilt from its config.

The scripts run as ``python benchmarks/NAME.py``, so this module is importable beside them as ``_common``.
Grids of ordinary runs are not scripts: they are ``benchmarks/grids/*.yaml`` files for ``antibackdoor bench``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml


def pct(v: Any) -> str:
    """A fraction as a percentage with one decimal; ``-`` for None or NaN."""
    return "-" if v is None or v != v else f"{100 * v:.1f}"


def parse_entry(text: str, option: str = "--attacks") -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE[:KEY=VALUE]`` -> (name, {key: value}), values parsed as YAML (``pixels:pixels=4``)."""
    name, *items = text.strip().split(":")
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{option}: expected NAME:KEY=VALUE, got {text!r}")
        params[key.strip()] = yaml.safe_load(value)
    return name, params


def label(name: str, params: dict[str, Any]) -> str:
    """``pixels`` + {pixels: 4} -> ``pixels pixels=4``."""
    return name + "".join(f" {k}={v}" for k, v in params.items())


def read_isolation(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, kept, is_poison) from a run's isolation.csv, in training order (scores NaN where it has none)."""
    with open(run_dir / "isolation.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    scores = np.array([float(r[1]) if r[1] != "" else np.nan for r in rows])
    return scores, np.array([r[2] == "1" for r in rows]), np.array([r[3] == "1" for r in rows])


@dataclass
class Rebuilt:
    """A finished run's training data as its defense saw it, and the ground truth it never saw."""

    config: dict[str, Any]
    data: Any  # ImageSet
    poison: np.ndarray  # bool over the training samples
    target: int


def rebuild(run_dir: Path) -> Rebuilt:
    """The poisoned training set of a run, from its config.yaml: the attack's poisoning with the run's seed, or
    an ``outside:`` data set's own ground truth (``--attack none``). Runs with a trusted slice are refused."""
    import torch

    from antibackdoor.attacks import get_attack
    from antibackdoor.data import load_dataset

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    if (run_dir / "trusted.json").is_file():
        raise SystemExit(f"{run_dir}: its defense took a trusted slice first; this probe does not rebuild that")
    splits = load_dataset(cfg["dataset"], cfg.get("data_root"))
    if cfg["attack"] == "none":
        truth = splits.truth
        if truth is None:
            return Rebuilt(cfg, splits.train, np.zeros(len(splits.train), bool), int(cfg["target"]))
        return Rebuilt(cfg, splits.train, truth.poison_mask.numpy(), truth.target)
    attack = get_attack(cfg["attack"], cfg["preset"], cfg.get("attack_params") or {})
    target = int(cfg["target"])
    poisoned = attack.poison(splits.train, cfg["poison_rate"], target, torch.Generator().manual_seed(cfg["seed"]))
    return Rebuilt(cfg, poisoned.data, poisoned.poison_mask.cpu().numpy(), target)


__all__ = ["Rebuilt", "label", "parse_entry", "pct", "read_isolation", "rebuild"]
