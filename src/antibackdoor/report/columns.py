"""Per-run columns beyond the papers' metrics: any value a run records, named by its dotted path.

A grid's ``columns:`` (kept in its bench manifest) or ``antibackdoor report --columns`` asks for them; the
report then adds a table with one row per finished run (its coordinates, then these columns) and
``results.csv`` gets them as extra columns. A path reads ``metrics.json``:

- ``acc``, ``tpr``, ``auc``, ``isolated``, ``time_total_s``, ... (top-level fields);
- ``sample_flags.NAME.samples`` / ``.poison`` (how many samples a defense flagged, how many of them were
  poisoned) and ``sample_flags.NAME.share`` (poison / samples, computed);
- ``defense_info.KEY`` (what the defense recorded: AIBD's ``target``, ``target_p``, ``q``; A-ABL's
  ``purge_target``; DBD's ``labelled``), ``truth.KEY`` (an ``outside:`` data set's trigger and target);
- ``config.KEY`` reads the run's config.yaml instead;
- ``*`` in a segment stands for every key found there in the runs (``sample_flags.labelled_round_*.share``);
- two derived values: ``time_alone_s`` (the wall time plus the training seconds stage-cache hits saved: what
  the run costs alone) and ``final_poison_share`` (the poison share of what the final model trained on: the
  kept samples, minus those flagged ``purged``, plus those flagged ``taken_back``).

Fractions (the metrics above, ``share`` and ``final_poison_share``) show as %, like the other tables.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bench.stage_cache import cache_hits, saved_seconds
from ..caching import atomic_write
from ..errors import ConfigError
from .collect import METRICS, Record

#: values shown in % (the last segment of a path)
FRACTIONS = {*METRICS, "auc", "share", "final_poison_share"}


@dataclass(frozen=True)
class Column:
    path: str
    label: str


@dataclass
class RunTable:
    """One row per run: ``header`` = coordinates then columns, cells already formatted."""

    title: str
    header: list[str]
    rows: list[list[str]]
    ncols: int = 0  # how many of the header's entries are columns (the rest, first, are coordinates)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def parse_columns(items: Any, where: str = "--columns") -> list[Column]:
    """Column specs: a comma-separated string, or a list of paths / {path:, label:} mappings."""
    if isinstance(items, str):
        items = [p.strip() for p in items.split(",") if p.strip()]
    out = []
    for item in items or []:
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            out.append(Column(item["path"], str(item.get("label") or item["path"])))
        elif isinstance(item, str) and item:
            out.append(Column(item, item))
        else:
            raise ConfigError(f"{where}: expected dotted paths (sample_flags.purged.poison), got {item!r}")
    for c in out:
        if any(not seg for seg in c.path.split(".")):
            raise ConfigError(f"{where}: {c.path!r} is not a dotted path")
    return out


def _natural(key: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def expand(columns: list[Column], records: list[Record]) -> list[Column]:
    """Columns with ``*`` replaced by every key the runs have at that place (natural order)."""
    out: list[Column] = []
    for c in columns:
        parts = c.path.split(".")
        star = next((i for i, p in enumerate(parts) if "*" in p), None)
        if star is None:
            out.append(c)
            continue
        keys: set[str] = set()
        for r in records:
            node = _root(r, parts)
            for p in parts[1 if parts[0] == "config" else 0:star]:
                node = node.get(p) if isinstance(node, dict) else None
            if isinstance(node, dict):
                keys.update(k for k in node if fnmatch.fnmatchcase(str(k), parts[star]))
        for k in sorted(keys, key=_natural):
            path = ".".join([*parts[:star], k, *parts[star + 1:]])
            out.extend(expand([Column(path, c.label.replace(parts[star], k) if c.label != c.path else path)],
                              records))
    return out


def _root(r: Record, parts: list[str]) -> Any:
    return r.config if parts[0] == "config" else r.metrics


#: what ``value`` returns where a run has nothing at the path (None is a value a run may record)
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()


def value(r: Record, path: str) -> Any:
    """The value at ``path`` for run ``r`` (MISSING where it has none)."""
    if path in DERIVED:
        v = DERIVED[path](r.metrics)
        return MISSING if v is None else v
    parts = path.split(".")
    node: Any = _root(r, parts)
    for i, p in enumerate(parts[1:] if parts[0] == "config" else parts):
        if isinstance(node, dict) and p in node:
            node = node[p]
        elif p == "share" and i == len(parts) - 1 and isinstance(node, dict) and "samples" in node:
            return node.get("poison", 0) / node["samples"] if node["samples"] else None
        else:
            return MISSING
    return node


def _time_alone(m: dict[str, Any]) -> float | None:
    t = m.get("time_total_s")
    return None if t is None else float(t) + saved_seconds(cache_hits(m))


def _final_poison_share(m: dict[str, Any]) -> float | None:
    if m.get("train_size") is None or m.get("poisoned") is None:
        return None
    n = m["train_size"] - (m.get("isolated") or 0)
    p = m["poisoned"] - (m.get("isolated_poison") or 0)
    flags = m.get("sample_flags") or {}
    for name, sign in (("taken_back", 1), ("purged", -1)):
        f = flags.get(name)
        if f is not None:
            n, p = n + sign * f["samples"], p + sign * f["poison"]
    return p / n if n else None


DERIVED = {"time_alone_s": _time_alone, "final_poison_share": _final_poison_share}


def fmt(path: str, v: Any) -> str:
    """How a value reads in a table: fractions in %, large numbers without decimals, p-values in 3 digits; a
    defense's own null (``defense_info.target``: no class called) reads ``none``, a missing value ``–``."""
    if v is MISSING or (isinstance(v, float) and v != v):
        return "–"
    if v is None:
        return "none" if path.split(".")[0] in ("defense_info", "truth") else "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if path.rsplit(".", 1)[-1] in FRACTIONS:
            return f"{100 * v:.1f}"
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    if isinstance(v, list | tuple):
        return ", ".join(fmt(path, x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


#: coordinates a run table may lead with, in this order; shown where they vary (attack and defense always)
COORDS = ("dataset", "model", "poison_rate", "attack", "target", "defense", "seed")


def run_table(columns: list[Column], records: list[Record], title: str = "Per run") -> RunTable | None:
    """The finished runs of ``records`` as rows: their varying coordinates, then ``columns``."""
    done = [r for r in records if r.state == "done"]
    if not columns or not done:
        return None
    cols = expand(columns, done)

    def coord(r: Record, k: str) -> str:
        v = r.axes.get(k)
        if k == "poison_rate":  # clean data has no rate
            return "–" if v is None or r.axes.get("attack_name") == "none" else f"{100 * float(v):g}"
        return "–" if v is None else str(v)

    coords = [k for k in COORDS if k in ("attack", "defense") or len({coord(r, k) for r in done} - {"–"}) > 1]
    header = [("rate (%)" if k == "poison_rate" else k) for k in coords] + [c.label for c in cols]
    rows = [[coord(r, k) for k in coords] + [fmt(c.path, value(r, c.path)) for c in cols] for r in done]
    return RunTable(title, header, rows, len(cols))


__all__ = ["Column", "DERIVED", "MISSING", "RunTable", "expand", "fmt", "parse_columns", "run_table", "value",
           "write_results_csv"]


def write_results_csv(records: list[Record], path: Path, extra: list[Any] | None = None) -> Path:
    """One row per run: coordinates, labels, state, metrics (fractions), times, stage-cache savings, and the
    ``extra`` columns (columns.Column: the paths a grid or ``--columns`` asked for, raw values)."""
    extra = extra or []
    cols = ["run", "state", "dataset", "attack", "attack_label", "poison_rate", "target", "seed", "defense",
            "defense_label", "model", "preset", *METRICS, "model_trained", "isolated", "poisoned", "train_size",
            "time_total_s", "stage_cache_hits", "stage_cache_saved_s", "error", *(c.path for c in extra)]

    def raw(v: Any) -> Any:
        if v is MISSING:
            return None
        return _raw_float(v) if isinstance(v, float) else json.dumps(v) if isinstance(v, dict | list) else v

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in records:
                row = _csv_row(r) + [raw(value(r, c.path)) for c in extra]
                w.writerow(["" if v is None else v for v in row])

    atomic_write(path, write)
    return path


def _csv_row(r: Record) -> list[Any]:
    c, m, a = r.config, r.metrics, r.axes
    hits = cache_hits(m)
    return [r.rel, r.state, c.get("dataset", a.get("dataset")), c.get("attack", a.get("attack_name")),
            a.get("attack"), c.get("poison_rate", a.get("poison_rate")), c.get("target", a.get("target")),
            c.get("seed", a.get("seed")), c.get("defense", a.get("defense_name")), a.get("defense"),
            c.get("model", a.get("model")), c.get("preset"),
            *[_raw_float(r.value(k)) for k in METRICS], r.model_trained, m.get("isolated"), m.get("poisoned"),
            m.get("train_size"),
            m.get("time_total_s"), len(hits), round(saved_seconds(hits), 1),
            (r.error or "").replace("\n", " ")]


def _raw_float(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"
