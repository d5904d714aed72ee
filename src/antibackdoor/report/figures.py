"""The report's figures (matplotlib, headless): ACC/ASR against the poison rate (AIBD Fig. 4), per-attack
score histograms with thresholds in one grid (A-ABL Fig. 4/9), AIBD's flip-count distributions (Fig. 2), the
per-class surplus behind AIBD's target guesses and ROC curves of every isolation score. Each function returns a
figure, or None when the records hold nothing to draw."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..metrics import roc_auc, roc_curve_points, suspicion
from ..plots import class_surplus_figure, plt  # plots selects the headless backend before pyplot loads
from .collect import Record, isolation, target_guess

MAX_PANELS = 48


def _done(records: list[Record]) -> list[Record]:
    return [r for r in records if r.state == "done"]


def _grid(n: int, ncols: int = 4, w: float = 3.4, h: float = 2.6) -> tuple[Any, list[Any]]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), dpi=100, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def representatives(records: list[Record], need_scores: bool = True) -> dict[tuple[str, str], Record]:
    """One run per (defense, attack) for per-sample figures: the lowest target, then seed, with scores."""
    out: dict[tuple[str, str], Record] = {}
    for r in sorted(_done(records), key=lambda r: (r.axes.get("target") or 0, r.axes.get("seed") or 0,
                                                   r.axes.get("poison_rate") or 0)):
        if r.axes.get("attack_name") == "none" and need_scores:
            continue
        key = (str(r.axes.get("defense")), str(r.axes.get("attack")))
        if key in out:
            continue
        if need_scores and not (r.run_dir / "isolation.csv").is_file():
            continue
        out[key] = r
    return out


def rate_curves(records: list[Record]) -> Any | None:
    """ACC and ASR (mean ± std over seeds and targets) against the poison rate, one line per attack
    (and defense, where several)."""
    recs = [r for r in _done(records) if r.axes.get("attack_name") != "none"]
    series: dict[str, dict[float, list[Record]]] = {}
    defenses = {r.axes.get("defense") for r in recs}
    for r in recs:
        name = str(r.axes.get("attack")) + (f" / {r.axes.get('defense')}" if len(defenses) > 1 else "")
        series.setdefault(name, {}).setdefault(float(r.axes.get("poison_rate")), []).append(r)
    series = {k: v for k, v in series.items() if len(v) >= 2}
    if not series:
        return None
    metrics = [m for m in ("acc", "asr", "ra") if any(r.value(m) is not None for r in recs)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.4), dpi=100, squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for name, per_rate in series.items():
            rates = sorted(per_rate)
            vals = [[100 * v for v in (r.value(m) for r in per_rate[x]) if v is not None] for x in rates]
            xs = [100 * x for x, v in zip(rates, vals, strict=True) if v]
            mean = [float(np.mean(v)) for v in vals if v]
            std = [float(np.std(v)) for v in vals if v]
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=name)
        ax.set_xlabel("poison rate (%)")
        ax.set_ylabel(f"{m.upper()} (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("ACC / ASR against the poison rate (mean ± std over seeds and targets)", fontsize=10)
    fig.tight_layout()
    return fig


def score_histograms(records: list[Record]) -> Any | None:
    """Per attack (and defense): the isolation scores of clean vs poisoned samples with the threshold."""
    reps = [(k, r, iso) for k, r in representatives(records).items() if (iso := isolation(r)) is not None]
    reps = reps[:MAX_PANELS]
    if not reps:
        return None
    fig, axes = _grid(len(reps))
    for ax, ((defense, attack), r, iso) in zip(axes, reps, strict=True):
        s, p = iso["scores"], iso["poison"]
        hi = s.max() if s.max() > s.min() else s.min() + 1
        bins = np.linspace(s.min(), hi, 50)
        ax.hist(s[~p], bins=bins, alpha=0.6, color="tab:blue", label="clean")
        if p.any():
            ax.hist(s[p], bins=bins, alpha=0.7, color="tab:red", label="poisoned")
        if iso["threshold"] is not None:
            ax.axvline(float(iso["threshold"]), color="black", linestyle="--", linewidth=1, label="threshold")
        ax.set_yscale("log")
        ax.set_title(f"{attack} — {defense} (t{r.axes.get('target')})", fontsize=8)
        ax.set_xlabel(iso["name"], fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    fig.suptitle("Per-sample isolation scores, clean vs poisoned, with each split's threshold", fontsize=10)
    fig.tight_layout()
    return fig


def _flip_counts(r: Record) -> tuple[np.ndarray, str] | None:
    """AIBD's raw flip counts k (from the run's saved flip statistics), else its amplified scores."""
    path = r.run_dir / "checkpoints" / "aibd_flip_stats.pt"
    if path.is_file():
        try:
            import torch

            saved = torch.load(path, map_location="cpu", weights_only=True)
            k = saved["flip_step"].double().numpy()
            cap = (r.config.get("defense_resolved") or {}).get("pgd_cap", 255)
            return np.where(k >= 0, k, cap), "PGD iterations k"
        except Exception:  # noqa: BLE001 - fall back to the scores
            pass
    iso = isolation(r)
    return (iso["scores"], "amplified k (Eq. 4)") if iso is not None else None


def k_distributions(records: list[Record]) -> Any | None:
    """AIBD Fig. 2: iterations until the prediction flips, clean vs poisoned, per attack."""
    reps = [(k, r) for k, r in representatives(records).items() if r.axes.get("defense_name", "") == "aibd"
            or r.config.get("defense") == "aibd"][:MAX_PANELS]
    panels = []
    for (defense, attack), r in reps:
        got = _flip_counts(r)
        iso = isolation(r)
        if got is not None and iso is not None:
            panels.append((defense, attack, r, got[0], got[1], iso["poison"]))
    if not panels:
        return None
    fig, axes = _grid(len(panels))
    for ax, (defense, attack, r, k, xlabel, p) in zip(axes, panels, strict=True):
        if np.all(k == np.round(k)) and k.max() - k.min() <= 300:
            bins = np.arange(k.min() - 0.5, k.max() + 1.5)
        else:
            bins = np.linspace(k.min(), k.max() if k.max() > k.min() else k.min() + 1, 50)
        ax.hist(k[~p], bins=bins, alpha=0.6, color="tab:blue", density=True, label="clean")
        if p.any():
            ax.hist(k[p], bins=bins, alpha=0.7, color="tab:red", density=True, label="poisoned")
        ax.set_title(f"{attack} — {defense} (t{r.axes.get('target')})", fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    fig.suptitle("AIBD: PGD iterations until the prediction flips (share of samples)", fontsize=10)
    fig.tight_layout()
    return fig


def target_surpluses(records: list[Record]) -> Any | None:
    """The per-class surplus behind each run's target guess (AIBD's target filter), one panel per defense and
    attack (the lowest target): the bars of ``plots.class_surplus_figure``."""
    panels = [(key, r, g) for key, r in representatives(records, need_scores=False).items()
              if (g := target_guess(r)) is not None][:MAX_PANELS]
    if not panels:
        return None
    fig, axes = _grid(len(panels), ncols=3, w=4.6, h=3.0)
    for ax, ((defense, attack), r, g) in zip(axes, panels, strict=True):
        class_surplus_figure(g["surplus"], title=f"{attack} — {defense} (t{r.axes.get('target')}): {g['guess']}, "
                                                 f"p = {g['p']}", ax=ax)
    fig.suptitle("Target guesses: each class among the samples ranked highest by amplified flip count, against "
                 "the other classes' rate (red: the guessed target)", fontsize=10)
    fig.tight_layout()
    return fig


def roc(scores: np.ndarray, positive: np.ndarray, higher: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC curve and AUC of ``scores`` for the poisoned samples (``metrics``' one definition)."""
    s = suspicion(scores, higher)
    fpr, tpr = roc_curve_points(s, positive)
    return fpr, tpr, roc_auc(s, positive)


def roc_curves(records: list[Record]) -> tuple[Any | None, list[dict[str, Any]]]:
    """ROC curves per attack (one curve per defense or detector) and the AUC of every scored run."""
    aucs: list[dict[str, Any]] = []
    per_attack: dict[str, list[tuple[str, np.ndarray, np.ndarray, float]]] = {}
    order = sorted(_done(records), key=lambda r: (r.axes.get("target") or 0, r.axes.get("seed") or 0,
                                                  r.axes.get("poison_rate") or 0))
    for r in order:
        if r.axes.get("attack_name") == "none":
            continue
        iso = isolation(r)
        if iso is None or not iso["poison"].any() or iso["poison"].all():
            continue
        fpr, tpr, auc = roc(iso["scores"], iso["poison"], iso["higher"])
        aucs.append({"record": r, "auc": auc})
        curves = per_attack.setdefault(str(r.axes.get("attack")), [])
        if all(c[0] != str(r.axes.get("defense")) for c in curves):  # one run per method: the lowest target
            curves.append((str(r.axes.get("defense")), fpr, tpr, auc))
    if not per_attack:
        return None, aucs
    attacks = list(per_attack)[:MAX_PANELS]
    fig, axes = _grid(len(attacks), w=3.2, h=3.0)
    for ax, a in zip(axes, attacks, strict=True):
        for name, fpr, tpr, auc in per_attack[a]:
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.2f})")
        ax.plot([0, 1], [0, 1], color="gray", linewidth=0.8, linestyle=":")
        ax.set_title(a, fontsize=9)
        ax.set_xlabel("FPR", fontsize=7)
        ax.set_ylabel("TPR", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("ROC of each isolation score for the poisoned samples (one run per method and attack)",
                 fontsize=10)
    fig.tight_layout()
    return fig, aucs
