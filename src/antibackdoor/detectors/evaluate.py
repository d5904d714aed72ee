"""Judging a detection against the ground truth: TPR/FPR of the proposed isolation and the ROC AUC of the
scores (scikit-learn), plus a ROC figure. Only evaluation code sees the poison mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..metrics import split_metrics
from .base import DetectionResult


def detection_metrics(result: DetectionResult, poison_mask: torch.Tensor) -> dict[str, float]:
    """Split metrics of the isolation (gamma, rho_vul, TPR, FPR, ...) and the ROC AUC of the scores."""
    out: dict[str, float] = split_metrics(result.kept, poison_mask)
    out["auc"] = roc_auc(result.suspicion(), poison_mask)
    return out


def roc_auc(suspicion: torch.Tensor, poison_mask: torch.Tensor) -> float:
    """Area under the ROC curve of ``suspicion`` (higher = more suspicious); NaN without both classes."""
    from sklearn.metrics import roc_auc_score

    y = poison_mask.bool().cpu().numpy()
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, suspicion.double().cpu().numpy()))


def roc_curve_points(suspicion: torch.Tensor, poison_mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of every threshold (scikit-learn's roc_curve)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(poison_mask.bool().cpu().numpy(), suspicion.double().cpu().numpy())
    return fpr, tpr


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path, title: str = "") -> Path:
    """One ROC panel: ``curves`` maps a label to (fpr, tpr, auc)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
