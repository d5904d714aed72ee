"""Judging a detection against the ground truth: TPR/FPR of the proposed isolation and the ROC AUC of the
scores (scikit-learn), plus a ROC figure. Only evaluation code sees the poison mask."""

from __future__ import annotations

import torch

from ..metrics import roc_auc, roc_curve_points, split_metrics
from ..plots import plot_roc
from .base import DetectionResult


def detection_metrics(result: DetectionResult, poison_mask: torch.Tensor) -> dict[str, float]:
    """Split metrics of the isolation (gamma, rho_vul, TPR, FPR, ...) and the ROC AUC of the scores."""
    out: dict[str, float] = split_metrics(result.kept, poison_mask)
    out["auc"] = roc_auc(result.suspicion(), poison_mask)
    return out


__all__ = ["detection_metrics", "plot_roc", "roc_auc", "roc_curve_points"]
