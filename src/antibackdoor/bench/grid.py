"""Grids of experiments: axes (datasets, attacks, defenses, models, poison rates, targets, seeds), exclusions
and per-cell adjustments, expanded into cells that are each an ordinary ``antibackdoor run`` config.

A grid file (YAML)::

    name: my-grid
    preset: quick                    # --preset overrides it
    datasets: [cifar10-mini]
    attacks:                         # a name, {name: params}, or {name:, params:, label:}
      - none
      - badnets
      - {name: blend, params: {alpha: 0.2}, label: "Blend 0.2"}
    defenses: [none, a-abl, {name: a-abl, label: "A-ABL 20 ep", params: {naive: {epochs: 20}}}]
    models: [null]                   # null: the preset's default model
    poison_rates: [0.1]
    targets: [0, 3, 7]
    seeds: [0]
    exclude:                         # a cell matching every key of an entry is left out
      - {attack: none, defense: adv-train}
    adjust:                          # cells matching `match` get the `set` fields (merged into params)
      - {match: {attack: clb}, set: {poison_rate: 0.5}}
    eval: {ra_samples: 500}          # eval, data_root, device, precision apply to every cell
    columns: [acc, asr, sample_flags.purged.poison, defense_info.q]   # the report's per-run table

Clean data (``attack: none``) does not depend on the poison rate or the target, so those cells are
collapsed to one per remaining coordinates (target 0, the default rate), and duplicates are dropped. A data
set that comes poisoned (``outside:TRIGGER?target=T,...``) with ``attack: none`` is labelled by what it holds:
its trigger as the attack, its target and rate, its base data set (``outside_axes``). A ``dataset`` of
``exclude`` / ``adjust`` with a ``*`` is a pattern (``outside:*``).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import deep_update
from ..data.outside import outside_spec
from ..errors import ConfigError
from ..experiment import load_config_file
from .labels import label

#: axes a grid expands, in the order cells are generated
AXES = ("datasets", "attacks", "defenses", "models", "poison_rates", "targets", "seeds")
#: keys that `exclude` and `adjust` entries may match, and the cell fields they compare with
MATCH_KEYS = ("dataset", "attack", "defense", "model", "poison_rate", "target", "seed", "preset")
#: ExperimentConfig fields a grid may set for every cell
PASS_THROUGH = ("eval", "data_root", "device", "precision")
#: what a clean-data cell is normalised to (ExperimentConfig's defaults)
CLEAN_RATE, CLEAN_TARGET = 0.1, 0


@dataclass(frozen=True)
class Choice:
    """One value of the attack or defense axis: a registered name, its parameters and a display label."""

    name: str
    params: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    label: str | None = None

    @property
    def key(self) -> str:
        return self.name + (json.dumps(self.params, sort_keys=True) if self.params else "")

    def display(self, kind: str) -> str:
        return self.label or label(kind, self.name, self.params)


def parse_choice(item: Any, where: str) -> Choice:
    if isinstance(item, str):
        return Choice(item)
    if isinstance(item, dict):
        if "name" in item:
            unknown = set(item) - {"name", "params", "label"}
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: label, name, params")
            params = item.get("params") or {}
            if not isinstance(params, dict):
                raise ConfigError(f"{where}.params: expected a mapping, got {params!r}")
            return Choice(str(item["name"]), dict(params), item.get("label"))
        if len(item) == 1:
            (name, params), = item.items()
            if params is not None and not isinstance(params, dict):
                raise ConfigError(f"{where}: expected {{{name}: {{param: value}}}}, got {item!r}")
            return Choice(str(name), dict(params or {}))
    raise ConfigError(f"{where}: expected a name, {{name: params}} or {{name:, params:, label:}}, got {item!r}")


@dataclass
class Cell:
    """One experiment of a grid: ``config`` is an ExperimentConfig dict (without ``out``), ``axes`` its
    coordinates for tables (labels, not parameter dicts)."""

    config: dict[str, Any]
    axes: dict[str, Any]

    def key(self) -> str:
        return json.dumps(self.config, sort_keys=True, default=str)


@dataclass
class Grid:
    name: str = "grid"
    preset: str = "quick"
    datasets: list[str] = field(default_factory=lambda: ["cifar10-mini"])
    attacks: list[Choice] = field(default_factory=lambda: [Choice("badnets")])
    defenses: list[Choice] = field(default_factory=lambda: [Choice("a-abl")])
    models: list[str | None] = field(default_factory=lambda: [None])
    poison_rates: list[float] = field(default_factory=lambda: [0.1])
    targets: list[int] = field(default_factory=lambda: [0])
    seeds: list[int] = field(default_factory=lambda: [0])
    exclude: list[dict[str, Any]] = field(default_factory=list)
    adjust: list[dict[str, Any]] = field(default_factory=list)
    common: dict[str, Any] = field(default_factory=dict)  # PASS_THROUGH fields
    #: extra columns of the report's per-run table (dotted paths into metrics.json, see report/columns.py)
    columns: list[Any] = field(default_factory=list)
    #: where the grid came from, as errors name it (the grid file's path, "suite aabl-t3")
    where: str = "grid"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "grid") -> Grid:
        known = {"name", "preset", "exclude", "adjust", "columns", *AXES, *PASS_THROUGH}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(known))}")
        g = cls(name=str(data.get("name", "grid")), preset=str(data.get("preset", "quick")), where=where)
        for axis in AXES:
            if axis not in data:
                continue
            values = data[axis]
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{axis}: expected a non-empty list, got {values!r}")
            if axis in ("attacks", "defenses"):
                values = [parse_choice(v, f"{where}.{axis}[{i}]") for i, v in enumerate(values)]
            elif axis == "poison_rates":
                values = [_number(v, f"{where}.{axis}", float) for v in values]
            elif axis in ("targets", "seeds"):
                values = [_number(v, f"{where}.{axis}", int) for v in values]
            setattr(g, axis, values)
        for key in ("exclude", "adjust"):
            entries = data.get(key) or []
            if not isinstance(entries, list):
                raise ConfigError(f"{where}.{key}: expected a list of mappings")
            for i, e in enumerate(entries):
                _check_entry(e, f"{where}.{key}[{i}]", adjust=key == "adjust")
            setattr(g, key, list(entries))
        g.common = {k: data[k] for k in PASS_THROUGH if k in data}
        g.columns = _check_columns(data.get("columns") or [], f"{where}.columns")
        return g

    @classmethod
    def load(cls, path: str | Path) -> Grid:
        data = load_config_file(path)
        data.setdefault("name", Path(path).stem)
        return cls.from_dict(data, str(path))

    def cells(self) -> list[Cell]:
        """Every cell of the grid, exclusions applied, adjustments merged, duplicates dropped."""
        out: dict[str, Cell] = {}
        alabels, dlabels = _unique_labels(self.attacks, "attack"), _unique_labels(self.defenses, "defense")
        for ds, atk, dfn, model, rate, target, seed in itertools.product(
                self.datasets, self.attacks, self.defenses, self.models, self.poison_rates, self.targets,
                self.seeds):
            cfg: dict[str, Any] = {
                "dataset": ds, "attack": atk.name, "attack_params": dict(atk.params), "poison_rate": rate,
                "target": target, "defense": dfn.name, "defense_params": dict(dfn.params), "model": model,
                "preset": self.preset, "seed": seed, **self.common,
            }
            probe = {"dataset": ds, "attack": (atk.name, atk.label), "defense": (dfn.name, dfn.label),
                     "model": model, "poison_rate": rate, "target": target, "seed": seed, "preset": self.preset}
            if any(_matches(e, probe) for e in self.exclude):
                continue
            for a in self.adjust:
                if _matches(a["match"], probe):
                    cfg = _apply(cfg, a["set"])
            if cfg["attack"] == "none":
                cfg.update(poison_rate=CLEAN_RATE, target=CLEAN_TARGET, attack_params={})
            axes = {"dataset": ds, "attack": alabels[atk.key], "attack_name": atk.name, "defense": dlabels[dfn.key],
                    "defense_name": dfn.name, "model": model, "poison_rate": cfg["poison_rate"],
                    "target": cfg["target"], "seed": seed}
            if cfg["attack"] == "none":
                axes.update(outside_axes(cfg["dataset"]) or {})
            cell = Cell(cfg, axes)
            out.setdefault(cell.key(), cell)
        return list(out.values())


def outside_axes(dataset: str) -> dict[str, Any] | None:
    """A clean-attack cell's coordinates on a data set that comes poisoned (``outside:``): the trigger in the
    attack's place, the trigger's target and rate, the base data set; None for any other data set."""
    spec = outside_spec(dataset)
    if spec is None:
        return None
    return {"dataset": spec.base, "attack": label("attack", spec.trigger), "attack_name": spec.trigger,
            "poison_rate": spec.rate, "target": spec.target}


def _check_columns(items: Any, where: str) -> list[Any]:
    """A list of dotted paths, or {path:, label:} mappings (the report resolves them)."""
    if not isinstance(items, list):
        raise ConfigError(f"{where}: expected a list of column paths")
    for i, c in enumerate(items):
        ok = isinstance(c, str) and c or (isinstance(c, dict) and set(c) <= {"path", "label"}
                                          and isinstance(c.get("path"), str))
        if not ok:
            raise ConfigError(f"{where}[{i}]: expected a dotted path (sample_flags.purged.poison) or "
                              f"{{path:, label:}}, got {c!r}")
    return list(items)


def _unique_labels(choices: list[Choice], kind: str) -> dict[str, str]:
    """Display label per choice; choices that would share one (same name, no label) get a number."""
    base = {c.key: c.display(kind) for c in choices}
    counts: dict[str, int] = {}
    for lab in base.values():
        counts[lab] = counts.get(lab, 0) + 1
    seen: dict[str, int] = {}
    labels = {}
    for c in choices:
        lab = base[c.key]
        if counts[lab] > 1:
            seen[lab] = seen.get(lab, 0) + 1
            lab = f"{lab} #{seen[lab]}"
        labels[c.key] = lab
    return labels


def _number(v: Any, where: str, tp: type) -> Any:
    if isinstance(v, bool) or not isinstance(v, int | float) or (tp is int and not float(v).is_integer()):
        raise ConfigError(f"{where}: expected {'an integer' if tp is int else 'a number'}, got {v!r}")
    return tp(v)


def _check_entry(entry: Any, where: str, adjust: bool) -> None:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping")
    if adjust:
        if set(entry) != {"match", "set"} or not isinstance(entry["match"], dict) \
                or not isinstance(entry["set"], dict):
            raise ConfigError(f"{where}: expected {{match: {{...}}, set: {{...}}}}")
        match = entry["match"]
    else:
        match = entry
    bad = set(match) - set(MATCH_KEYS)
    if bad:
        raise ConfigError(f"{where}: cannot match on {', '.join(sorted(bad))}; known: {', '.join(MATCH_KEYS)}")


def _matches(entry: dict[str, Any], probe: dict[str, Any]) -> bool:
    """True when every key of ``entry`` equals (or, for a list, contains) the probe's value; attacks and
    defenses match by name or by label."""
    for key, want in entry.items():
        wants = want if isinstance(want, list) else [want]
        have = probe[key]
        haves = [h for h in have if h is not None] if isinstance(have, tuple) else [have]
        if key in ("poison_rate",):
            if not any(abs(float(w) - float(h)) < 1e-12 for w in wants for h in haves):
                return False
        elif key == "dataset":  # a pattern with '*' (outside:*), else the spec itself
            if not any(fnmatch.fnmatchcase(str(h), w) if isinstance(w, str) and "*" in w else w == h
                       for w in wants for h in haves):
                return False
        elif not any(w == h for w in wants for h in haves):
            return False
    return True


def _apply(cfg: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with ``changes``: mappings (params, eval) are merged, other fields replaced."""
    return deep_update(cfg, changes)
