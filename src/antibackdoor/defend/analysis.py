"""What a defense's output says about the data: the suspicion ranking, which class has a surplus of
isolated samples (the mark of a backdoor's target class), and, given the truth, how well it isolated.

The surplus test. A defense isolates some samples on clean data too, and not evenly: some classes are simply
easier or harder for its criterion. So a class is called a likely target only when its share among the
flagged samples exceeds what the *other* classes' spread allows, not merely what chance sampling allows.
For each class c: the flagged rate p0 of all other classes, their over-dispersion phi (Pearson chi-square
of the other classes' flagged counts about p0, per degree of freedom, at least 1: a quasi-binomial model),
and the one-sided t statistic (k_c - n_c p0) / sqrt(phi n_c p0 (1 - p0) (1 + n_c / n_other)) with
(classes - 2) degrees of freedom; the p-value is Bonferroni-adjusted for the number of classes. The exact
hypergeometric tail P[X >= k_c] (which assumes every class equally likely to be flagged) is reported beside
it. With fewer than three classes the spread cannot be estimated and the exact tail is used, as stated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: adjusted p-value below which a class is called a likely target
ALPHA = 0.01


def suspicion_order(scores: np.ndarray | None, higher_is_suspicious: bool, isolated: np.ndarray) -> np.ndarray:
    """Sample positions, most suspicious first: isolated samples before kept ones, each group by score;
    ties keep index order. Without scores: isolated first, then index order."""
    n = len(isolated)
    if scores is None:
        key = np.zeros(n)
    else:
        key = -np.asarray(scores, np.float64) if higher_is_suspicious else np.asarray(scores, np.float64)
        key = np.where(np.isnan(key), np.inf, key)
    return np.lexsort((np.arange(n), key, ~isolated.astype(bool)))


def top_by_score(scores: np.ndarray, higher_is_suspicious: bool, count: int) -> np.ndarray:
    """Boolean mask of the ``count`` highest-scored samples (by score alone, ties by index)."""
    s = np.asarray(scores, np.float64)
    key = -s if higher_is_suspicious else s
    key = np.where(np.isnan(key), np.inf, key)
    order = np.lexsort((np.arange(len(s)), key))
    mask = np.zeros(len(s), bool)
    mask[order[:count]] = True
    return mask


@dataclass
class ClassRow:
    label: int
    name: str
    samples: int
    share: float  # of the data
    isolated: int  # isolated by the defense
    flagged: int  # in the tested set
    flagged_share: float  # of the tested set
    expected: float  # flagged if the class were flagged at the rate of the other classes
    p_exact: float  # hypergeometric tail
    p_adjusted: float  # quasi-binomial, leave-one-out, Bonferroni


@dataclass
class Surplus:
    rows: list[ClassRow]
    flagged: int
    target: int | None  # the likely target class, None when no class has a surplus
    best: int | None  # the class with the smallest adjusted p (reported either way)
    p: float  # its adjusted p-value
    alpha: float = ALPHA
    dispersion: bool = True  # False: too few classes to estimate the spread; exact tail used
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def class_surplus(y: np.ndarray, flagged: np.ndarray, isolated: np.ndarray, classes: list[str],
                  alpha: float = ALPHA) -> Surplus:
    """Which class, if any, holds more of the ``flagged`` samples than the other classes' spread allows."""
    from scipy.stats import hypergeom, t

    c_n = len(classes)
    y = np.asarray(y, np.int64)
    n = np.bincount(y, minlength=c_n).astype(np.int64)
    k = np.bincount(y[flagged.astype(bool)], minlength=c_n).astype(np.int64)
    iso = np.bincount(y[isolated.astype(bool)], minlength=c_n).astype(np.int64)
    big_n, big_k = int(n.sum()), int(k.sum())
    present = n > 0
    m = int(present.sum())
    dispersion = m >= 3
    rows = []
    for c in range(c_n):
        if n[c] == 0:
            rows.append(ClassRow(c, classes[c], 0, 0.0, 0, 0, 0.0, 0.0, 1.0, 1.0))
            continue
        p_exact = float(hypergeom.sf(k[c] - 1, big_n, n[c], big_k)) if big_k else 1.0
        others = present.copy()
        others[c] = False
        n_o, k_o = n[others], k[others]
        p0 = float(k_o.sum()) / max(int(n_o.sum()), 1)
        expected = n[c] * p0
        if dispersion and 0 < p0 < 1:
            e = n_o * p0
            chi2 = float(np.sum((k_o - e) ** 2 / (e * (1 - p0))))
            df = len(n_o) - 1
            phi = max(1.0, chi2 / df)
            var = phi * n[c] * p0 * (1 - p0) * (1 + n[c] / n_o.sum())
            p_one = float(t.sf((k[c] - expected) / np.sqrt(var), df))
        else:
            p_one = p_exact
        rows.append(ClassRow(c, classes[c], int(n[c]), n[c] / big_n, int(iso[c]), int(k[c]),
                             k[c] / big_k if big_k else 0.0, float(expected), p_exact, min(1.0, p_one * m)))
    candidates = [r for r in rows if r.samples and r.flagged > r.expected]
    best = min(candidates, key=lambda r: (r.p_adjusted, -r.flagged_share)) if candidates else None
    p = best.p_adjusted if best else 1.0
    target = best.label if best is not None and p < alpha else None
    note = "" if dispersion else ("with fewer than three classes the natural spread between classes cannot be "
                                  "estimated; the p-value assumes every class equally likely to be flagged")
    return Surplus(rows, big_k, target, None if best is None else best.label, p, alpha, dispersion, note)


def ranking_auc(order: np.ndarray, poison: np.ndarray) -> float:
    """ROC AUC of the suspicion ranking: the chance that a poisoned sample ranks above a clean one."""
    is_p = poison.astype(bool)[order]
    n_p, n_c = int(is_p.sum()), int((~is_p).sum())
    if n_p == 0 or n_c == 0:
        return float("nan")
    clean_above = np.cumsum(~is_p)[is_p]  # clean samples ranked at or above each poisoned one
    return float(np.sum(n_c - clean_above)) / (n_p * n_c)


def score_auc(scores: np.ndarray, higher_is_suspicious: bool, poison: np.ndarray) -> float:
    """ROC AUC of the raw score (ties count half)."""
    from scipy.stats import rankdata

    s = np.asarray(scores, np.float64)
    s = s if higher_is_suspicious else -s
    p = poison.astype(bool)
    n_p, n_c = int(p.sum()), int((~p).sum())
    if n_p == 0 or n_c == 0 or np.isnan(s).any():
        return float("nan")
    r = rankdata(s)
    return float((r[p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_c))


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


__all__ = ["ALPHA", "ClassRow", "Surplus", "class_surplus", "mask_metrics", "ranking_auc", "score_auc",
           "suspicion_order", "top_by_score"]
