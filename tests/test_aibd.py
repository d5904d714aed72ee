"""AIBD: batched flip counting equals a batch-of-one loop, Eq. 4 numerics, the top-q split, the label
treatments, and the progressive top-q rule on clean data (it must settle on a small q)."""

from __future__ import annotations

import math

import pytest
import torch

from antibackdoor.adversarial import pgd_statistics
from antibackdoor.adversarial.reference import pgd_statistics_loop
from antibackdoor.data.imageset import ImageSet
from antibackdoor.defenses import DefenseContext, get_defense
from antibackdoor.defenses.aibd import (
    AIBDParams,
    amplified_scores,
    flip_config,
    flip_counts,
    guess_target,
    isolate,
    rank_desc,
    treated_labels,
)
from antibackdoor.errors import ConfigError
from antibackdoor.models import build_model
from antibackdoor.plots import plot_k_distribution
from antibackdoor.precision import PLAIN
from antibackdoor.training import TrainConfig, train

FAST = TrainConfig(epochs=2, optimizer="adam", lr=2e-3, crop=0, flip=False)


@pytest.fixture(scope="module")
def model64(mini):
    """A briefly trained cnn-small in float64, so batched and batch-of-one runs agree exactly."""
    torch.manual_seed(0)
    data = mini.train.subset(torch.arange(500))
    m = build_model("cnn-small", 10, mean=data.mean, std=data.std)
    train(m, data, FAST, precision=PLAIN)
    return m.double().eval()


@pytest.mark.parametrize("cap, p", [(3, 1.0), (40, 2.0)])
def test_batched_flip_counts_equal_batch_of_one_loop(model64, mini, cap, p):
    cfg = flip_config(AIBDParams(pgd_cap=cap, grad_norm_p=p))
    assert cfg.early_stop and not cfg.random_start and math.isinf(cfg.eps) and cfg.step == 1 / 255
    x, y = mini.train.x[500:540], mini.train.y[500:540]
    batched = pgd_statistics(model64, x, y, cfg, batch_size=16, dtype=torch.float64)
    loop = pgd_statistics_loop(model64, x, y, cfg, dtype=torch.float64)
    k_b, k_l = flip_counts(batched, cap), flip_counts(loop, cap)
    assert torch.equal(k_b, k_l)
    assert torch.equal(batched.flip_label, loop.flip_label)
    torch.testing.assert_close(amplified_scores(k_b, batched.grad_norm),
                               amplified_scores(k_l, loop.grad_norm.float()), rtol=1e-5, atol=0)
    # never-flipped samples sit at the cap, the others strictly below or at it with a real label
    never = batched.flip_step < 0
    assert torch.all(k_b[never] == cap) and torch.all(batched.flip_label[never] == -1)
    assert torch.all(batched.flip_label[~never] != y[~never])
    if cap == 3:
        assert never.any(), "a 3-step cap should leave some samples unflipped"
    else:
        assert (k_b > 1).any() and (k_b[~never] < cap).all()


def test_amplification_is_eq4_and_keeps_large_gradients_apart():
    k = torch.tensor([10, 10, 10, 10, 0, 255])
    g = torch.tensor([0.0, 1.0, 30.0, 40.0, 0.1, 2.0])
    s = amplified_scores(k, g)
    assert s.dtype == torch.float64
    expected = torch.tensor([5.0, 10 * (1 - 1 / (1 + math.exp(-1)))], dtype=torch.float64)
    torch.testing.assert_close(s[:2], expected)
    # 1 - sigmoid(g) in float32 is exactly 0 for both, which would tie them; here they stay ordered and > 0
    assert s[2] > s[3] > 0
    assert s[4] == 0
    assert torch.equal(rank_desc(s)[:2], torch.tensor([5, 0]))


def test_isolate_takes_top_q_and_target_vote_counts_at_least_one_sample():
    n = 200
    scores = torch.arange(n, dtype=torch.float64).flip(0)  # sample 0 ranks first
    order = rank_desc(scores)
    m = isolate(order, 0.1, None)
    assert int(m.sum()) == 20 and m[:20].all()
    y = torch.arange(n) % 4
    y[:3] = 2  # the three top-ranked samples carry label 2
    # official code: int(200 * 1e-5) = 0 samples vote, so it always answers class 0
    target, count = guess_target(order, y, 1e-5, 4)
    assert (target, count) == (2, 1)
    assert guess_target(order, y, 0.015, 4) == (2, 3)
    only = isolate(order, 0.1, y == 2)
    assert int(only.sum()) == 20 and torch.all(y[only] == 2)
    # the 20 best-ranked samples of class 2
    assert torch.equal(only.nonzero().flatten(), (y == 2).nonzero().flatten()[:20])


def test_treatments():
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    adv = torch.tensor([1, 2, -1, 0, 3, 0])
    iso = torch.tensor([True, True, True, False, False, False])
    gen = torch.Generator().manual_seed(0)
    labels, w = treated_labels(y, adv, iso, "adversarial", 4, gen)
    assert labels.tolist() == [1, 2, 2, 3, 0, 1]
    assert w.tolist() == [1, 1, 0, 1, 1, 1]  # isolated but never flipped: dropped
    big_y = torch.randint(0, 10, (2000,), generator=gen)
    labels, w = treated_labels(big_y, big_y, torch.ones(2000, dtype=torch.bool), "random", 10, gen)
    assert torch.all(labels != big_y) and len(labels.unique()) == 10 and torch.all(w == 1)
    labels, w = treated_labels(y, adv, iso, "unlearn", 4, gen)
    assert torch.equal(labels, y) and w.tolist() == [-1, -1, -1, 1, 1, 1]
    with pytest.raises(ConfigError):
        get_defense("aibd", "quick", {"treatment": "forget"})
    with pytest.raises(ConfigError):
        get_defense("aibd", "quick", {"qs": [0.2, 1.5]})


def _tiny_clean(n: int = 480, size: int = 16, classes: int = 4, seed: int = 0) -> ImageSet:
    """Learnable synthetic data (class c darkens quadrant c) with no poison at all."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % classes
    h = size // 2
    for c in range(classes):
        r, q = divmod(c, 2)
        x[y == c, :, r * h:(r + 1) * h, q * h:(q + 1) * h] //= 4
    return ImageSet(x, y, [str(c) for c in range(classes)], (0.5,) * 3, (0.25,) * 3, "tiny-clean")


def test_clean_data_gets_a_small_q_and_keeps_accuracy(tmp_path):
    data = _tiny_clean()
    test = _tiny_clean(200, seed=1)
    ep = dict(optimizer="adam", lr=2e-3, crop=0, flip=False, batch_size=64)
    d = get_defense("aibd", "quick", {
        "infected": {"epochs": 6, **ep}, "retrain": {"epochs": 3, **ep}, "holdout": 0.25,
        "qs": [0.4, 0.25, 0.02], "pgd_cap": 40, "abandon_epoch": 1, "abandon_drop": 0.1, "tolerance": 0.04,
        "target_filter": False,
    })
    ctx = DefenseContext(lambda: build_model("cnn-small", 4, image_size=16), seed=0, workdir=tmp_path / "ck")
    r = d.run(data, ctx)
    info = r.info
    decisions = {t["q"]: t["decision"] for t in info["trials"]}
    # relabelling 40% or 25% of clean data with adversarial labels wrecks the held-out accuracy
    assert decisions[0.4] in ("abandoned", "rejected") and decisions[0.25] in ("abandoned", "rejected")
    assert info["q"] == 0.02 and info["stable"]
    assert int((~r.kept).sum()) == round(0.02 * len(data)) == info["isolated"]
    assert r.scores is not None and r.scores.shape == (len(data),)
    # the chosen model is about as accurate as an infected (= plain) model would be on fresh data
    from antibackdoor.metrics import accuracy

    assert accuracy(r.model, test) >= info["acc_infected_holdout"] - 0.1
    assert accuracy(r.model, test) > 0.8
    # the new labels differ from the given ones only on isolated samples
    assert torch.all((r.new_labels != data.y) <= ~r.kept)
    # a resumed run reuses the checkpoints and the recorded decisions, and lands on the same result
    ctx.resume = True
    r2 = d.run(data, ctx)
    assert r2.info["q"] == info["q"] and torch.equal(r2.kept, r.kept)
    assert [t["decision"] for t in r2.info["trials"]] == [t["decision"] for t in info["trials"]]
    # the k-distribution figure (AIBD Fig. 2) is drawn from the result alone (plus the evaluation-only ground
    # truth): a defense object that never ran draws it (it used to need the running object's last_stats)
    poison = torch.zeros(len(data), dtype=torch.bool)
    poison[:10] = True
    assert set(r.sample_stats) == {"k", "adv_label", "grad_norm"} and r.info["pgd_cap"] == 40
    assert torch.all(r.sample_stats["k"] <= 40)
    out = get_defense("aibd", "quick").write_plots(r, poison, tmp_path, true_labels=data.y)
    assert [p.name for p in out] == ["k_distribution.png"]
    # three panels (raw k, amplified k, adversarial labels) with everything, one with the scores alone
    bare = plot_k_distribution(r.scores, poison, tmp_path / "bare.png")
    from PIL import Image

    widths = [Image.open(f).size[0] for f in (out[0], bare)]
    assert widths[0] == 3 * widths[1]



def test_badnets_poison_is_isolated_into_the_target_class(mini):
    """Real images, a real trigger: the robust (high-k) samples of the guessed class are mostly poison."""
    from antibackdoor.attacks import get_attack
    from antibackdoor.metrics import split_metrics

    train = mini.train.subset(torch.arange(800))
    ps = get_attack("badnets").poison(train, 0.1, 0, torch.Generator().manual_seed(0))
    data, poison = ps.data, ps.poison_mask
    ep = dict(optimizer="adam", lr=2e-3, crop=0, flip=False, batch_size=64)
    d = get_defense("aibd", "quick", {
        "infected": {"epochs": 8, **ep}, "retrain": {"epochs": 1, **ep}, "holdout": 0.2, "qs": [0.5, 0.1],
        "pgd_cap": 40, "target_filter": True, "target_fraction": 0.02, "treatment": "unlearn",
    })
    r = d.run(data, DefenseContext(lambda: build_model("cnn-small", 10), seed=0))
    assert r.info["target"] == 0 and r.info["target_vote_count"] == 16  # ceil(0.02 * 800)
    # 50% of the data is more than the guessed class holds: skipped, as in the official code
    assert r.info["trials"][0] == {"q": 0.5, "decision": "skipped", "isolated": int((data.y == 0).sum())}
    assert r.info["q"] == 0.1
    iso = ~r.kept
    assert int(iso.sum()) == 80 and torch.all(data.y[iso] == 0)
    m = split_metrics(r.kept, poison)
    assert m["tpr"] > 0.6 and m["fpr"] < 0.05, m
    # poisoned samples are harder to flip than clean ones (the paper's first observation)
    k = r.sample_stats["k"].double()
    assert k[poison].mean() > k[~poison].mean() + 1
    # unlearning keeps the given labels (gradient ascent on D^t instead)
    assert r.new_labels is None
    assert "holdout_acc" in r.history["q100"][-1]
