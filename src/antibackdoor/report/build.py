"""``antibackdoor report DIR``: report.md, results.csv and a self-contained report.html for a folder of runs.

Runs that a bench manifest lists are laid out as their suite's tables (the paper's layout, published
numbers beside ours); any other runs get a generic table per setting. Figures are written as PNG files
beside report.md and inlined into report.html, which therefore opens from disk with no network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bench.estimate import fmt_duration
from ..bench.stage_cache import cache_hits, saved_seconds
from ..bench.suites import SUITES, TableSpec
from ..caching import atomic_write
from ..errors import ConfigError
from . import figures as figs
from . import published
from .collect import Record, collect, isolation, target_guess
from .columns import Column, RunTable, expand, fmt, parse_columns, run_table, write_results_csv
from .html import png_data_uri, render
from .tables import Table, build, by_target, to_markdown


@dataclass
class Figure:
    name: str
    caption: str
    path: str  # relative to the report folder (Markdown)
    uri: str  # inline data URI (HTML)


@dataclass
class Section:
    title: str
    source: str = ""
    description: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    tables: list[tuple[Table, str]] = field(default_factory=list)  # (table, published source)
    figures: list[Figure] = field(default_factory=list)
    failures: list[Record] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: the target guesses the runs' defenses recorded (AIBD), one row per run (collect.target_guess)
    guesses: list[dict[str, Any]] = field(default_factory=list)
    #: one row per finished run with the columns the grid or --columns asked for (columns.py)
    runs: RunTable | None = None

    @property
    def guess_summary(self) -> str:
        """How often the guesses were right: on poisoned runs (the true target) and on clean ones (none)."""
        attacked = [g for g in self.guesses if not g["clean"]]
        clean = [g for g in self.guesses if g["clean"]]
        parts = []
        if attacked:
            declined = sum(g["called"] is None for g in attacked)
            parts.append(f"on poisoned data the guess was the true target in {sum(g['right'] for g in attacked)} "
                         f"of {len(attacked)} runs (no class called in {declined})")
        if clean:
            parts.append(f"on clean data no class was called in {sum(g['right'] for g in clean)} of {len(clean)}")
        text = "; ".join(parts)
        return text[:1].upper() + text[1:]

    @property
    def markdown_tables(self) -> list[tuple[Table, str, str]]:
        return [(t, to_markdown(t), src) for t, src in self.tables]


def _counts(records: list[Record]) -> dict[str, int]:
    out = {"done": 0, "failed": 0, "running": 0, "interrupted": 0, "pending": 0}
    for r in records:
        out[r.state] = out.get(r.state, 0) + 1
    out["total"] = len(records)
    out["unfinished"] = out["total"] - out["done"] - out["failed"]
    return out


def _defend_section(records: list[Record]) -> Section:
    """Runs of ``antibackdoor defend``: a user's own data, no attack, so no ASR and no two runs on the same
    footing; one row each (never averaged), pointing at the report each of them wrote."""
    sec = Section("defend runs", counts=_counts(records))
    sec.notes.append("Runs of `antibackdoor defend` on a user's own data: no attack, so no ASR, and nothing in "
                     "common to average over. One row each; each has its own report (report.html in its run "
                     "directory) with the ranking, the verdict and the images.")
    header = ["run", "data", "defense", "model", "state", "ACC (%)", "RA (%)", "isolated", "suspected target",
              "report"]
    rows = []
    for r in records:
        m = r.metrics
        surplus = m.get("surplus") if isinstance(m.get("surplus"), dict) else None
        if surplus is None:
            target = "–"
        elif surplus.get("target") is None:
            target = "none"
        else:
            names = {row.get("label"): row.get("name") for row in surplus.get("rows") or []}
            target = str(names.get(surplus["target"], surplus["target"]))
        isolated = f"{m['isolated']} of {m['train_size']}" if "isolated" in m and "train_size" in m else "–"
        page = r.run_dir / "report.html"
        rows.append([r.rel, str(r.axes.get("dataset")), str(r.axes.get("defense")),
                     str(r.axes.get("model") or "–"), r.state, fmt("acc", r.value("acc")), fmt("ra", r.value("ra")),
                     isolated, target, f"{r.rel}/report.html" if page.is_file() else "–"])
    sec.runs = RunTable("one row per defend run", header, rows, len(header) - 4)
    sec.failures = [r for r in records if r.state == "failed"]
    return sec


def _generic_specs(records: list[Record]) -> tuple[list[TableSpec], list[Record]]:
    """Tables for runs that no suite laid out: one block per setting (the dataset, model, preset and poison
    rate, where these vary). Clean-data runs have no rate: they are shown in every block of their setting."""
    def parts(r: Record) -> dict[str, str]:
        clean = r.axes.get("attack_name") == "none"
        return {"dataset": str(r.axes.get("dataset")), "model": str(r.axes.get("model") or r.config.get("model")),
                "preset": str(r.config.get("preset") or ""),
                "rate": "" if clean else f"rate {100 * float(r.axes.get('poison_rate') or 0):g}%"}

    keys = ("dataset", "model", "preset", "rate")
    varying = [k for k in keys if len({parts(r)[k] for r in records if parts(r)[k]}) > 1]
    rates = sorted({parts(r)["rate"] for r in records if parts(r)["rate"]}) or [""]
    table_records: list[Record] = []
    for r in records:
        p = parts(r)
        for rate in ([p["rate"]] if p["rate"] or "rate" not in varying else rates):
            q = {**p, "rate": rate}
            copy = Record(r.run_dir, r.rel, r.state, r.error, r.config, r.metrics, dict(r.axes), r.manifests, r.order)
            copy.axes["setting"] = " / ".join(q[k] for k in varying if q[k]) or "all runs"
            table_records.append(copy)
    blocks = "setting" if varying else None
    specs = [TableSpec("ACC / ASR / RA (%)", rows="attack", cols="defense", metrics=("acc", "asr", "ra"),
                       blocks=blocks, competitors="cols", reference=("none",), summary=("average", "worst"),
                       mark_failures=True),
             TableSpec("isolation: gamma / rho_vul / TPR / FPR (%)", rows="attack", cols="defense",
                       metrics=("gamma", "rho_vul", "tpr", "fpr"), blocks=blocks, isolating_only=True)]
    return specs, table_records


def _figures(kinds: tuple[str, ...], records: list[Record], folder: Path, prefix: str) -> tuple[list[Figure],
                                                                                                 list[Any]]:
    out: list[Figure] = []
    aucs: list[Any] = []
    makers = {
        "rate_curves": (figs.rate_curves, "ACC and ASR against the poison rate (AIBD Fig. 4)"),
        "score_hists": (figs.score_histograms, "Isolation scores per attack with the split threshold "
                                               "(A-ABL Fig. 4/9): one run per method and attack, lowest target"),
        "k_dist": (figs.k_distributions, "AIBD: PGD iterations k until the prediction flips, clean vs poisoned "
                                         "(AIBD Fig. 2)"),
        "roc": (None, "ROC curves of the isolation scores (one run per method and attack, lowest target)"),
        "target_surplus": (figs.target_surpluses, "Target guesses (AIBD's class-surplus test): each class among "
                                                  "the samples ranked highest, against the other classes' rate; "
                                                  "red = the guessed target (one run per method and attack, "
                                                  "lowest target)"),
    }
    for kind in kinds:
        fn, caption = makers[kind]
        if kind == "roc":
            fig, aucs = figs.roc_curves(records)
        else:
            fig = fn(records)
        if fig is None:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{prefix}-{kind}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        uri = png_data_uri(fig)  # closes the figure
        out.append(Figure(kind, caption, f"{folder.name}/{path.name}", uri))
    return out, aucs


def _auto_figures(records: list[Record]) -> tuple[str, ...]:
    kinds = []
    rates = {(r.axes.get("attack"), r.axes.get("defense")): set() for r in records}
    for r in records:
        rates[(r.axes.get("attack"), r.axes.get("defense"))].add(r.axes.get("poison_rate"))
    if any(len(v) > 1 for v in rates.values()):
        kinds.append("rate_curves")
    if any((r.run_dir / "isolation.csv").is_file() for r in records):
        kinds += ["score_hists", "roc"]
    if any(r.config.get("defense") == "aibd" for r in records):
        kinds.append("k_dist")
    return tuple(kinds)


def _section(title: str, records: list[Record], specs: list[TableSpec], fig_kinds: tuple[str, ...],
             folder: Path, prefix: str, source: str = "", description: str = "",
             skipped: dict[str, list[str]] | None = None, table_records: list[Record] | None = None,
             columns: list[Column] | None = None) -> Section:
    sec = Section(title, source, description, _counts(records), skipped or {})
    sec.runs = run_table(columns or [], records)
    sec.guesses = [g for r in records if (g := target_guess(r)) is not None]
    if sec.guesses and "target_surplus" not in fig_kinds:
        fig_kinds = (*fig_kinds, "target_surplus")
    for spec in specs:
        src, pub = published.load(spec.published) if spec.published else ("", {})
        for t in build(spec, table_records or records, pub):
            sec.tables.append((t, src if t.has_paper else ""))
    sec.figures, aucs = _figures(fig_kinds, records, folder, prefix)
    if aucs:
        for a in aucs:
            a["record"].metrics["auc"] = a["auc"]
        spec = TableSpec("ROC AUC of the isolation scores (×100)", rows="attack", cols="defense", metrics=("auc",),
                         competitors="cols")
        for t in build(spec, [a["record"] for a in aucs]):
            sec.tables.append((t, ""))
    spread = by_target(records, specs[0].metrics[:3]) if specs else None  # the suite's own metrics
    if spread is not None:
        sec.tables.append((spread, ""))
    sec.failures = [r for r in records if r.state == "failed"]
    return sec


def write_report(root: str | Path, title: str | None = None, columns: str | list[Any] | None = None,
                 ) -> dict[str, Path]:
    """Write report.md, results.csv, report.html (and report_files/*.png) into ``root``; returns the paths.

    ``columns`` (``--columns``: dotted paths, see columns.py) gives every section a per-run table with those
    columns, in place of the ones a grid's manifest names; results.csv gets them as extra columns."""
    asked = parse_columns(columns) if columns else None
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder")
    records, manifests = collect(root)
    if not records:
        raise ConfigError(f"{root}: holds no run directories (nothing to report)")
    folder = root / "report_files"
    sections: list[Section] = []
    extra: list[Column] = []
    for m in manifests:
        key = f"{m['name']}-{m['preset']}"
        recs = [r for r in records if key in r.manifests]
        cols = asked if asked is not None else parse_columns(m.get("columns") or [], f"{key}: columns")
        extra += [c for c in expand(cols, recs) if c.path not in {e.path for e in extra}]
        suite = SUITES.get(m.get("suite") or "")
        if suite is not None:
            sections.append(_section(f"{suite.name} ({m['preset']}): {suite.title}", recs, list(suite.tables),
                                     suite.figures, folder, key, suite.source, suite.description, m.get("skipped"),
                                     columns=cols))
        else:
            specs, trecs = _generic_specs(recs)
            sections.append(_section(f"grid {m['name']} ({m['preset']})", recs, specs, _auto_figures(recs), folder,
                                     key, skipped=m.get("skipped"), table_records=trecs, columns=cols))
    defended = [r for r in records if r.is_defend]
    rest = [r for r in records if not r.manifests and not r.is_defend]
    if rest:
        specs, trecs = _generic_specs(rest)
        extra += [c for c in expand(asked or [], rest) if c.path not in {e.path for e in extra}]
        sections.append(_section("runs not in a bench manifest" if manifests else "runs", rest, specs,
                                 _auto_figures(rest), folder, "runs", table_records=trecs, columns=asked))
    if defended:
        sections.append(_defend_section(defended))
    csv_path = write_results_csv(records, root / "results.csv", extra)
    done = [r for r in records if r.state == "done"]
    hits = [e for r in done for e in cache_hits(r.metrics)]
    context = {
        "title": title or f"antibackdoor report: {root.name}",
        "root": root.name, "generated": time.strftime("%Y-%m-%d %H:%M"), "sections": sections,
        "counts": _counts(records),
        "compute": fmt_duration(sum(float(r.metrics.get("time_total_s") or 0) for r in done)),
        "saved": fmt_duration(saved_seconds(hits)), "cache_hits": len(hits),
    }
    md = root / "report.md"
    html = root / "report.html"
    _write(md, render("report.md.j2", **context))
    _write(html, render("report.html.j2", **context))
    return {"markdown": md, "html": html, "csv": csv_path}


def _write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


__all__ = ["isolation", "write_report"]
