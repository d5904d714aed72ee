"""The class-surplus test, the ranking and the ground-truth metrics on constructed inputs (no training)."""

from __future__ import annotations

import numpy as np
from scipy.stats import hypergeom

from antibackdoor.defend.analysis import (
    class_surplus,
    mask_metrics,
    ranking_auc,
    score_auc,
    suspicion_order,
    top_by_score,
)
from antibackdoor.defend.report import verdict

CLASSES = [f"c{i}" for i in range(10)]


def flag(y, rates, seed=0):
    """Flag each sample of class c with probability rates[c] (seeded)."""
    rng = np.random.default_rng(seed)
    return rng.random(len(y)) < np.asarray(rates)[y]


def test_a_target_class_stands_out_and_clean_spread_does_not():
    y = np.repeat(np.arange(10), 500)
    # a backdoor: class 3 flagged at 45 %, the others at 15 %
    s = class_surplus(y, flag(y, [0.15] * 3 + [0.45] + [0.15] * 6), flag(y, [0.15] * 10), CLASSES)
    assert s.target == 3 and s.p < 1e-6
    # clean data the way defenses see it: classes flagged at very different rates, none an outlier
    natural = [0.05, 0.30, 0.12, 0.22, 0.08, 0.26, 0.15, 0.35, 0.10, 0.18]
    for seed in range(5):
        f = flag(y, natural, seed)
        s = class_surplus(y, f, f, CLASSES)
        assert s.target is None, (seed, s.p)
        # the exact tail alone would cry wolf: it ignores that classes differ
        assert min(r.p_exact for r in s.rows) < 1e-6
    # and the verdict says so in words
    v = verdict(s, "a-abl", int(f.sum()), len(y), "isolated samples")
    assert v["kind"] == "clean" and "No class has a surplus" in v["title"]


def test_a_weak_surplus_of_a_few_samples_is_not_called():
    y = np.repeat(np.arange(10), 100)
    f = np.zeros(len(y), bool)
    for c in range(10):
        f[np.flatnonzero(y == c)[:10 + (3 if c == 7 else 0)]] = True  # 13 vs 10: chance
    s = class_surplus(y, f, f, CLASSES)
    assert s.target is None and s.best == 7 and s.p > 0.05


def test_exact_tail_and_two_class_fallback():
    y = np.array([0] * 60 + [1] * 40)
    f = np.zeros(100, bool)
    f[:30] = True  # 30 of class 0 flagged, none of class 1
    s = class_surplus(y, f, f, ["a", "b"])
    assert not s.dispersion and "fewer than three classes" in s.note
    assert np.isclose(s.rows[0].p_exact, hypergeom.sf(29, 100, 60, 30))
    assert s.target == 0 and np.isclose(s.p, 2 * s.rows[0].p_exact)
    # nothing flagged: nothing to call
    none = class_surplus(y, np.zeros(100, bool), np.zeros(100, bool), ["a", "b"])
    assert none.target is None and none.p == 1.0


def test_ranking_and_auc():
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    isolated = np.array([False, True, False, False, False])
    # isolated first, then by score (higher = more suspicious)
    assert suspicion_order(scores, True, isolated).tolist() == [1, 0, 3, 2, 4]
    assert suspicion_order(scores, False, np.zeros(5, bool)).tolist() == [1, 4, 2, 3, 0]
    assert top_by_score(scores, True, 2).tolist() == [True, False, False, True, False]
    poison = np.array([True, False, False, True, False])
    order = suspicion_order(scores, True, np.zeros(5, bool))
    assert ranking_auc(order, poison) == 1.0 and score_auc(scores, True, poison) == 1.0
    assert score_auc(scores, False, poison) == 0.0
    m = mask_metrics(order, np.array([True, False, False, True, True]), poison, scores, True, ks=(1, 3))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 0, 2)
    assert m["tpr"] == 1.0 and np.isclose(m["fpr"], 1 / 3) and m["precision_at_1"] == 1.0
    assert np.isclose(m["precision_at_3"], 2 / 3) and m["precision_at_poisoned"] == 1.0
