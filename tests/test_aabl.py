"""A-ABL's stages: Otsu split direction, training on the kept subset only, and the phenomenon on real data."""

from __future__ import annotations

import pytest
import torch

import antibackdoor as ab
from antibackdoor.defenses.a_abl import AABL
from antibackdoor.stages import fit as stages
from antibackdoor.stages import otsu_threshold


def test_otsu_separates_two_clusters():
    g = torch.Generator().manual_seed(0)
    low = torch.rand(100, generator=g) * 0.5
    high = 5 + torch.rand(900, generator=g)
    t = otsu_threshold(torch.cat([low, high]))
    assert 0.5 < t < 5
    assert otsu_threshold(torch.full((10,), 3.0)) == 3.0


def test_aabl_keeps_vulnerable_and_trains_on_them_only(small_train, monkeypatch):
    data = small_train
    scores = torch.linspace(0, 10, len(data))
    scores[:40] = 0.01  # a robust cluster
    monkeypatch.setattr(AABL, "split_scores", lambda self, model, d, ctx: scores.clone())
    seen = []
    real = stages.train

    def spy(model, d, cfg, **kw):
        seen.append((kw["desc"], len(d)))
        return real(model, d, cfg, **kw)

    monkeypatch.setattr(stages, "train", spy)
    d = ab.get_defense("a-abl", "quick", {"naive": {"epochs": 1}, "final": {"epochs": 1, "adversary": {"steps": 1}}})
    r = d.run(data, ab.DefenseContext(ab.model_factory("cnn-small", data)))
    t = r.info["threshold"]
    assert torch.equal(r.kept, scores > t)
    assert not r.kept[:40].any()  # low adversarial loss = robust = isolated
    assert seen == [("naive", len(data)), ("adv_train", int(r.kept.sum()))]
    assert r.higher_is_suspicious is False and r.score_name == "sce_adv"


@pytest.mark.slow
def test_split_isolates_badnets_on_real_images(mini):
    """The A-ABL phenomenon at small scale: patch-poisoned samples resist iFGSM and fall below Otsu."""
    torch.manual_seed(0)
    train = mini.train.subset(torch.arange(2000))
    poisoned = ab.get_attack("badnets").poison(train, 0.1, 0, ab.seeded(0))
    d = ab.get_defense("a-abl", "quick", {"naive": {"epochs": 12}})
    ctx = ab.DefenseContext(ab.model_factory("cnn-small", train))
    naive, _ = stages.train_stage(ctx, poisoned.data, d.params.naive, "naive")
    scores = d.split_scores(naive, poisoned.data, ctx)
    kept = scores > otsu_threshold(scores)
    m = ab.split_metrics(kept, poisoned.poison_mask)
    # poisoned samples are robust: their adversarial loss sits far below the clean samples'
    assert scores[poisoned.poison_mask].median() < scores[~poisoned.poison_mask].quantile(0.25)
    # the split isolates poisoned samples far more often than clean ones, so the kept subset is cleaner
    assert m["tpr"] > 2 * m["fpr"], m
    assert m["rho_vul"] < 0.08, m
