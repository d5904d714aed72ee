"""Figures written into run directories (matplotlib, headless)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _finish(fig, path: Path) -> Path:
    """Lay out, save and close a figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def class_surplus_figure(surplus, title: str | None = None, ax=None):
    """The class-surplus test as bars: each class's count among the top ``surplus.flagged`` of the ranking
    against its count at the other classes' rate (the called target, if any, in red). ``surplus`` is an
    ``antibackdoor.surplus.Surplus``; drawn into ``ax`` when given (one panel of a grid), else into a new
    figure; returns the open figure."""
    rows = list(surplus.rows)
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(rows) + 2), 3.4), dpi=110)
    fig = ax.figure
    xs = np.arange(len(rows))
    colors = ["tab:red" if r.label == surplus.target else "tab:blue" for r in rows]
    ax.bar(xs, [r.flagged for r in rows], color=colors, label=f"among the {surplus.flagged} most suspicious")
    ax.scatter(xs, [r.expected for r in rows], color="black", marker="_", s=300, zorder=3,
               label="at the other classes' rate")
    ax.set_xticks(xs)
    ax.set_xticklabels([r.name[:12] for r in rows], rotation=45 if len(rows) > 6 else 0, ha="right", fontsize=8)
    ax.set_ylabel("samples")
    ax.set_title(title or f"the {surplus.flagged} most suspicious samples by class", fontsize=10 if own else 8)
    ax.legend(fontsize=8 if own else 6)
    if own:
        fig.tight_layout()
    return fig


def plot_class_surplus(surplus, path: Path, title: str | None = None) -> Path:
    """``class_surplus_figure`` saved to ``path``."""
    return _finish(class_surplus_figure(surplus, title), path)


def score_histogram(scores: torch.Tensor, poison_mask: torch.Tensor | None, path: Path, xlabel: str,
                    threshold: float | None = None, title: str = "",
                    lines: Sequence[tuple[str, float, str]] = ()) -> Path:
    """Histogram of per-sample scores, clean vs poisoned, with the split threshold (A-ABL Fig. 4/9) or other
    vertical ``lines`` (label, value, line style), e.g. D-BR/D-ST's two FCT thresholds.

    Without a poison mask (a user's own data: the truth is unknown) all samples form one histogram."""
    s = scores.double().cpu().numpy()
    p = poison_mask.bool().cpu().numpy() if poison_mask is not None else np.zeros(len(s), bool)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    bins = np.linspace(s.min(), s.max() if s.max() > s.min() else s.min() + 1, 60)
    ax.hist(s[~p], bins=bins, alpha=0.6, color="tab:blue",
            label=f"clean ({(~p).sum()})" if poison_mask is not None else f"all samples ({len(s)})")
    if p.any():
        ax.hist(s[p], bins=bins, alpha=0.7, label=f"poisoned ({p.sum()})", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    for label, value, style in lines:
        if math.isfinite(value):
            ax.axvline(value, color="black", linestyle=style, label=f"{label} {value:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend(fontsize=8 if lines else None)
    return _finish(fig, path)


def plot_k_distribution(scores: torch.Tensor, poison_mask: torch.Tensor, path: Path,
                        raw_k: torch.Tensor | None = None, adv_label: torch.Tensor | None = None,
                        true_labels: torch.Tensor | None = None, cut: float | None = None,
                        cap: int | None = None) -> Path:
    """AIBD Fig. 2 for one run: PGD iterations k (raw and Eq. 4-amplified) of clean vs poisoned samples,
    and, given the true labels, how often a poisoned sample's adversarial label is its true label."""
    p = poison_mask.bool().cpu().numpy()
    panels = [("amplified k (Eq. 4)", scores.double().cpu().numpy(), cut)]
    if raw_k is not None:
        panels.insert(0, ("PGD iterations k", raw_k.double().cpu().numpy(), None))
    show_labels = adv_label is not None and true_labels is not None and p.any()
    ncols = len(panels) + int(show_labels)
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.4), dpi=120, squeeze=False)
    for ax, (xlabel, s, line) in zip(axes[0], panels, strict=False):
        if np.all(s == np.round(s)) and s.max() - s.min() <= 300:  # integer counts: one bar per k
            bins = np.arange(s.min() - 0.5, s.max() + 1.5)
        else:
            bins = np.linspace(s.min(), s.max() if s.max() > s.min() else s.min() + 1, 60)
        ax.hist(s[~p], bins=bins, alpha=0.6, color="tab:blue", label=f"clean ({int((~p).sum())})")
        if p.any():
            ax.hist(s[p], bins=bins, alpha=0.7, color="tab:red", label=f"poisoned ({int(p.sum())})")
        if line is not None:
            ax.axvline(line, color="black", linestyle="--", label="lowest isolated score")
        if xlabel.startswith("PGD") and cap is not None:
            ax.set_title(f"never flipped (k = cap = {cap}): {int((s >= cap).sum())}", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
    if show_labels:
        ax = axes[0][-1]
        adv = adv_label.cpu().numpy()[p]
        true = true_labels.cpu().numpy()[p]
        flipped = adv >= 0
        share = [(adv == true).mean(), ((adv != true) & flipped).mean(), (~flipped).mean()]
        ax.bar(["true label", "other label", "never flipped"], share,
               color=["tab:green", "tab:gray", "tab:red"])
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of poisoned samples")
        ax.set_title("adversarial label of poisoned samples", fontsize=9)
    return _finish(fig, path)


def plot_cbd_weights(weights: torch.Tensor, poison_mask: torch.Tensor, path: Path) -> Path:
    """CBD's final sample weights L_B / (L_B + L_C), clean vs poisoned samples (densities), with their medians."""
    w = weights.double().cpu().numpy()
    p = poison_mask.bool().cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    bins = np.linspace(0, max(1.0, float(w.max())), 51)
    ax.hist(w[~p], bins=bins, alpha=0.6, color="tab:blue", label=f"clean ({int((~p).sum())})", density=True)
    ax.axvline(float(np.median(w[~p])), color="tab:blue", linestyle="--")
    if p.any():
        ax.hist(w[p], bins=bins, alpha=0.7, color="tab:red", label=f"poisoned ({int(p.sum())})", density=True)
        ax.axvline(float(np.median(w[p])), color="tab:red", linestyle="--")
    ax.set_xlabel("CBD weight L_B / (L_B + L_C) after training (dashed: medians)")
    ax.set_ylabel("density")
    ax.legend()
    return _finish(fig, path)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path, title: str = "") -> Path:
    """One ROC panel: ``curves`` maps a label to (fpr, tpr, auc)."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=120)
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{label} ({auc:.2f})", linewidth=1.2)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
