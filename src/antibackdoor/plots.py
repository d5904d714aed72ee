"""Figures written into run directories (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def score_histogram(scores: torch.Tensor, poison_mask: torch.Tensor, path: Path, xlabel: str,
                    threshold: float | None = None, title: str = "") -> Path:
    """Histogram of per-sample scores, clean vs poisoned, with the split threshold (A-ABL Fig. 4/9)."""
    s = scores.double().cpu().numpy()
    p = poison_mask.bool().cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    bins = np.linspace(s.min(), s.max() if s.max() > s.min() else s.min() + 1, 60)
    ax.hist(s[~p], bins=bins, alpha=0.6, label=f"clean ({(~p).sum()})", color="tab:blue")
    if p.any():
        ax.hist(s[p], bins=bins, alpha=0.7, label=f"poisoned ({p.sum()})", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
