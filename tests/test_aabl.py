"""A-ABL's stages: Otsu split direction, training on the kept subset only, and the split on a classifier whose
adversarial losses are known (how well it isolates after real training is measured, not tested:
benchmarks/training_outcomes.py)."""

from __future__ import annotations

import torch
from conftest import KnownMargins, known_margin_set, margin_logits

import antibackdoor as ab
from antibackdoor.adversarial import symmetric_cross_entropy
from antibackdoor.defenses.a_abl import AABL
from antibackdoor.stages import otsu_threshold


def test_otsu_separates_two_clusters():
    g = torch.Generator().manual_seed(0)
    low = torch.rand(100, generator=g) * 0.5
    high = 5 + torch.rand(900, generator=g)
    t = otsu_threshold(torch.cat([low, high]))
    assert 0.5 < t < 5
    assert otsu_threshold(torch.full((10,), 3.0)) == 3.0


def test_aabl_keeps_vulnerable_and_trains_on_them_only(small_train, monkeypatch, train_calls):
    data = small_train
    scores = torch.linspace(0, 10, len(data))
    scores[:40] = 0.01  # a robust cluster
    monkeypatch.setattr(AABL, "split_scores", lambda self, model, d, ctx: scores.clone())
    d = ab.get_defense("a-abl", "quick", {"naive": {"epochs": 1}, "final": {"epochs": 1, "adversary": {"steps": 1}}})
    r = d.run(data, ab.DefenseContext(ab.model_factory("cnn-small", data)))
    t = r.info["threshold"]
    assert torch.equal(r.kept, scores > t)
    assert not r.kept[:40].any()  # low adversarial loss = robust = isolated
    assert [(c.stage, len(c.data)) for c in train_calls] == [("naive", len(data)), ("adv_train", int(r.kept.sum()))]
    assert r.higher_is_suspicious is False and r.score_name == "sce_adv"


def test_split_isolates_what_resists_ifgsm_on_a_known_classifier(train_calls):
    """The A-ABL phenomenon on a classifier whose losses are known (KnownMargins): BadNets-poisoned samples keep
    their target label under iFGSM, and so do clean samples the model is very sure of (loss 0); clean samples
    with a margin of 1-3 grey levels are pushed across (high SCE). Otsu isolates exactly the first two groups
    and the final stage trains on the rest."""
    classes, target, n = 4, 1, 200
    y = torch.arange(n) % classes
    margins = 1 + torch.arange(n) // classes % 3
    sure = torch.arange(n) % 25 == 3  # clean samples with a margin too large for any attack
    margins[sure] = 60
    data = known_margin_set(margins, y, classes)
    poisoned = ab.get_attack("badnets").poison(data, 0.1, target, ab.seeded(0))
    poison = poisoned.poison_mask
    d = ab.get_defense("a-abl", "quick", {"naive": {"epochs": 1}, "final": {"epochs": 1, "adversary": {"steps": 1}}})
    r = d.run(poisoned.data, ab.DefenseContext(lambda: KnownMargins(classes, target)))
    # the scores: iFGSM at eps 2/255 lowered every small margin by two grey levels (not below 0)
    vulnerable = ~poison & ~sure
    adv = (margins[vulnerable] - 2).clamp(min=0) - 0.5
    expected = symmetric_cross_entropy(margin_logits(adv, y[vulnerable], classes), y[vulnerable], 0.1, 1.0)
    torch.testing.assert_close(r.scores[vulnerable], expected)
    assert (r.scores[~vulnerable] < 1e-6).all() and expected.min() > 5
    assert torch.equal(r.kept, vulnerable)
    m = ab.split_metrics(r.kept, poison)
    assert m["tpr"] == 1.0 and m["rho_vul"] == 0.0
    assert m["fpr"] == int((sure & ~poison).sum()) / int((~poison).sum()) > 0
    assert train_calls.stages == ["naive", "adv_train"] and len(train_calls[1].data) == int(vulnerable.sum())
