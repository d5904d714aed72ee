"""Tables in the papers' layouts: rows x column groups x metrics, mean ± std over seeds and targets, Average
and Worst-case rows, the best competitor per metric in bold, defense failures (ASR > 90 %) marked, and the
published numbers beside ours."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from ..bench.labels import part_label
from ..bench.suites import TableSpec
from .collect import Record

HIGHER_BETTER = {"acc", "ra", "tpr", "gamma", "auc"}
METRIC_NAMES = {"acc": "ACC", "asr": "ASR", "ra": "RA", "gamma": "γ", "rho_vul": "ρ_vul", "tpr": "TPR",
                "fpr": "FPR", "auc": "AUC"}
FAIL_ASR = 90.0
SUMMARY_LABELS = {"average": "Average", "worst": "Worst case"}


@dataclass
class TCell:
    mean: float | None = None
    std: float | None = None
    n: int = 0
    paper: float | None = None
    bold: bool = False
    fail: bool = False
    #: every run of the cell is split-only and this is a metric of the final model, which none of them trained
    na: bool = False

    def text(self) -> str:
        if self.mean is None:
            return "n/a" if self.na else "–"
        s = f"{self.mean:.1f}"
        if self.n > 1 and self.std is not None:
            s += f" ± {self.std:.1f}"
        return s

    def paper_text(self) -> str:
        return "" if self.paper is None else f"{self.paper:.2f}"


@dataclass
class Row:
    label: str
    kind: str  # "data" or "summary"
    cells: list[list[TCell]]  # [group][metric]


@dataclass
class Table:
    title: str
    row_axis: str
    groups: list[str]
    metrics: list[str]
    rows: list[Row]
    block: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def has_paper(self) -> bool:
        return any(c.paper is not None for r in self.rows for g in r.cells for c in g)

    @property
    def metric_names(self) -> list[str]:
        return [METRIC_NAMES.get(m, m) for m in self.metrics]


def axis_label(axis: str, value: Any) -> str:
    if value is None:
        return "default"
    if axis == "poison_rate":
        return f"{100 * float(value):g}%"
    if axis == "model":
        return part_label("model", str(value))
    if axis == "target":
        return f"target {value}"
    return str(value)


def join_key(axis: str, value: Any) -> str:
    """How the published data files name an axis value."""
    if axis == "dataset":
        return part_label("dataset", str(value))
    return axis_label(axis, value)


def _ordered(values: list[Any], axis: str) -> list[Any]:
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    if axis in ("poison_rate", "target", "seed"):
        return sorted(seen, key=lambda v: (v is None, v if v is not None else 0))
    return seen


def _stats(values: list[float]) -> tuple[float | None, float | None, int]:
    if not values:
        return None, None, 0
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std, len(values)


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if metric in HIGHER_BETTER else a < b


def build(spec: TableSpec, records: list[Record], published: dict[tuple, float] | None = None) -> list[Table]:
    """One Table per block value (or one without blocks) from the finished records."""
    recs = [r for r in records if r.state == "done"]
    if spec.isolating_only:
        isolating = {r.axes.get("defense") for r in recs if (r.metrics.get("isolated") or 0) > 0}
        recs = [r for r in recs if r.axes.get("defense") in isolating]
    blocks = _ordered([r.axes.get(spec.blocks) for r in recs], spec.blocks) if spec.blocks else [None]
    tables = []
    for b in blocks:
        rs = [r for r in recs if b is None or r.axes.get(spec.blocks) == b]
        if rs:
            tables.append(_one(spec, rs, b, published or {}))
    return tables


def _one(spec: TableSpec, rs: list[Record], block: Any, published: dict[tuple, float]) -> Table:
    row_vals = _ordered([r.axes.get(spec.rows) for r in rs], spec.rows)
    col_vals = _ordered([r.axes.get(spec.cols) for r in rs], spec.cols)
    metrics = list(spec.metrics)
    by = {}
    for r in rs:
        by.setdefault((r.axes.get(spec.rows), r.axes.get(spec.cols)), []).append(r)
    clean_rows = {rv for rv in row_vals if all(r.axes.get("attack_name") == "none"
                                               for (rv2, _), lst in by.items() if rv2 == rv for r in lst)}
    if spec.rows != "attack":
        clean_rows = set()

    def dataset_of(lst: list[Record]) -> str | None:
        names = {join_key("dataset", r.axes.get("dataset")) for r in lst}
        return names.pop() if len(names) == 1 else None

    rows: list[Row] = []
    for rv in row_vals:
        cells = []
        for cv in col_vals:
            lst = by.get((rv, cv), [])
            group = []
            for m in metrics:
                mean, std, n = _stats([100 * v for v in (r.value(m) for r in lst) if v is not None])
                ds = dataset_of(lst) if lst else None
                paper = published.get((ds, join_key(spec.rows, rv), join_key(spec.cols, cv), m))
                group.append(TCell(mean, std, n, paper, na=_all_na(lst, m)))
            cells.append(group)
        rows.append(Row(axis_label(spec.rows, rv), "data", cells))
    groups = [axis_label(spec.cols, cv) for cv in col_vals]
    ds_block = dataset_of(rs)
    data_rows = [row for row, rv in zip(rows, row_vals, strict=True) if rv not in clean_rows]
    if spec.summary and spec.summary_axis == "rows" and data_rows:
        for kind in spec.summary:
            cells = []
            for gi in range(len(col_vals)):
                group = []
                for mi, m in enumerate(metrics):
                    vals = [row.cells[gi][mi].mean for row in data_rows if row.cells[gi][mi].mean is not None]
                    v = _summary(kind, m, vals)
                    paper = published.get((ds_block, SUMMARY_LABELS[kind], join_key(spec.cols, col_vals[gi]), m))
                    group.append(TCell(v, None, 1 if v is not None else 0, paper))
                cells.append(group)
            rows.append(Row(SUMMARY_LABELS[kind], "summary", cells))
    if spec.summary and spec.summary_axis == "cols":
        for kind in spec.summary:
            for row, rv in zip(rows, row_vals, strict=False):
                group = []
                for mi, m in enumerate(metrics):
                    vals = [g[mi].mean for g in row.cells if g[mi].mean is not None]
                    v = _summary(kind, m, vals)
                    paper = published.get((ds_block, join_key(spec.rows, rv), SUMMARY_LABELS[kind], m))
                    group.append(TCell(v, None, 1 if v is not None else 0, paper))
                row.cells.append(group)
            groups.append(SUMMARY_LABELS[kind])
    refs = _references(spec, rs)
    _mark(spec, rows, groups, metrics, {axis_label(spec.cols if spec.competitors == "cols" else spec.rows, v)
                                        for v in refs})
    title = spec.title if block is None else f"{spec.title} — {axis_label(spec.blocks, block)}"
    return Table(title, spec.rows, groups, metrics, rows, block=None if block is None else str(block))


def _all_na(records: list[Record], metric: str) -> bool:
    return bool(records) and all(r.not_applicable(metric) for r in records)


def _summary(kind: str, metric: str, vals: list[float]) -> float | None:
    if not vals:
        return None
    if kind == "average":
        return statistics.fmean(vals)
    return min(vals) if metric in HIGHER_BETTER else max(vals)


def _references(spec: TableSpec, records: list[Record]) -> set[Any]:
    """Values of the competing axis that are references, not competitors: those whose every run used a
    defense named in ``spec.reference`` (``none``) -- recognised by the registered name, so a grid that labels
    ``none`` "baseline" still keeps it out of the bold marks."""
    if spec.competitors not in ("cols", "rows") or not spec.reference:
        return set()
    axis = spec.cols if spec.competitors == "cols" else spec.rows
    names: dict[Any, set[str]] = {}
    for r in records:
        names.setdefault(r.axes.get(axis), set()).add(str(r.axes.get("defense_name") or r.config.get("defense")))
    return {v for v, ns in names.items() if ns <= set(spec.reference)}


def _mark(spec: TableSpec, rows: list[Row], groups: list[str], metrics: list[str], ref: set[str]) -> None:
    for row in rows:
        for group in row.cells:
            for mi, m in enumerate(metrics):
                c = group[mi]
                c.fail = bool(spec.mark_failures and m == "asr" and c.mean is not None and c.mean > FAIL_ASR)
    if spec.competitors == "cols":
        for row in rows:
            for mi, m in enumerate(metrics):
                _bold([row.cells[gi][mi] for gi, g in enumerate(groups) if g not in ref], m)
    elif spec.competitors == "rows":
        for gi in range(len(groups)):
            for mi, m in enumerate(metrics):
                _bold([row.cells[gi][mi] for row in rows if row.label not in ref], m)


def _bold(cells: list[TCell], metric: str) -> None:
    have = [c for c in cells if c.mean is not None]
    if len(have) < 2:
        return
    best = have[0].mean
    for c in have[1:]:
        if _better(metric, c.mean, best):
            best = c.mean
    for c in have:
        c.bold = math.isclose(c.mean, best, abs_tol=1e-9)


def by_target(records: list[Record], metrics: tuple[str, ...] = ("acc", "asr")) -> Table | None:
    """The spread over targets: one row per (dataset, attack, defense, rate, model), one group per target."""
    recs = [r for r in records if r.state == "done" and r.axes.get("attack_name") != "none"]
    targets = _ordered([r.axes.get("target") for r in recs], "target")
    if len(targets) < 2:
        return None
    keys = ("dataset", "attack", "defense", "model", "poison_rate")
    varying = [k for k in keys if len({str(r.axes.get(k)) for r in recs}) > 1] or ["attack", "defense"]
    by: dict[tuple, dict[Any, list[Record]]] = {}
    for r in recs:
        by.setdefault(tuple(r.axes.get(k) for k in varying), {}).setdefault(r.axes.get("target"), []).append(r)
    rows = []
    for key, per_t in by.items():
        cells = []
        for t in targets:
            lst = per_t.get(t, [])
            cells.append([TCell(*_stats([100 * v for v in (r.value(m) for r in lst) if v is not None]),
                                na=_all_na(lst, m)) for m in metrics])
        label = " / ".join(axis_label(k, v) for k, v in zip(varying, key, strict=True))
        rows.append(Row(label, "data", cells))
    for row in rows:
        for g in row.cells:
            for mi, m in enumerate(metrics):
                g[mi].fail = m == "asr" and g[mi].mean is not None and g[mi].mean > FAIL_ASR
    return Table("Spread over targets (mean over seeds; class 0 is special, so one target can mislead)",
                 " / ".join(varying), [axis_label("target", t) for t in targets], list(metrics), rows)


def to_markdown(t: Table) -> str:
    """A GitHub Markdown table: bold = best, ✗ = failure (ASR > 90 %), [x] = published value."""
    head = [t.row_axis] + [f"{g} {mn}" if len(t.metrics) > 1 else g for g in t.groups for mn in t.metric_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in t.rows:
        label = f"*{row.label}*" if row.kind == "summary" else row.label
        out = [label]
        for group in row.cells:
            for c in group:
                s = c.text()
                if c.bold and c.mean is not None:
                    s = f"**{s}**"
                if c.fail:
                    s += " ✗"
                if c.paper is not None:
                    s += f" [{c.paper_text()}]"
                out.append(s)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)
