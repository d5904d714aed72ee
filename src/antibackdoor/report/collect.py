"""Reading a folder of run directories (and the bench manifests beside them) into flat records."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..bench.grid import outside_axes
from ..bench.labels import label
from ..bench.runner import cell_state
from ..errors import AntibackdoorError
from ..surplus import TargetGuess, fmt_p

log = logging.getLogger("antibackdoor")

METRICS = ("acc", "asr", "ra", "gamma", "rho_vul", "tpr", "fpr")
#: metrics of the final model: not applicable to runs where no stage trained it (split only)
MODEL_METRICS = ("acc", "asr", "ra")
#: score names whose *low* values are suspicious (the rest: high = suspicious)
LOW_IS_SUSPICIOUS = {"sce_adv"}


@dataclass
class Record:
    """One run: its coordinates, labels, state and metrics (fractions; None where undefined)."""

    run_dir: Path
    rel: str
    state: str
    error: str | None
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, Any] = field(default_factory=dict)
    manifests: list[str] = field(default_factory=list)
    order: tuple = ()

    @property
    def is_defend(self) -> bool:
        """A run of ``antibackdoor defend`` (a user's own data, no attack): not a cell of any table."""
        return is_defend_config(self.config)

    @property
    def model_trained(self) -> bool:
        """False for a split-only run (no stage trained the final model): it has no ACC/ASR/RA."""
        return self.metrics.get("model_trained") is not False

    def not_applicable(self, metric: str) -> bool:
        return metric in MODEL_METRICS and not self.model_trained

    def value(self, metric: str) -> float | None:
        if self.not_applicable(metric):
            return None
        v = self.metrics.get(metric)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return None
        return float(v)


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_defend_config(config: dict[str, Any]) -> bool:
    """``defend``'s config.yaml names its data (``data``) and no attack; ``run``'s names a dataset and an attack."""
    return "data" in config and "attack" not in config


def default_axes(config: dict[str, Any]) -> dict[str, Any]:
    """A run's coordinates from its config (runs no bench manifest lists), labelled as a grid labels them."""
    if is_defend_config(config):  # no attack, no rate, no target: the data it was given
        defense = config.get("defense", "?")
        return {"dataset": config.get("data"), "attack": None, "attack_name": None,
                "defense": label("defense", defense, config.get("defense_params")), "defense_name": defense,
                "model": config.get("model"), "poison_rate": None, "target": None, "seed": config.get("seed")}
    attack, defense = config.get("attack", "?"), config.get("defense", "?")
    axes = {"dataset": config.get("dataset"), "attack": label("attack", attack, config.get("attack_params")),
            "attack_name": attack, "defense": label("defense", defense, config.get("defense_params")),
            "defense_name": defense, "model": config.get("model"), "poison_rate": config.get("poison_rate"),
            "target": config.get("target"), "seed": config.get("seed")}
    if attack == "none" and isinstance(config.get("dataset"), str):
        try:
            axes.update(outside_axes(config["dataset"]) or {})
        except AntibackdoorError:  # a config this version cannot read: its plain coordinates
            pass
    return axes


def find_run_dirs(root: Path) -> list[Path]:
    dirs = set()
    for marker in ("config.yaml", "status.json"):
        for p in root.rglob(marker):
            if p.parent.name != "checkpoints" and "-" in p.parent.name:
                dirs.add(p.parent)
    return sorted(dirs)


def collect(root: Path) -> tuple[list[Record], list[dict[str, Any]]]:
    """Every run under ``root`` as a Record, and the bench manifests found in ``root/bench``."""
    root = Path(root)
    manifests = [m for m in (_load_json(p) for p in sorted((root / "bench").glob("*.json"))) if m.get("cells")]
    by_name: dict[str, tuple[dict[str, Any], tuple]] = {}
    for mi, m in enumerate(manifests):
        for ci, c in enumerate(m["cells"]):
            by_name.setdefault(Path(c["run"]).name, (c["axes"], (mi, ci)))
    records: list[Record] = []
    seen: set[str] = set()
    for d in find_run_dirs(root):
        config = _load_yaml(d / "config.yaml")
        metrics = _load_json(d / "metrics.json")
        st = cell_state(d)  # "running" in a process that is gone reads "interrupted"
        state = "done" if metrics else ("pending" if st.state == "done" else st.state)  # unreadable metrics.json
        rec = Record(d, str(d.relative_to(root)), state, st.error, config, metrics)
        labelled = by_name.get(d.name)
        rec.axes = dict(labelled[0]) if labelled else default_axes(config)
        rec.order = labelled[1] if labelled else (len(manifests), d.name)
        rec.axes["model"] = config.get("model", rec.axes.get("model"))
        if labelled:
            rec.manifests = [f"{m['name']}-{m['preset']}" for m in manifests
                             if any(Path(c["run"]).name == d.name for c in m["cells"])]
        records.append(rec)
        seen.add(d.name)
    # cells a manifest lists whose run directory does not exist yet (pending, or failed before starting)
    for m in manifests:
        for c in m["cells"]:
            name = Path(c["run"]).name
            if name in seen:
                continue
            seen.add(name)
            rec = Record(root / c["run"], c["run"], c.get("state") or "pending", c.get("error"), c.get("config", {}))
            rec.axes = dict(c["axes"])
            rec.manifests = [f"{m['name']}-{m['preset']}"]
            rec.order = by_name[name][1]
            records.append(rec)
    records.sort(key=lambda r: r.order)  # the grid's order (manifest cells), then other runs by name
    return records, manifests


def isolation(rec: Record) -> dict[str, Any] | None:
    """Per-sample scores of a run (isolation.csv) with the direction that is suspicious; None without."""
    path = rec.run_dir / "isolation.csv"
    if not path.is_file():
        return None
    import numpy as np

    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        rows = [r for r in reader if len(r) >= 4]
    if not header or not rows or rows[0][1] == "":
        return None
    scores = np.array([float(r[1]) for r in rows])
    kept = np.array([r[2] == "1" for r in rows])
    poison = np.array([r[3] == "1" for r in rows])
    name = header[1]
    higher = rec.metrics.get("higher_is_suspicious")
    if higher is None:
        if name in LOW_IS_SUSPICIOUS:
            higher = False
        elif (~kept).any() and kept.any():
            higher = bool(scores[~kept].mean() > scores[kept].mean())
        else:
            higher = True
    threshold = (rec.metrics.get("defense_info") or {}).get("threshold")
    return {"scores": scores, "kept": kept, "poison": poison, "name": name, "higher": bool(higher),
            "threshold": threshold}


def target_guess(rec: Record) -> dict[str, Any] | None:
    """The target guess a run's defense recorded (AIBD's class-surplus test, ``defense_info.target_surplus``),
    beside the run's true target, for the report's table; None when the run records none."""
    guess = TargetGuess.from_info(rec.metrics.get("defense_info")) if rec.state == "done" else None
    if guess is None:
        return None
    attacked = rec.axes.get("attack_name", rec.config.get("attack")) != "none"
    outside = (rec.metrics.get("truth") or {}).get("target")  # data that came poisoned: its trigger's target
    truth = (outside if outside is not None else rec.config.get("target", rec.axes.get("target"))) if attacked \
        else None
    called = guess.surplus.target
    return {"run": rec.rel, "attack": str(rec.axes.get("attack")), "defense": str(rec.axes.get("defense")),
            "rate": rec.axes.get("poison_rate") if attacked else None, "seed": rec.axes.get("seed"),
            "truth": "none (clean data)" if truth is None else guess.name_of(truth),
            "clean": truth is None, "called": called,
            "guess": guess.target, "p": fmt_p(guess.surplus.p), "filter": guess.filter_state,
            "right": (called is None) if truth is None else (called == truth), "surplus": guess.surplus,
            "title": guess.title()}
