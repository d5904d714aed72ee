"""The class-surplus test: which class, if any, is over-represented at the top of a suspicion ranking (the
mark of a backdoor's target class). ``defend`` reads it from any defense's scores; AIBD guesses its target
class with it (one rule for both, docs/aibd.md).

A defense isolates samples from clean data too, and not evenly: whole classes can be easier for its criterion
(A-ABL isolates 25-35 % of the vehicle classes of clean CIFAR-10 and 4 % of the cats). A backdoor's poisoned
samples, in contrast, crowd the very top of the ranking. So the test looks at the top k of the ranking at
several depths k (``defend``: 2 % and 8 % of the data; AIBD: 1, 2, 5, 10 and 20 %; at least 30 samples, at most the
number isolated) and calls a class a likely target only when, at some depth, its count exceeds what the *other*
classes' spread allows: the flagged rate p0 of all other classes, their over-dispersion phi (Pearson chi-square
of their counts about p0 per degree of freedom, at least 1: a quasi-binomial model) and the one-sided t
statistic (k_c - n_c p0) / sqrt(phi n_c p0 (1 - p0) (1 + n_c / n_other)) with (classes - 2) degrees of freedom.
At each depth the larger of that p-value and the exact hypergeometric tail P[X >= k_c] is taken (the tail guards
small counts), the smallest over the depths is kept, and it is Bonferroni-adjusted for the number of depths and
classes. With fewer than three classes the spread cannot be estimated and the exact tail alone is used, as
stated.

When more than one class is significant, the likely target is the one with the largest *excess* (flagged minus
expected, at the depth where its surplus is most significant), not the smallest p-value: a backdoor's poison is
numerous (all of it carries the target label), while a distinctive clean class that is naturally hard to flip
can be more significant at the very top with a few dozen samples. Measured on a 43-class traffic-sign set with
the target class 0 (docs/aibd.md): class 12 (229 clean samples) held 25 of the top 1 % against 1.8 expected
(p 1e-7), class 0 (1,059 poisoned) 717 of the top 20 % against 188 (p 7e-5); the smallest p named 12.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: adjusted p-value below which a class is called a likely target
ALPHA = 0.01


@dataclass
class ClassRow:
    label: int
    name: str
    samples: int
    share: float  # of the data
    isolated: int  # isolated by the defense
    flagged: int  # among the top ``depth`` of the ranking
    flagged_share: float  # of those
    expected: float  # flagged if the class were flagged at the rate of the other classes
    p_exact: float  # hypergeometric tail at that depth
    p_adjusted: float  # over-dispersion allowed for, adjusted for depths and classes


@dataclass
class Surplus:
    rows: list[ClassRow]
    flagged: int  # the depth the rows describe (the best class's strongest depth)
    target: int | None  # the likely target class, None when no class has a surplus
    best: int | None  # the class with the smallest adjusted p (reported either way)
    p: float  # its adjusted p-value
    depths: list[int]
    alpha: float = ALPHA
    dispersion: bool = True  # False: too few classes to estimate the spread; exact tail used
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Surplus:
        """The inverse of ``as_dict`` (e.g. from a run's metrics.json)."""
        return cls(**{**d, "rows": [ClassRow(**r) for r in d["rows"]]})


#: the fewest ranked samples a class count is taken from: the very top of a clean ranking is often one class
#: (the model's most confident one), which says little
MIN_DEPTH = 30
#: depths of the ranking read, as fractions of the data: 2 % finds a poison rate of 1-2 % undiluted, 8 % one
#: of 10 % and more; more depths would cost power through the multiple-testing correction
DEPTHS = (0.02, 0.08)


def scan_depths(n: int, isolated: int, fractions: Sequence[float] = DEPTHS) -> list[int]:
    """How far down the ranking to look: ``fractions`` of the data, at least MIN_DEPTH samples, at most the
    number isolated (when that is at least MIN_DEPTH; else the largest fraction, at least a tenth of the data)
    and at most the data."""
    fallback = max(MIN_DEPTH, n // 10, round(n * max(fractions)))
    cap = min(n, isolated if isolated >= MIN_DEPTH else fallback)
    return sorted({min(cap, max(MIN_DEPTH, round(n * f))) for f in fractions})


def _class_pvalues(n: np.ndarray, k: np.ndarray, dispersion: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class at one depth: (expected at the other classes' rate, exact tail, max(exact, quasi-binomial))."""
    from scipy.stats import hypergeom, t

    big_n, big_k = int(n.sum()), int(k.sum())
    present = n > 0
    c_n = len(n)
    expected = np.zeros(c_n)
    p_exact = np.ones(c_n)
    p_both = np.ones(c_n)
    for c in range(c_n):
        if n[c] == 0:
            continue
        p_exact[c] = float(hypergeom.sf(k[c] - 1, big_n, n[c], big_k)) if big_k else 1.0
        others = present.copy()
        others[c] = False
        n_o, k_o = n[others], k[others]
        p0 = float(k_o.sum()) / max(int(n_o.sum()), 1)
        expected[c] = n[c] * p0
        p_quasi = p_exact[c]
        if dispersion and 0 < p0 < 1:
            e = n_o * p0
            phi = max(1.0, float(np.sum((k_o - e) ** 2 / (e * (1 - p0)))) / (len(n_o) - 1))
            var = phi * n[c] * p0 * (1 - p0) * (1 + n[c] / n_o.sum())
            p_quasi = float(t.sf((k[c] - expected[c]) / np.sqrt(var), len(n_o) - 1))
        p_both[c] = max(p_exact[c], p_quasi)  # the exact tail guards the normal approximation at small counts
    return expected, p_exact, p_both


def class_surplus(y: np.ndarray, score_order: np.ndarray, isolated: np.ndarray, classes: list[str],
                  alpha: float = ALPHA, fractions: Sequence[float] = DEPTHS) -> Surplus:
    """Which class, if any, is over-represented at the top of the ranking beyond the other classes' spread
    (among several significant classes, the one with the largest excess; module docstring).

    ``score_order``: sample positions, most suspicious first. The test is made at several depths of the
    ranking (``scan_depths``): a backdoor's poisoned samples crowd the very top, while the clean samples a
    defense also isolates (often whole easy classes) spread over several classes further down. ``fractions``:
    the depths as fractions of the data (``DEPTHS`` for ``defend``; AIBD reads its own, see docs/aibd.md).
    """
    c_n = len(classes)
    y = np.asarray(y, np.int64)
    n = np.bincount(y, minlength=c_n).astype(np.int64)
    iso = np.bincount(y[isolated.astype(bool)], minlength=c_n).astype(np.int64)
    m = int((n > 0).sum())
    dispersion = m >= 3
    depths = scan_depths(len(y), int(isolated.sum()), fractions)
    best_p = np.ones(c_n)
    best_depth = np.full(c_n, depths[-1])
    excess = np.zeros(c_n)  # flagged - expected at each class's most significant depth
    tables = {}
    for d in depths:
        k = np.bincount(y[score_order[:d]], minlength=c_n).astype(np.int64)
        expected, p_exact, p_both = _class_pvalues(n, k, dispersion)
        tables[d] = (k, expected, p_exact)
        better = (p_both < best_p) & (k > expected)
        best_p = np.where(better, p_both, best_p)
        best_depth = np.where(better, d, best_depth)
        excess = np.where(better, k - expected, excess)
    p_adj = np.minimum(1.0, best_p * len(depths) * m)  # Bonferroni over depths and classes
    significant = [c for c in range(c_n) if n[c] and p_adj[c] < alpha]
    candidates = [c for c in range(c_n) if n[c] and best_p[c] < 1.0]
    if significant:  # the most numerous surplus among the significant classes (module docstring)
        best = max(significant, key=lambda c: (excess[c], -p_adj[c]))
    else:
        best = min(candidates, key=lambda c: p_adj[c]) if candidates else None
    p = float(p_adj[best]) if best is not None else 1.0
    target = best if best is not None and p < alpha else None
    depth = int(best_depth[best]) if best is not None else depths[-1]
    k, expected, p_exact = tables[depth]
    rows = [ClassRow(c, classes[c], int(n[c]), float(n[c] / n.sum()), int(iso[c]), int(k[c]),
                     float(k[c] / depth), float(expected[c]), float(p_exact[c]), float(p_adj[c]))
            for c in range(c_n)]
    note = "" if dispersion else ("with fewer than three classes the natural spread between classes cannot be "
                                  "estimated; the p-value assumes every class equally likely to be flagged")
    return Surplus(rows, depth, target, best, p, depths, alpha, dispersion, note)


def fmt_p(p: float) -> str:
    """A p-value for a reader: two decimals, or scientific notation below 0.01."""
    if p >= 0.01:
        return f"{p:.2f}"
    return f"{p:.1e}" if p > 0 else "< 1e-300"


@dataclass
class TargetGuess:
    """A defense's guess of the target class, as it recorded it in its info (AIBD's ``target``,
    ``target_p``, ``target_filter``, ``target_filter_applied``, ``target_surplus``), for reports."""

    surplus: Surplus
    filter_on: bool  # the defense's target filter was switched on
    applied: bool  # it restricted the isolation to the guessed class

    @classmethod
    def from_info(cls, info: dict | None) -> TargetGuess | None:
        """The guess recorded in ``info`` (a run's ``defense_info``), None when it records none."""
        if not info or not isinstance(info.get("target_surplus"), dict):
            return None
        surplus = Surplus.from_dict(info["target_surplus"])
        return cls(surplus, bool(info.get("target_filter", True)), bool(info.get("target_filter_applied")))

    def name_of(self, label: int | None) -> str:
        """A class as 'name (label)' ('-' for None; the bare label for a class the test did not see)."""
        rows = {r.label: r for r in self.surplus.rows}
        return "-" if label is None else f"{rows[label].name} ({label})" if label in rows else str(label)

    @property
    def target(self) -> str:
        """The guessed class as 'name (label)', or 'none'."""
        return "none" if self.surplus.target is None else self.name_of(self.surplus.target)

    @property
    def best(self) -> str:
        """The strongest candidate as 'name (label)' (reported whether or not it was called)."""
        return self.name_of(self.surplus.best)

    @property
    def filter_state(self) -> str:
        """'applied', 'declined' (on, but no class had a significant surplus) or 'off'."""
        return "applied" if self.applied else "declined" if self.filter_on else "off"

    def title(self) -> str:
        """A figure title: depth, guess, p-value, what the filter did."""
        return (f"target guess (top {self.surplus.flagged} by amplified flip count): {self.target}, "
                f"p = {fmt_p(self.surplus.p)}; filter {self.filter_state}")

    def text(self) -> str:
        """One paragraph: the guess, its evidence and what the filter did with it."""
        s = self.surplus
        rows = {r.label: r for r in s.rows}
        if s.target is not None:
            r = rows[s.target]
            out = (f"Guessed target: class {self.target}. It holds {r.flagged} of the {s.flagged} samples ranked "
                   f"highest by amplified flip count, {r.expected:.1f} at the other classes' rate (adjusted "
                   f"p = {fmt_p(s.p)} < {s.alpha:g}). ")
            return out + ("The target filter restricted the isolated set to this class." if self.applied else
                          "The target filter is off, so the isolated set was not restricted to it.")
        strongest = ""
        if s.best is not None:
            r = rows[s.best]
            strongest = (f"; the strongest candidate, class {self.best}, holds {r.flagged} of the top {s.flagged} "
                         f"against {r.expected:.1f} at the other classes' rate")
        out = ("No target guessed: no class has a significant surplus at the top of the ranking by amplified flip "
               f"count (adjusted p = {fmt_p(s.p)} >= {s.alpha:g}{strongest}). ")
        return out + ("The target filter declined: the isolated set was not restricted to a class." if self.filter_on
                      else "The target filter is off.")


__all__ = ["ALPHA", "DEPTHS", "MIN_DEPTH", "ClassRow", "Surplus", "TargetGuess", "class_surplus", "fmt_p",
           "scan_depths"]
