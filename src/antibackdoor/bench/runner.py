"""``antibackdoor bench``: plan a grid or suite against what ``--out`` already holds, run what is missing.

The plan resolves every cell exactly as ``antibackdoor run`` would (same config, same run id), then looks
for each run id anywhere under ``--out``: a finished run is reused, a failed one is retried (resumed from
its checkpoints), the rest run. A manifest ``<out>/bench/<name>-<preset>.json`` records the grid and where
each cell's run directory is; ``antibackdoor report`` reads it for the suite's table layout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..attacks import ATTACKS
from ..defenses import DEFENSES, get_defense
from ..errors import AntibackdoorError, ConfigError, DataError
from ..experiment import Experiment, make_config
from ..jsonutil import write_json
from ..runpath import run_state
from . import estimate as est
from .grid import Cell, Grid
from .stage_cache import cache_hits
from .suites import SUITES, Suite

log = logging.getLogger("antibackdoor")

STATES = ("done", "failed", "running", "interrupted", "pending")


@dataclass
class Planned:
    """A cell with its run directory and current state."""

    cell: Cell
    run_name: str
    run_dir: Path
    state: str = "pending"
    error: str | None = None
    #: the state as --status shows it ("interrupted (process 123 is gone)"); empty: ``state`` itself
    shown: str = ""
    group: str = ""
    passes: float = 0.0
    seconds_per_pass: float = 0.0
    shared: list = field(default_factory=list)
    measured_s: float | None = None


@dataclass
class Plan:
    name: str
    preset: str
    suite: Suite | None
    grid: Grid
    cells: list[Planned]
    skipped: dict[str, list[str]]  # reason -> what (missing defenses, detectors, datasets)
    total: int = 0  # cells of the grid before the skipped ones were left out

    def count(self, state: str) -> int:
        return sum(c.state == state for c in self.cells)


# -- what the spec is --------------------------------------------------------------------------------------
def load_grid(spec: str, preset: str | None) -> tuple[Grid, Suite | None]:
    """A suite name or a grid file, for ``preset`` (None: the grid file's, else quick)."""
    path = Path(spec)
    if spec in SUITES:
        suite = SUITES[spec]
        p = preset or "quick"
        if p not in suite.grids:
            raise ConfigError(f"--preset {p}: suite {spec} has sizes {', '.join(suite.grids)}")
        return Grid.from_dict(suite.grid_dict(p), f"suite {spec}"), suite
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: no such grid file")
        grid = Grid.load(path)
        if preset:
            grid.preset = preset
        return grid, None
    raise ConfigError(f"bench: {spec!r} is neither a suite ({', '.join(SUITES)}) nor a grid file (.yaml)")


def restrict(grid: Grid, seeds: list[int] | None = None, targets: list[int] | None = None,
             only: dict[str, list[str]] | None = None) -> Grid:
    """Apply --seeds/--targets and the --attacks/--defenses/--datasets/--models filters (names or labels)."""
    if seeds:
        grid.seeds = list(seeds)
    if targets:
        grid.targets = list(targets)
    for axis, wanted in (only or {}).items():
        if not wanted:
            continue
        values = getattr(grid, axis)
        chosen: set[int] = set()
        for w in wanted:  # a label (any case) picks that choice alone; a name that is no label, all of that name
            hits = [i for i, v in enumerate(values) if _label_of(v) == w] or \
                [i for i, v in enumerate(values) if hasattr(v, "label") and str(_label_of(v)).lower() == w.lower()] or \
                [i for i, v in enumerate(values) if _name_of(v) == w]
            chosen.update(hits)
        keep = [v for i, v in enumerate(values) if i in chosen]
        if not keep:
            known = ", ".join(sorted({str(_name_of(v)) for v in values}))
            raise ConfigError(f"--{axis} {','.join(wanted)}: none of these is in the grid (it has {known})")
        setattr(grid, axis, keep)
    return grid


def _name_of(v: Any) -> Any:
    return getattr(v, "name", v)


def _label_of(v: Any) -> Any:
    return getattr(v, "label", None) or _name_of(v)


# -- which methods exist -----------------------------------------------------------------------------------
def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_registered(name: str, registry: dict[str, Any]) -> str | None:
    """The registered spelling of ``name`` (exact, else ignoring case and punctuation: d-st = dst = D_ST)."""
    if name in registry:
        return name
    matches = [k for k in registry if _norm(k) == _norm(name)]
    return matches[0] if len(matches) == 1 else None


@dataclass(frozen=True)
class Detectors:
    """The detectors' registry: ``registry`` maps names to detector classes, ``get(name, preset, overrides)``
    builds one (``antibackdoor.detectors.get_detector``), raising ConfigError for parameters it rejects."""

    registry: Mapping[str, Any]
    get: Callable[[str, str, dict[str, Any] | None], Any] | None = None


def detector_registry() -> Detectors | None:
    """The detectors' registry (``antibackdoor.detectors``: ``DETECTORS`` and ``get_detector``), or None while
    no detectors package exists. A package that exists but fails to import is an error, not 'missing'."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("antibackdoor.detectors") is None:
        return None
    mod = importlib.import_module("antibackdoor.detectors")
    registry = getattr(mod, "DETECTORS", None)
    if registry is None:
        return None
    return Detectors(registry, getattr(mod, "get_detector", None))


def check_methods(cells: list[Cell], preset: str, strict: str | None = None,
                  ) -> tuple[list[Cell], dict[str, list[str]]]:
    """Keep the cells whose defense (and detector) exist and accept the cell's parameters; say what is not.

    ``strict`` (a user's grid file, named so): a method that is missing or rejects its parameters is an error
    naming the file, not a skipped cell -- a typo must not turn into a bench that runs nothing and exits 0.
    A named suite (``strict`` None) skips them: its methods may land later."""
    detectors = detector_registry()
    missing: dict[str, set[str]] = {}
    kept: list[Cell] = []
    verdict: dict[str, str | None] = {}
    for cell in cells:
        c = cell.config
        if c["attack"] != "none" and c["attack"] not in ATTACKS:
            raise ConfigError(f"{strict + ': ' if strict else ''}attack {c['attack']!r} is not registered; known: "
                              f"none, {', '.join(sorted(ATTACKS))}")
        key = json.dumps([c["defense"], c["defense_params"]], sort_keys=True, default=str)
        if key not in verdict:
            verdict[key], problem = _check_defense(c, preset, DEFENSES, detectors, get_defense, missing)
            if strict and problem:
                raise ConfigError(f"{strict}: defense {c['defense']}: {problem}")
        real = verdict[key]
        if real is None:
            continue
        c["defense"] = real
        det = _detector_of(c)
        if det is not None and detectors is not None:
            c["defense_params"]["detector"] = find_registered(det, detectors.registry) or det
        kept.append(cell)
    return kept, {k: sorted(v) for k, v in missing.items()}


def _grid_keys(exc: Exception, prefix: str) -> str:
    """An error about a part's parameters with its keys as a grid file spells them (``params.train``, not
    ``--defense-param train``)."""
    return str(exc).replace("--defense-param ", prefix).replace("--detector-param ", prefix)


def _detector_of(c: dict) -> str | None:
    return c["defense_params"].get("detector") if isinstance(c["defense_params"], dict) else None


def _check_defense(c: dict, preset: str, defenses: dict, detectors: Detectors | None, get_defense: Any,
                   missing: dict[str, set[str]]) -> tuple[str | None, str | None]:
    """The registered name of the cell's defense, or None after recording why in ``missing`` (for a suite's
    notes); and that reason as one sentence for a grid file's error."""
    real = find_registered(c["defense"], defenses)
    det = _detector_of(c)
    det_real = find_registered(det, detectors.registry) if det is not None and detectors is not None else None
    if det is not None and det_real is None:
        missing.setdefault("detectors not available yet", set()).add(det)
        if real is None:
            missing.setdefault("defenses not available yet", set()).add(c["defense"])
        known = ", ".join(sorted(detectors.registry)) if detectors is not None else "none (no detectors package)"
        return None, f"params.detector: {det!r} is not a registered detector; known: {known}"
    if real is None:
        missing.setdefault("defenses not available yet", set()).add(c["defense"])
        return None, f"{c['defense']!r} is not a registered defense; known: {', '.join(sorted(defenses))}"
    params = dict(c["defense_params"])
    if det_real is not None and detectors is not None:
        params["detector"] = det_real
        try:
            if detectors.get is not None:  # the detector's own parameters, checked on their own
                detectors.get(det_real, preset, params.get("detector_params") or None)
        except AntibackdoorError as exc:
            missing.setdefault("detectors that reject the suite's parameters", set()).add(f"{det_real} ({exc})")
            return None, f"detector {det_real}: {_grid_keys(exc, 'params.')}"
    try:
        get_defense(real, preset, params)
    except AntibackdoorError as exc:
        missing.setdefault("defenses that reject the suite's parameters", set()).add(f"{real} ({exc})")
        return None, _grid_keys(exc, "params.")
    return real, None


# -- the plan ----------------------------------------------------------------------------------------------
def index_runs(out: Path) -> dict[str, Path]:
    """Run id (the hash ending a run directory's name) -> directory, for every run under ``out``; a
    finished copy wins over an unfinished one."""
    found: dict[str, Path] = {}
    if not out.is_dir():
        return found
    for marker in ("status.json", "metrics.json"):
        for p in out.rglob(marker):
            d = p.parent
            if d.name == "checkpoints" or "-" not in d.name:
                continue
            rid = d.name.rsplit("-", 1)[-1]
            if rid not in found or (d / "metrics.json").is_file():
                found[rid] = d
    return found


class CellState(NamedTuple):
    state: str  # one of STATES
    error: str | None  # a failure's error
    shown: str  # as --status shows it: "interrupted (process 123 is gone)"


def read_state(run_dir: Path) -> str:
    """A run directory's state as the plan reads it (``runpath.run_state``, the one reader): ``done``,
    ``failed``, ``running``, ``interrupted``, ``interrupted (process N is gone)`` or ``pending`` (never started)."""
    s = run_state(run_dir)
    if s.state == "interrupted" and s.pid is not None and s.detail == f"process {s.pid} is gone":
        return s.text
    return s.state if s.state in ("done", "failed", "running", "interrupted") else "pending"


def cell_state(run_dir: Path) -> CellState:
    """A run directory's state (``read_state``) as the plan counts it: ``running`` while its process lives,
    ``interrupted`` when it was stopped or its process is gone, ``pending`` when it never started."""
    shown = read_state(run_dir)
    state = "interrupted" if shown.startswith("interrupted") else shown
    if state not in STATES:
        state = "pending"
    error = None
    if state == "failed":
        try:
            error = json.loads((run_dir / "status.json").read_text()).get("error")
        except (OSError, ValueError, AttributeError):
            error = None
    return CellState(state, error, shown)


def make_plan(grid: Grid, suite: Suite | None, out: Path, threads: int = 2) -> Plan:
    """Every cell resolved as ``antibackdoor run`` would, with where it is under ``out`` and its state.

    A user's grid file (``suite`` None) allows no gaps: a method that is missing or rejects its parameters, or
    a data set that does not load, is an error naming the file. A named suite skips those cells and says so
    (``Plan.skipped``): its methods may land later, its paper-size data sets may not be downloaded."""
    strict = None if suite is not None else grid.where
    every = grid.cells()
    cells, skipped = check_methods(every, grid.preset, strict)
    if not cells:
        raise ConfigError(_no_cells(grid, skipped))
    runs = index_runs(out)
    splits_cache: dict[tuple[str, str | None], Any] = {}
    planned: list[Planned] = []
    for cell in cells:
        cfg = make_config({**cell.config, "out": str(out / "runs")}, where=f"cell {_where(cell)}")
        exp = Experiment(cfg)
        dkey = (cfg.dataset, cfg.data_root)
        if dkey not in splits_cache:
            try:
                splits_cache[dkey] = exp.load_data()
            except DataError as exc:
                if strict:
                    raise ConfigError(f"{strict}: dataset {cfg.dataset}: {exc}") from exc
                splits_cache[dkey] = exc
        splits = splits_cache[dkey]
        if isinstance(splits, DataError):
            skipped.setdefault("datasets not available", []).append(f"{cfg.dataset} ({splits})")
            continue
        n = splits.train.num_classes
        if cfg.target >= n:
            raise ConfigError(f"cell {_where(cell)}: target {cfg.target} is not a class of {cfg.dataset} "
                              f"({n} classes)")
        exp.splits = splits
        try:  # the attack checks its rate, target and sample budget against the data here
            resolved = exp.resolve()
        except ConfigError as exc:
            raise ConfigError(f"cell {_where(cell)}: {exc}") from exc
        run_dir = exp.run_dir(resolved)
        rid = resolved.run_id()
        where = runs.get(rid, run_dir)
        st = cell_state(where) if where.exists() else CellState("pending", None, "pending")
        p = Planned(cell, run_dir.name, where, st.state, st.error, st.shown)
        cell.axes["model"] = resolved.model
        attack = resolved.attack.describe() if resolved.attack is not None else "none"
        p.group = json.dumps([cfg.dataset, attack, cfg.poison_rate, cfg.target, cfg.seed, resolved.model,
                              cfg.preset], sort_keys=True, default=str)
        p.passes, p.shared = est.cell_passes(resolved.defense.describe(), len(splits.train), len(splits.test),
                                             cfg.eval.ra_steps, resolved.defense.cached_stages)
        p.passes += resolved.defense.extra_passes(len(splits.train))  # what the defense's loops add (base.py)
        p.seconds_per_pass = est.seconds_per_pass(resolved.model, splits.train.channels,
                                                  splits.train.image_size, n, threads)
        if st.state == "done":
            p.measured_s = _measured(where)
        planned.append(p)
    for k in list(skipped):
        skipped[k] = sorted(set(skipped[k]))
    if not planned:
        raise ConfigError(_no_cells(grid, skipped))
    return Plan(grid.name, grid.preset, suite, grid, planned, skipped, len(every))


def _no_cells(grid: Grid, skipped: dict[str, list[str]]) -> str:
    """Why a grid has no cell to plan: everything excluded or filtered out, or (a suite) every method or data
    set unavailable. Never 'every cell is done' for no cells."""
    why = "; ".join(f"{reason}: {', '.join(sorted(set(what)))}" for reason, what in skipped.items())
    return f"{grid.where}: no cell to run ({why or 'exclude and the command-line filters leave none'})"


def _measured(run_dir: Path) -> float | None:
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if cache_hits(m):
        return None  # a cell that loaded a stage says little about what the estimate counts
    return m.get("time_total_s")


def _where(cell: Cell) -> str:
    a = cell.axes
    return f"{a['dataset']}/{a['attack']}/{a['defense']}/model={a['model']}/rate={a['poison_rate']}" \
           f"/target={a['target']}/seed={a['seed']}"


def estimate_plan(plan: Plan, todo: list[Planned], workers: int) -> tuple[float, str]:
    """Seconds the cells in ``todo`` should take with ``workers`` in parallel, and how that was judged.
    A shared stage (stage cache) is counted for the first cell that needs it only. Finished cells calibrate
    the count: a cell by the finished cells of its own defense where there are any (the count misses a
    different share of each defense's work), else by all finished cells."""
    paid = {(p.group, k) for p in plan.cells if p.state == "done" for k, _ in p.shared}
    measured: dict[str, list[tuple[float, float]]] = {}
    for p in plan.cells:
        if p.state == "done" and p.measured_s:
            measured.setdefault(_defense(p), []).append((p.measured_s, p.seconds_per_pass * p.passes))
    overall = est.calibration([m for ms in measured.values() for m in ms])
    own = {name: f for name, ms in measured.items() if (f := est.calibration(ms)) is not None}
    total, by_own, by_all = 0.0, set(), set()
    for p in todo:
        passes = p.passes
        for k, cost in p.shared:
            if (p.group, k) in paid:
                passes -= cost
            else:
                paid.add((p.group, k))
        name = _defense(p)
        (by_own if name in own else by_all).add(name)
        total += passes * p.seconds_per_pass * own.get(name, overall or 1.0)
    if overall is None:
        how = "from the quick cnn's speed on a 2-core CPU; attack preparation on first use not included"
    else:
        done = sum(len(ms) for ms in measured.values())
        parts = ([f"per defense: {', '.join(sorted(by_own))}"] if by_own else []) + \
                ([f"on all of them: {', '.join(sorted(by_all))}"] if by_all else [])
        how = f"calibrated on {done} finished cell(s) here" + (f" ({'; '.join(parts)})" if parts else "")
    return total / max(1, min(workers, len(todo) or 1)), how


def _defense(p: Planned) -> str:
    return str(p.cell.axes.get("defense_name", ""))


# -- running -----------------------------------------------------------------------------------------------
def interleave(cells: list[Planned]) -> list[Planned]:
    """Round-robin over groups (same poisoned data): concurrent workers then mostly train different
    backdoored models, instead of one waiting for the stage another is training."""
    groups: dict[str, list[Planned]] = {}
    for p in cells:
        groups.setdefault(p.group, []).append(p)
    out: list[Planned] = []
    lists = list(groups.values())
    while any(lists):
        for lst in lists:
            if lst:
                out.append(lst.pop(0))
    return out


def manifest_path(out: Path, plan: Plan) -> Path:
    return out / "bench" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', plan.name)}-{plan.preset}.json"


def write_manifest(out: Path, plan: Plan, extra: dict[str, Any] | None = None) -> Path:
    path = manifest_path(out, plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "name": plan.name, "suite": plan.suite.name if plan.suite else None, "preset": plan.preset,
        "updated": time.time(), "skipped": plan.skipped, "columns": plan.grid.columns,
        "cells": [{"run": os.path.relpath(p.run_dir, out), "axes": {k: v for k, v in p.cell.axes.items()
                                                                     if not k.startswith("_")},
                   "config": p.cell.config, "state": p.state, "error": p.error} for p in plan.cells],
        **(extra or {}),
    }
    write_json(path, data)
    return path


def print_status(plan: Plan, file: Any = None) -> None:
    file = file if file is not None else sys.stdout  # looked up now: sys.stdout may be replaced after import
    counts = {s: plan.count(s) for s in STATES}
    print(f"{plan.name} ({plan.preset}): {len(plan.cells)} cells: {counts['done']} done, {counts['failed']} failed, "
          f"{counts['running']} running, {counts['interrupted']} interrupted, {counts['pending']} pending", file=file)
    for p in plan.cells:
        if p.state in ("failed", "running", "interrupted"):
            extra = f": {p.error}" if p.error else ""
            print(f"  {p.shown or p.state}  {_where(p.cell)}  ({p.run_dir}){extra}", file=file)
    print_skipped(plan, file)


def print_skipped(plan: Plan, file: Any) -> None:
    """What a suite left out, and how many of its cells that was."""
    if not plan.skipped:
        return
    total = plan.total or len(plan.cells)
    print(f"  NOTE: {total - len(plan.cells)} of the suite's {total} cells are skipped and will not run:",
          file=file)
    for reason, what in plan.skipped.items():
        print(f"    {reason}: {', '.join(what)}", file=file)
