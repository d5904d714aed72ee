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
)
from antibackdoor.defend.report import verdict

CLASSES = [f"c{i}" for i in range(10)]


def ranked(y, means, seed=0, poison=None):
    """Positions by a score drawn N(means[class], 1) per sample (higher = more suspicious); ``poison``: a
    mask of samples whose score is pushed far above everything (a backdoor's samples)."""
    rng = np.random.default_rng(seed)
    score = rng.normal(np.asarray(means)[y], 1.0)
    if poison is not None:
        score[poison] += 6.0
    return suspicion_order(score, True, np.zeros(len(y), bool)), score


def test_a_target_class_at_the_top_is_found_and_clean_spread_is_not():
    y = np.repeat(np.arange(10), 500)
    # clean data as defenses see it: several classes rank high (A-ABL: the vehicle classes), none alone
    natural = [1.0, 0.9, 0.2, 0.0, 0.1, 0.0, 0.3, 0.4, 0.95, 0.85]
    for seed in range(5):
        order, score = ranked(y, natural, seed)
        iso = score > np.quantile(score, 0.8)
        s = class_surplus(y, order, iso, CLASSES)
        assert s.target is None, (seed, s.p)
        # the exact tail alone would cry wolf: it ignores that classes differ
        assert min(r.p_exact for r in s.rows) < 1e-3
        v = verdict(s, "a-abl", int(iso.sum()), len(y))
        assert v["kind"] == "clean" and "No class has a surplus" in v["title"]
        assert f"a-abl isolated {int(iso.sum())} of 5000 samples" in v["text"]
    # a backdoor: 150 samples labelled 7 (3 % of the data) crowd the top, on top of the same clean spread
    poison = np.zeros(len(y), bool)
    poison[np.flatnonzero(y == 7)[:150]] = True
    for seed in range(5):
        order, score = ranked(y, natural, seed, poison)
        s = class_surplus(y, order, score > np.quantile(score, 0.8), CLASSES)
        assert s.target == 7 and s.p < 1e-6, (seed, s.p)
        assert s.flagged <= 200 and s.rows[7].flagged >= 0.7 * s.flagged  # found near the top
        assert "Backdoor suspected: class 'c7'" in verdict(s, "a-abl", 1000, 5000)["title"]


def test_a_few_more_samples_of_a_class_are_not_called():
    y = np.repeat(np.arange(10), 100)
    order, score = ranked(y, [0.0] * 7 + [0.3] + [0.0] * 2, seed=3)  # class 7 slightly easier: chance level
    s = class_surplus(y, order, score > np.quantile(score, 0.9), CLASSES)
    assert s.target is None and s.p > 0.01
    assert s.depths == [30, 80]  # 2 % and 8 % of 1,000, at least 30, at most the 100 isolated


def test_exact_tail_and_two_class_fallback():
    y = np.array([0] * 60 + [1] * 40)
    order = np.arange(100)  # the 60 samples of class 0 rank first
    iso = np.zeros(100, bool)
    iso[:30] = True
    s = class_surplus(y, order, iso, ["a", "b"])
    assert not s.dispersion and "fewer than three classes" in s.note
    assert s.depths == [30] and s.flagged == 30
    assert np.isclose(s.rows[0].p_exact, hypergeom.sf(29, 100, 60, 30))
    assert s.target == 0 and np.isclose(s.p, 2 * s.rows[0].p_exact)
    # classes interleaved down the ranking: nothing to call
    mixed = class_surplus(y, np.argsort(np.arange(100) % 5, kind="stable"), iso, ["a", "b"])
    assert mixed.target is None


def test_ranking_and_auc():
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    isolated = np.array([False, True, False, False, False])
    # isolated first, then by score (higher = more suspicious)
    assert suspicion_order(scores, True, isolated).tolist() == [1, 0, 3, 2, 4]
    assert suspicion_order(scores, False, np.zeros(5, bool)).tolist() == [1, 4, 2, 3, 0]
    poison = np.array([True, False, False, True, False])
    order = suspicion_order(scores, True, np.zeros(5, bool))
    assert ranking_auc(order, poison) == 1.0 and score_auc(scores, True, poison) == 1.0
    assert score_auc(scores, False, poison) == 0.0
    m = mask_metrics(order, np.array([True, False, False, True, True]), poison, scores, True, ks=(1, 3))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 0, 2)
    assert m["tpr"] == 1.0 and np.isclose(m["fpr"], 1 / 3) and m["precision_at_1"] == 1.0
    assert np.isclose(m["precision_at_3"], 2 / 3) and m["precision_at_poisoned"] == 1.0


def test_target_guess_says_what_the_filter_did():
    """A defense's recorded target guess (AIBD's defense_info) read back for the reports: the class called, or
    why none was, with the p-value and the filter's state."""
    from antibackdoor.defenses.aibd import TARGET_FRACTIONS
    from antibackdoor.surplus import TargetGuess, fmt_p

    y = np.arange(1000) % 10
    top = np.flatnonzero(y == 4)[:60]
    order = np.concatenate([top, np.setdiff1d(np.random.default_rng(0).permutation(1000), top,
                                              assume_unique=True)])
    called = class_surplus(y, order, np.zeros(1000, bool), CLASSES, 0.01, TARGET_FRACTIONS)
    plain = class_surplus(y, np.random.default_rng(1).permutation(1000), np.zeros(1000, bool), CLASSES, 0.01,
                          TARGET_FRACTIONS)
    assert called.target == 4 and plain.target is None
    assert TargetGuess.from_info({"threshold": 0.5}) is None  # a defense that guesses nothing
    g = TargetGuess.from_info({"target_filter": True, "target_filter_applied": True,
                               "target_surplus": called.as_dict()})
    assert (g.target, g.filter_state) == ("c4 (4)", "applied")
    assert f"p = {fmt_p(called.p)} < 0.01" in g.text() and "restricted the isolated set to this class" in g.text()
    off = TargetGuess.from_info({"target_filter": False, "target_filter_applied": False,
                                 "target_surplus": called.as_dict()})
    assert off.filter_state == "off" and "filter is off" in off.text()
    declined = TargetGuess.from_info({"target_filter": True, "target_filter_applied": False,
                                      "target_surplus": plain.as_dict()})
    assert (declined.target, declined.filter_state) == ("none", "declined")
    text = declined.text()
    assert "No target guessed" in text and f"p = {fmt_p(plain.p)} >= 0.01" in text and declined.best in text
    assert "target filter declined" in text and "none" in declined.title() and "declined" in declined.title()
