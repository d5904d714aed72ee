"""``defend``'s report: report.md and a self-contained report.html (figures inline, no network), from one
context dict rendered by two Jinja2 templates, plus the figures as PNG files beside them.

What a practitioner reads first is the verdict (is there a class with a surplus of isolated samples, and how
sure), then the 32 most suspicious images; below: the per-class table, the score histogram with the
threshold, accuracy on the evaluation set (named for what it is), the defense's assumptions and decisions.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..caching import atomic_write
from ..defenses.base import DefenseResult
from ..plots import class_surplus_figure, plt
from ..surplus import TargetGuess, fmt_p
from .analysis import Findings
from .prepare import DEFAULT_DEFENSE_WHY, DefendConfig, DefendSetup

GRID = 32
MAX_BAD_LISTED = 500
TEMPLATES = Path(__file__).parent / "templates"


# -- wording ------------------------------------------------------------------------------------------------
def evidence_word(p: float) -> str:
    if p < 1e-6:
        return "very strong"
    if p < 1e-3:
        return "strong"
    if p < 0.01:
        return "clear"
    if p < 0.05:
        return "weak (not enough to call)"
    return "none"


def pct(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.{digits}f} %"


def verdict(surplus, defense: str, isolated: int, inspected: int, unranked: str = "") -> dict[str, str]:
    """The headline: whether a class is over-represented at the top of the ranking, which, and how sure. No
    ranking (``surplus`` None, ``unranked`` says why): no verdict, whatever was isolated."""
    if surplus is None:
        return {"kind": "unranked", "title": "No verdict: the samples have no ranking to test",
                "text": f"{unranked or defense + ' ranks no sample'}, so there is no order of suspicion in which "
                        f"a class could stand out; {defense} isolated {isolated} of the {inspected} samples it "
                        "inspected. This run says nothing about whether the data carries a backdoor. To inspect "
                        "the data, run a defense or a detector that scores every sample (antibackdoor defenses, "
                        "antibackdoor detectors)."}
    rows = {r.label: r for r in surplus.rows}
    classes = sum(1 for x in surplus.rows if x.samples)
    if isolated == 0 and surplus.target is None:
        return {"kind": "none", "title": "Nothing isolated",
                "text": f"{defense} isolated no sample of the {inspected} it inspected, and no class is "
                        "over-represented at the top of its ranking. This is no proof that the data is clean: see "
                        "what the defense assumed."}
    if surplus.target is not None:
        r = rows[surplus.target]
        if r.expected > 0:
            rate = f"the other classes' rate gives {r.expected:.0f} ({r.flagged / r.expected:.1f}x)"
        else:  # no sample of another class is among them: a ratio would divide by zero
            rate = "no sample of another class is among them"
        return {"kind": "target", "title": f"Backdoor suspected: class {r.name!r} has a surplus",
                "text": f"Class {r.name!r} (label {r.label}) holds {r.flagged} of the {surplus.flagged} most "
                        f"suspicious samples ({pct(r.flagged_share)}) but {pct(r.share)} of the data: {rate}, "
                        f"more than their spread allows "
                        f"(p = {fmt_p(r.p_adjusted)}, adjusted for {len(surplus.depths)} depths of the ranking and "
                        f"{classes} classes; evidence: {evidence_word(r.p_adjusted)}). A backdoor's target class "
                        f"looks like this. {defense} isolated {isolated} of {inspected} samples "
                        f"({pct(isolated / inspected)}). Look at the most suspicious samples first (the grid "
                        "below, suspicious.csv)."}
    text = (f"{defense} isolated {isolated} of {inspected} samples ({pct(isolated / inspected)}). No class is "
            "over-represented among the most suspicious samples beyond the spread the classes show among "
            "themselves")
    if surplus.best is not None:
        r = rows[surplus.best]
        text += (f" (the most over-represented, {r.name!r}, holds {r.flagged} of the top {surplus.flagged} "
                 f"({pct(r.flagged_share)}) against {pct(r.share)} of the data; p = {fmt_p(r.p_adjusted)})")
    text += (". A defense isolates samples from clean data too; this is what that looks like, not evidence of a "
             "backdoor. It is no proof of clean data either: a trigger the defense's criterion does not rank "
             "high would not show here (see what the defense assumed).")
    return {"kind": "clean", "title": "No class has a surplus among the most suspicious samples", "text": text}


# -- figures ------------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def class_figure(surplus) -> bytes:

    return _png(class_surplus_figure(surplus))


def target_figure(guess: TargetGuess) -> bytes:
    """The per-class surplus behind a defense's target guess (AIBD's target filter) as bars."""
    return _png(class_surplus_figure(guess.surplus, title=guess.title()))


def grid_figure(images: list[np.ndarray], captions: list[str], marks: list[bool]) -> bytes:

    cols = 8
    nrows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * 1.45, nrows * 1.75), dpi=110, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, cap, mark in zip(axes.ravel(), images, captions, marks, strict=False):
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  interpolation="nearest", vmin=0, vmax=255)
        ax.set_title(cap, fontsize=6.5, color="tab:red" if mark else "black")
    fig.tight_layout()
    return _png(fig)


def thumbnail(img: np.ndarray, px: int = 96) -> str:
    """One image as an inline PNG data URI, enlarged without smoothing."""
    from PIL import Image

    im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    scale = max(1, px // max(im.size))
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


# -- the report ---------------------------------------------------------------------------------------------
def build_context(run_dir: Path, setup: DefendSetup, result: DefenseResult, findings: Findings,
                  metrics: dict[str, Any], trained: bool = True) -> dict[str, Any]:
    """Everything the two templates show. ``trained`` False: no stage trained the returned model (split
    only), so there is neither a measurement nor a model file to speak of."""
    c, data = setup.config, setup.data
    train = data.train
    classes = train.classes
    rows, index = setup.rows, setup.index
    y = train.y.numpy()[rows]
    surplus = findings.surplus
    isolated = findings.isolated
    n_iso, n = int(isolated.sum()), len(rows)
    poison = setup.poison_rows

    figures: dict[str, bytes] = {}
    if findings.scores is not None:  # drawn by the shared path (runpath) with the same ground truth
        figures["hist"] = (run_dir / "scores_hist.png").read_bytes()
    if surplus is not None:  # no ranking, no test to draw
        figures["classes"] = class_figure(surplus)
        (run_dir / "isolated_per_class.png").write_bytes(figures["classes"])
    guess = TargetGuess.from_info(result.info)  # AIBD's own target guess (its target filter), where recorded
    if guess is not None:
        figures["target"] = target_figure(guess)
        (run_dir / "target_surplus.png").write_bytes(figures["target"])

    top = findings.order[:GRID]
    grid = []
    images, captions, marks = [], [], []
    x = train.x
    for rank, r in enumerate(top, start=1):
        img = x[int(rows[r])].permute(1, 2, 0).numpy()
        s = int(findings.suggested[r])
        file = data.sources[int(rows[r])] if data.sources else ""
        entry = {
            "rank": rank, "index": int(index[r]), "file": file, "file_short": short_name(file),
            "label": classes[int(y[r])],
            "score": f"{findings.scores[r]:.4g}" if findings.scores is not None else "-",
            "isolated": bool(isolated[r]), "suggested": classes[s] if s >= 0 else "",
            "poisoned": None if poison is None else bool(poison[r]), "src": thumbnail(img),
        }
        grid.append(entry)
        images.append(img)
        captions.append(f"#{rank} {entry['label'][:10]}\n{entry['score']}" + (f" ->{entry['suggested'][:8]}"
                                                                             if entry["suggested"] else ""))
        marks.append(bool(poison[r]) if poison is not None else False)
    figures["grid"] = grid_figure(images, captions, marks)
    (run_dir / "suspicious_grid.png").write_bytes(figures["grid"])

    info = {k: v for k, v in result.info.items() if isinstance(v, int | float | str | bool) or v is None}
    mask = metrics.get("mask")
    bad = [{"path": b.path, "reason": b.reason, "index": "" if b.index is None else b.index} for b in data.bad]
    eval_label = metrics.get("eval_set") if trained else NOT_TRAINED
    return {
        "title": f"antibackdoor defend: {c.data}",
        "config": c, "data": data, "defense": c.defense, "model": setup.model, "preset": c.preset,
        "defense_why": DEFAULT_DEFENSE_WHY if c.defense == DefendConfig.defense else "named with --defense",
        "precision": setup.precision.describe(),
        "verdict": verdict(surplus, c.defense, n_iso, n, findings.unranked),
        "warnings": findings.warnings,
        "surplus": surplus, "alpha": surplus.alpha if surplus else None,
        "depths": ", ".join(map(str, surplus.depths)) if surplus else "",
        "rows": _class_rows(surplus) if surplus is not None else _count_rows(y, isolated, classes),
        "n_inspected": n, "n_isolated": n_iso, "isolated_pct": pct(n_iso / n if n else 0.0),
        "n_data": data.num_indexed, "n_samples": len(train), "heldout": int(setup.heldout.sum()),
        "image": f"{train.image_size}x{train.image_size}, {train.channels} channel(s)",
        "classes": classes, "bad": bad[:MAX_BAD_LISTED], "bad_more": max(0, len(bad) - MAX_BAD_LISTED),
        "n_bad": len(bad), "notes": data.notes,
        "grid": grid, "score_name": result.score_name or "score",
        "higher": "higher" if result.higher_is_suspicious else "lower",
        "threshold": result.info.get("threshold"),
        "eval_label": eval_label, "acc": pct(metrics.get("acc")), "ra": pct(metrics.get("ra")),
        "ra_desc": f"PGD-{c.eval.ra_steps}, eps {c.eval.ra_eps * 255:.0f}/255",
        "has_eval": metrics.get("acc") is not None, "has_model": trained,
        "mask": mask, "mask_rows": _mask_rows(mask) if mask else [],
        "guess": None if guess is None else {
            "target": guess.target, "best": guess.best, "p": fmt_p(guess.surplus.p), "alpha": guess.surplus.alpha,
            "filter": guess.filter_state, "text": guess.text(), "depth": guess.surplus.flagged,
            "depths": ", ".join(map(str, guess.surplus.depths)),
            "rows": [{"name": r.name, "label": r.label, "flagged": r.flagged, "expected": f"{r.expected:.1f}",
                      "p": fmt_p(r.p_adjusted), "is_target": r.label == guess.surplus.target}
                     for r in guess.surplus.rows]},
        "assumptions": list(getattr(setup.defense, "assumptions", ()) or ()),
        "info": info, "params": setup.defense.describe(),
        "trusted_note": _trusted_note(setup),
        "figures": {k: data_uri(v) for k, v in figures.items()},
        "has_hist": "hist" in figures,
        "time": metrics.get("time_defense_s"),
    }


def _class_rows(surplus) -> list[dict[str, Any]]:
    """The class table with the surplus test's columns."""
    return [{**r.__dict__, "share_pct": pct(r.share), "flagged_pct": pct(r.flagged_share),
             "ratio": f"{r.flagged / r.expected:.2f}" if r.expected > 0 else "-",
             "p_exact_s": fmt_p(r.p_exact), "p_adj_s": fmt_p(r.p_adjusted),
             "is_target": r.label == surplus.target} for r in surplus.rows]


def _count_rows(y: np.ndarray, isolated: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    """The class table without a ranking: samples, share of the data and isolated per class."""
    n = np.bincount(y, minlength=len(classes))
    iso = np.bincount(y[isolated.astype(bool)], minlength=len(classes))
    total = max(int(n.sum()), 1)
    return [{"label": c, "name": name, "samples": int(n[c]), "share_pct": pct(n[c] / total), "isolated": int(iso[c]),
             "is_target": False} for c, name in enumerate(classes)]


#: the most characters of a file name a grid caption shows (the whole name is the caption's tooltip): the
#: captions sit side by side, about 26 characters wide
CAPTION_CHARS = 40


def short_name(path: str, width: int = CAPTION_CHARS) -> str:
    """``path`` in at most ``width`` characters: its start and its end around an ellipsis (the class folder
    and the file name's end are what tell files apart)."""
    if len(path) <= width:
        return path
    head = (width - 1) // 3
    return path[:head] + "\u2026" + path[len(path) - (width - 1 - head):]


#: what the report says instead of a measurement when no stage trained the returned model
NOT_TRAINED = ("no stage trained the returned model (split only: e.g. final.epochs=0), so nothing is measured "
               "and no model.safetensors is written; the ranking and the kept indices are the result")


def _trusted_note(setup: DefendSetup) -> str:
    if setup.trusted is None:
        return ""
    if setup.uses_trusted:
        return f"The defense used the {len(setup.trusted)} trusted images given with --trusted."
    return (f"--trusted gave {len(setup.trusted)} images; {setup.config.defense} does not use trusted data"
            + (" (they serve as the evaluation set)." if setup.eval.kind == "trusted" else "."))


def _mask_rows(m: dict) -> list[tuple[str, str]]:
    rows = [("poisoned samples inspected (from --poison-mask)", str(m["poisoned"])),
            ("isolated: poisoned (TP) / clean (FP)", f"{m['tp']} / {m['fp']}"),
            ("kept: poisoned (FN) / clean (TN)", f"{m['fn']} / {m['tn']}"),
            ("TPR (poisoned isolated)", pct(m["tpr"])), ("FPR (clean isolated)", pct(m["fpr"])),
            ("precision of the isolated set", pct(m["precision"])),
            ("ROC AUC of the ranking", f"{m['auc']:.3f}" if not math.isnan(m["auc"]) else "-"),
            ("ROC AUC of the raw score", f"{m['auc_score']:.3f}" if not math.isnan(m["auc_score"]) else "-")]
    for k in (100, 500):
        if f"precision_at_{k}" in m:
            rows.append((f"precision of the top {k}", pct(m[f"precision_at_{k}"])))
    if not math.isnan(m.get("precision_at_poisoned", float("nan"))):
        rows.append((f"precision of the top {m['poisoned']} (as many as are poisoned)",
                     pct(m["precision_at_poisoned"])))
    if "heldout_poisoned" in m:
        rows.append(("held-out slice: accuracy on its clean samples", pct(m["heldout_clean_acc"])))
        rows.append((f"held-out slice: its {m['heldout_poisoned']} poisoned samples given their poisoned label",
                     pct(m["heldout_poisoned_given_label"])))
    return rows


def write_report(run_dir: Path, setup: DefendSetup, result: DefenseResult, findings: Findings,
                 metrics: dict[str, Any], trained: bool = True) -> tuple[Path, Path]:
    """report.html and report.md (and the figures beside them) from what the run resolved and found."""
    import jinja2

    ctx = build_context(run_dir, setup, result, findings, metrics, trained)
    loader = jinja2.FileSystemLoader(str(TEMPLATES))
    html_env = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined,
                                  trim_blocks=True, lstrip_blocks=True)
    md_env = jinja2.Environment(loader=loader, autoescape=False, undefined=jinja2.StrictUndefined,
                                trim_blocks=True, lstrip_blocks=True)
    md_env.filters["cell"] = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    html = html_env.get_template("defend_report.html.j2").render(**ctx)
    md = md_env.get_template("defend_report.md.j2").render(**ctx)
    paths = run_dir / "report.html", run_dir / "report.md"
    for path, text in zip(paths, (html, md), strict=True):
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    return paths


__all__ = ["CAPTION_CHARS", "build_context", "evidence_word", "short_name", "target_figure", "verdict",
           "write_report"]
