"""What a defense's output says about the data: the suspicion ranking, which class is over-represented at
its top (the class-surplus test, ``antibackdoor.surplus``, shared with AIBD's target guess), and, given the
truth, how well it isolated."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..defenses.base import DefenseResult
from ..metrics import roc_auc, suspicion
from ..surplus import ALPHA, DEPTHS, MIN_DEPTH, ClassRow, Surplus, class_surplus, scan_depths

#: below this share of the inspected samples kept as given, the report and the summary warn: the returned model
#: learned from little of the data, and a split that sets most of it aside says little about which samples
#: are poisoned (a threshold in the wrong place, or a score that does not separate anything on this data)
LOW_KEPT_SHARE = 0.25


@dataclass
class Findings:
    """What one defense result says about the inspected samples; every array is over their positions."""

    order: np.ndarray  # positions, most suspicious first: isolated samples before kept ones, each by score
    score_order: np.ndarray  # positions by score alone (what the class-surplus test reads)
    isolated: np.ndarray  # bool
    scores: np.ndarray | None  # float64 (None: the defense scores nothing)
    #: the class-surplus test of the ranking; None where there is no ranking to test (``unranked`` says why):
    #: index order is no ranking, and on data stored class by class its top is one class
    surplus: Surplus | None
    suggested: np.ndarray  # the label the defense trained an isolated sample with where it changed it, else -1
    flags: dict[str, np.ndarray]  # the defense's own boolean per-sample flags (A-ABL's taken_back, purged)
    unranked: str = ""  # why the samples have no ranking ("" when they have one)
    warnings: list[str] = field(default_factory=list)  # for the report and the summary: an extreme split

    @property
    def left_out(self) -> np.ndarray:
        """Samples the model was not trained on as given: the isolated ones and those a purge dropped after
        the split (a-abl+'s ``purged``)."""
        purged = self.flags.get("purged")
        return self.isolated | purged if purged is not None else self.isolated


def analyse(result: DefenseResult, y: np.ndarray, classes: list[str], defense: str = "the defense") -> Findings:
    """The ranking, the isolated mask and the class-surplus test of one defense result (none without a
    ranking: no score, no verdict), and warnings about an extreme split; ``defense`` names it in those."""
    n = len(y)
    isolated = (~result.kept.cpu().numpy()) if result.kept is not None else np.zeros(n, bool)
    scores = result.scores.double().cpu().numpy() if result.scores is not None else None
    order = suspicion_order(scores, result.higher_is_suspicious, isolated)
    # the surplus test reads the ranking by score alone: a defense may restrict its isolation itself (AIBD's
    # target filter isolates within one class), which would make any class test meaningless
    score_order = suspicion_order(scores, result.higher_is_suspicious, np.zeros(n, bool)) if scores is not None \
        else order
    unranked = why_unranked(scores, defense)
    surplus = class_surplus(y, score_order, isolated, classes) if not unranked else None
    new = result.new_labels.cpu().numpy() if result.new_labels is not None else None
    suggested = np.where(isolated & (new != y), new, -1) if new is not None else np.full(n, -1)
    flags = {name: v.numpy() for name, v in result.flags(n).items()}
    found = Findings(order, score_order, isolated, scores, surplus, suggested, flags, unranked)
    found.warnings = split_warnings(found.left_out, y, classes, defense)
    return found


def why_unranked(scores: np.ndarray | None, defense: str) -> str:
    """Why ``scores`` rank nothing ("" when they do): none at all, or fewer than two distinct finite values."""
    if scores is None:
        return f"{defense} gives no per-sample score"
    if len(np.unique(scores[np.isfinite(scores)])) < 2:
        return f"{defense} gave every sample the same score"
    return ""


def split_warnings(left_out: np.ndarray, y: np.ndarray, classes: list[str], defense: str) -> list[str]:
    """Sentences about an extreme split: fewer than LOW_KEPT_SHARE of the samples kept as given, or a class
    of which no sample was kept as given (the returned model never learned it from its own samples)."""
    n = len(y)
    kept = ~left_out.astype(bool)
    out = []
    if n and kept.sum() / n < LOW_KEPT_SHARE:
        out.append(f"{defense} kept only {int(kept.sum())} of the {n} inspected samples ({100 * kept.sum() / n:.1f} "
                   "%) as given: the returned model learned from little of the data, and a split that sets most "
                   "of it aside says little about which samples are poisoned; check the defense's threshold on "
                   "this data (the score histogram) before using its result")
    present = np.bincount(y, minlength=len(classes)) > 0
    kept_any = np.bincount(y[kept], minlength=len(classes)) > 0
    gone = [classes[c] for c in np.flatnonzero(present & ~kept_any)]
    if gone:
        names = ", ".join(repr(c) for c in gone[:10]) + (f" and {len(gone) - 10} more" if len(gone) > 10 else "")
        out.append(f"{defense} kept no sample of class{'es' if len(gone) > 1 else ''} {names} as given: the "
                   "returned model did not learn it from its own labelled samples")
    return out


def suspicion_order(scores: np.ndarray | None, higher_is_suspicious: bool, isolated: np.ndarray) -> np.ndarray:
    """Sample positions, most suspicious first: isolated samples before kept ones, each group by score;
    ties keep index order. Without scores: isolated first, then index order."""
    n = len(isolated)
    if scores is None:
        key = np.zeros(n)
    else:
        key = -suspicion(scores, higher_is_suspicious)  # ascending: the most suspicious first
        key = np.where(np.isnan(key), np.inf, key)
    return np.lexsort((np.arange(n), key, ~isolated.astype(bool)))


def ranking_auc(order: np.ndarray, poison: np.ndarray) -> float:
    """ROC AUC of the suspicion ranking: the chance that a poisoned sample ranks above a clean one."""
    is_p = poison.astype(bool)[order]
    n_p, n_c = int(is_p.sum()), int((~is_p).sum())
    if n_p == 0 or n_c == 0:
        return float("nan")
    clean_above = np.cumsum(~is_p)[is_p]  # clean samples ranked at or above each poisoned one
    return float(np.sum(n_c - clean_above)) / (n_p * n_c)


def score_auc(scores: np.ndarray, higher_is_suspicious: bool, poison: np.ndarray) -> float:
    """ROC AUC of the raw score (ties count half): ``metrics.roc_auc`` of the oriented scores."""
    return roc_auc(suspicion(scores, higher_is_suspicious), poison)


def mask_metrics(order: np.ndarray, isolated: np.ndarray, poison: np.ndarray,
                 scores: np.ndarray | None, higher_is_suspicious: bool, ks: tuple[int, ...] = (100, 500)) -> dict:
    """Confusion counts, TPR/FPR/precision of the isolation, ROC AUC and precision of the top-k ranks."""
    iso, p = isolated.astype(bool), poison.astype(bool)
    tp, fp = int((iso & p).sum()), int((iso & ~p).sum())
    fn, tn = int((~iso & p).sum()), int((~iso & ~p).sum())
    out = {
        "poisoned": int(p.sum()), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "tpr": tp / (tp + fn) if tp + fn else float("nan"),
        "fpr": fp / (fp + tn) if fp + tn else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "auc": ranking_auc(order, p),
        "auc_score": score_auc(scores, higher_is_suspicious, p) if scores is not None else float("nan"),
    }
    ranked_p = p[order]
    for k in (*ks, int(p.sum())):
        if 0 < k <= len(order):
            out[f"precision_at_{k}"] = float(ranked_p[:k].mean())
    out["precision_at_poisoned"] = out.get(f"precision_at_{int(p.sum())}", float("nan"))
    return out


__all__ = ["ALPHA", "DEPTHS", "LOW_KEPT_SHARE", "MIN_DEPTH", "ClassRow", "Findings", "Surplus", "analyse",
           "class_surplus", "mask_metrics", "ranking_auc", "scan_depths", "score_auc", "split_warnings",
           "suspicion_order", "why_unranked"]
