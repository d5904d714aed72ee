"""Figures written into run directories (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def score_histogram(scores: torch.Tensor, poison_mask: torch.Tensor | None, path: Path, xlabel: str,
                    threshold: float | None = None, title: str = "") -> Path:
    """Histogram of per-sample scores, clean vs poisoned, with the split threshold (A-ABL Fig. 4/9).

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
