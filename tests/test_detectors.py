"""Isolation detectors: each one's math on constructed data, the rules, the registry, and the detector +
treatment defense (its quick configuration is A-ABL)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import antibackdoor as ab
from antibackdoor.data.imageset import ImageSet
from antibackdoor.defenses.base import DefenseContext
from antibackdoor.detectors import DETECTORS, IsolationRule, apply_rule, detection_metrics, get_detector
from antibackdoor.detectors.base import DetectionResult
from antibackdoor.errors import ConfigError


class FeatureModel(nn.Module):
    """A 'model' whose penultimate features are the pixels themselves (in [0, 1]): features are planted in
    the images, so a detector's answer on them can be worked out by hand."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(x.flatten(1))


def feature_set(features: torch.Tensor, labels: torch.Tensor, classes: int) -> ImageSet:
    """Images (1 x 1 x D, uint8) that carry ``features`` (in [0, 1]) as pixel values."""
    x = (features.clamp(0, 1) * 255).round().to(torch.uint8)[:, None, None, :]
    return ImageSet(x, labels.long(), [str(c) for c in range(classes)], (0.5,), (0.25,), "planted")


def test_registry_lists_every_detector(capsys):
    from antibackdoor.cli import main

    assert main(["detectors"]) == 0
    out = capsys.readouterr().out
    for name in ("ifgsm-sce", "aibd-flip", "activation-clustering", "spectral-signature", "scale-up",
                 "randaugment-sce", "autoaugment-sce", "augmix-sce", "dbd-sce", "abl-loss", "dst-fct"):
        assert name in DETECTORS and name in out
    with pytest.raises(ConfigError, match="unknown detector"):
        get_detector("nope")
    with pytest.raises(ConfigError, match="rule.kind"):
        get_detector("scale-up", overrides={"rule": {"kind": "median"}})


def test_rules_on_both_orientations():
    s = torch.tensor([0.1, 0.2, 0.15, 5.0, 5.1, 4.9, 0.12, 0.11])
    iso, t = apply_rule(s, True, IsolationRule("otsu"))
    assert iso.tolist() == [False, False, False, True, True, True, False, False] and 0.2 < t < 4.9
    iso, _ = apply_rule(s, False, IsolationRule("otsu"))
    assert iso.tolist() == [True, True, True, False, False, False, True, True]
    iso, _ = apply_rule(s, True, IsolationRule("top", 0.25))
    assert iso.nonzero().squeeze(1).tolist() == [3, 4]
    iso, _ = apply_rule(s, False, IsolationRule("top", 0.25))
    assert iso.nonzero().squeeze(1).tolist() == [0, 7]
    iso, _ = apply_rule(s, True, IsolationRule("threshold", 5.0))
    assert iso.nonzero().squeeze(1).tolist() == [3, 4]
    native = torch.zeros(8, dtype=torch.bool)
    native[2] = True
    assert apply_rule(s, True, IsolationRule(), native)[0].tolist() == native.tolist()
    with pytest.raises(ConfigError, match="no rule of its own"):
        apply_rule(s, True, IsolationRule())


def test_detection_metrics_auc():
    mask = torch.tensor([True, True, False, False, False])
    r = DetectionResult(torch.tensor([0.9, 0.3, 0.5, 0.1, 0.2], dtype=torch.float64), True,
                        torch.tensor([True, False, True, False, False]))
    m = detection_metrics(r, mask)
    assert m["tpr"] == 0.5 and m["fpr"] == pytest.approx(1 / 3)
    assert m["auc"] == pytest.approx(5 / 6)  # 5 of the 6 (poisoned, clean) pairs are ordered correctly
    r.higher_is_suspicious = False
    assert detection_metrics(r, mask)["auc"] == pytest.approx(1 / 6)


def test_spectral_score_is_the_closed_form():
    from antibackdoor.detectors.spectral_signature import spectral_scores

    # rank one: rows a_i * u; centred rows (a_i - mean a) u, top singular vector +-u, score (a_i - mean a)^2
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(12, generator=g, dtype=torch.float64), dim=0)
    a = torch.randn(30, generator=g, dtype=torch.float64)
    assert torch.allclose(spectral_scores(a[:, None] * u[None, :]), (a - a.mean()) ** 2, atol=1e-10)
    # general case: equals the projection on numpy's top right singular vector
    import numpy as np

    f = torch.randn(40, 8, generator=g, dtype=torch.float64)
    c = f.numpy() - f.numpy().mean(0)
    v = np.linalg.svd(c)[2][0]
    assert np.allclose(spectral_scores(f).numpy(), (c @ v) ** 2)


def planted(n_per_class=60, planted_share=0.2, dim=16, seed=0):
    """Class 0: features around one centre, a share of them around a far "trigger" centre; class 1: two
    equal halves around two centres (a clean class with two modes, which the size rule must not flag)."""
    g = torch.Generator().manual_seed(seed)
    half = torch.arange(dim) < dim // 2
    centres = torch.stack([torch.full((dim,), 0.5), torch.where(half, 0.3, 0.6), torch.where(half, 0.6, 0.3),
                           torch.where(half, 0.95, 0.05)])
    labels = torch.cat([torch.zeros(n_per_class), torch.ones(n_per_class)]).long()
    k = int(planted_share * n_per_class)
    which = torch.cat([torch.zeros(n_per_class), torch.ones(n_per_class // 2),
                       torch.full((n_per_class - n_per_class // 2,), 2.0)]).long()
    which[:k] = 3
    feats = centres[which] + 0.03 * torch.randn(len(labels), dim, generator=g)
    poison = torch.zeros(len(labels), dtype=torch.bool)
    poison[:k] = True
    return feats, labels, poison


def test_activation_clustering_flags_a_planted_cluster():
    feats, labels, poison = planted()
    data = feature_set(feats, labels, 2)
    ctx = DefenseContext(lambda: FeatureModel(16, 2), seed=0)
    # FastICA to 2 dimensions: the planted direction plus one noise direction. At the paper's 10 dimensions,
    # unit-variance whitening lifts 9 noise directions of 60 samples to the planted one's scale and 2-means
    # finds the planted cluster for a third to a half of the seeds (simulated over 30-60 seeds; with 2
    # dimensions 60 of 60), so 10 dimensions here would pass or fail by the seed.
    det = get_detector("activation-clustering", overrides={"dims": 2})
    r = det.score(data, ctx, model=FeatureModel(16, 2))
    assert torch.equal(r.isolated, poison)  # the 20 % cluster of class 0, nothing in the clean class
    assert r.info["classes"][0]["flagged"] and not r.info["classes"][1]["flagged"]
    class0 = labels == 0
    assert r.scores[poison].min() > r.scores[class0 & ~poison].max()  # far from the class's main cluster
    # a cluster holding more than 35 % of its class is not flagged (the paper's relative-size rule) ...
    feats, labels, poison = planted(planted_share=0.45)
    r = det.score(feature_set(feats, labels, 2), ctx, model=FeatureModel(16, 2))
    assert not r.isolated.any()
    # ... unless the threshold allows it
    det = get_detector("activation-clustering", overrides={"max_share": 0.5, "reduce": "pca"})
    assert torch.equal(det.score(feature_set(feats, labels, 2), ctx, model=FeatureModel(16, 2)).isolated, poison)


def test_spectral_signature_removes_1_5_eps_per_class():
    feats, labels, poison = planted(n_per_class=100, planted_share=0.1)
    data = feature_set(feats, labels, 2)
    ctx = DefenseContext(lambda: FeatureModel(16, 2), seed=0)
    r = get_detector("spectral-signature", overrides={"poison_rate": 0.1}).score(data, ctx, FeatureModel(16, 2))
    assert r.info["removed_per_class"] == {0: 15, 1: 15}
    assert r.isolated[poison].all() and int(r.isolated.sum()) == 30


class ChannelMean(nn.Module):
    """Predicts the channel with the largest mean intensity (ends in a Linear layer like every model)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(3))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(x.mean((2, 3)))


def test_scale_up_consistency_on_a_constructed_model():
    from antibackdoor.detectors.scale_up import scaled_consistency

    a = torch.zeros(3, 4, 4)
    a[0], a[1] = 77 / 255, 13 / 255  # channel 0 stays ahead at every amplification: consistent
    b = torch.zeros(3, 4, 4)
    b[0, :2], b[1] = 230 / 255, 102 / 255  # channel 0 ahead (0.45 vs 0.40), but it saturates at x3: flips
    x = (torch.stack([a, b]) * 255).round().to(torch.uint8)
    spc = scaled_consistency(ChannelMean(), x, (3, 5, 7, 9, 11), "cpu")
    assert spc.tolist() == [1.0, 0.0]
    # on a random network the batched SPC equals a per-image computation
    torch.manual_seed(0)
    net = ab.build_model("cnn-small", 10)
    imgs = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    spc = scaled_consistency(net, imgs, (3, 5, 7), "cpu", batch_size=7)
    net.eval()
    with torch.no_grad():
        for i in range(20):
            xi = imgs[i:i + 1].float() / 255
            base = net(xi).argmax(1)
            same = sum(int(net((xi * n).clamp(0, 1)).argmax(1) == base) for n in (3, 5, 7))
            assert spc[i] == pytest.approx(same / 3)


def test_strong_augmentations_draw_per_sample():
    from antibackdoor.data import strong_augment as sa

    class Add(nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, x):
            return x + self.v

    x = torch.zeros(6, 3, 2, 2)
    choice = torch.tensor([0, 1, 2, 1, 0, 2])
    active = torch.tensor([True, True, True, False, True, True])
    out = sa.apply_grouped(x, choice, [Add(0.1), Add(0.2), Add(0.3)], active)
    assert out[:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.0, 0.1, 0.3])
    # one image repeated: every copy gets its own chains and weights (kornia alone would share the ops)
    torch.manual_seed(0)
    img = torch.rand(1, 3, 16, 16).repeat(12, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    for fn in (sa.augmix, sa.randaugment, sa.autoaugment):
        y = fn(img, generator=g)
        assert y.shape == img.shape and 0 <= float(y.min()) and float(y.max()) <= 1
        distinct = len({tuple(v.flatten().tolist()) for v in y})
        assert distinct >= (12 if fn is sa.augmix else 3), (fn.__name__, distinct)
    # 1-channel data works too
    assert sa.augmix(torch.rand(4, 1, 8, 8), generator=g).shape == (4, 1, 8, 8)


def test_core_scorers_are_unchanged(small_train):
    """ifgsm-sce and aibd-flip give the numbers of A-ABL's split and AIBD's amplified counts."""
    from antibackdoor.adversarial.pgd import pgd_statistics
    from antibackdoor.defenses.a_abl import AABL
    from antibackdoor.stages.aibd import amplified_scores, flip_config, flip_counts

    data = small_train.subset(torch.arange(64))
    torch.manual_seed(0)
    model = ab.build_model("cnn-small", 10)
    ctx = DefenseContext(ab.model_factory("cnn-small", data))
    ref = AABL("quick").split_scores(model, data, ctx)
    r = get_detector("ifgsm-sce").score(data, ctx, model=model)
    assert torch.equal(r.scores, ref.double()) and not r.higher_is_suspicious
    stats = pgd_statistics(model, data.x, data.y, flip_config(1 / 255, 20))
    ref = amplified_scores(flip_counts(stats, 20), stats.grad_norm)
    r = get_detector("aibd-flip", overrides={"pgd_cap": 20}).score(data, ctx, model=model)
    assert torch.equal(r.scores, ref) and torch.equal(r.labels, stats.flip_label)


def test_aibd_flip_target_filter_on_a_known_classifier():
    """aibd-flip's target filter on KnownMargins, whose flip counts are the margins written in the images (1-8
    steps alike in every class): BadNets poison labelled 3 never flips, so class 3 crowds the top of the ranking,
    the filter scores only class 3 and the top-5 % rule isolates exactly the poison; on the same data without
    poison no class has a surplus and the filter leaves the scores as they are."""
    from conftest import KnownMargins, known_margin_set

    classes, target, n = 10, 3, 600
    data = known_margin_set(1 + torch.arange(n) // classes % 8, torch.arange(n) % classes, classes)
    model = KnownMargins(classes, target)
    ctx = DefenseContext(lambda: model)
    over = {"pgd_cap": 20, "rule": {"kind": "top", "value": 0.05}}
    filtered = get_detector("aibd-flip", overrides={**over, "target_filter": True})
    plain = get_detector("aibd-flip", overrides=over)
    poisoned = ab.get_attack("badnets").poison(data, 0.05, target, ab.seeded(0))
    r = filtered.score(poisoned.data, ctx, model=model)
    assert r.info["target"] == target and r.info["target_filter_applied"] and r.info["target_p"] < 1e-6
    assert torch.equal(r.isolated, poisoned.poison_mask)
    others = poisoned.data.y != target
    assert r.scores[others].max() < r.scores[~others].min()  # every other class ranks below the candidates
    clean = filtered.score(data, ctx, model=model)
    assert clean.info["target"] is None and not clean.info["target_filter_applied"]
    assert torch.equal(clean.scores, plain.score(data, ctx, model=model).scores)


def test_paper_settings_give_isolate_then_train_the_defenses_split(small_train):
    """Under --preset paper a dataset's settings for A-ABL (split eps 1/255 on Tiny-ImageNet) and AIBD reach the
    detector inside isolate-then-train, which then scores as the defenses themselves do on that dataset."""
    from antibackdoor.adversarial.pgd import pgd_statistics
    from antibackdoor.data.imageset import PaperSettings
    from antibackdoor.data.tiny_imagenet import TINY_PAPER
    from antibackdoor.defenses.base import get_defense
    from antibackdoor.stages.aibd import amplified_scores, flip_config, flip_counts

    data = small_train.subset(torch.arange(64))
    torch.manual_seed(0)
    model = ab.build_model("cnn-small", 10)
    ctx = DefenseContext(ab.model_factory("cnn-small", data))
    aabl = get_defense("a-abl", "paper", {}, TINY_PAPER)
    iso = get_defense("isolate-then-train", "paper", {}, TINY_PAPER)
    ref = aabl.split_scores(model, data, ctx)
    assert torch.equal(iso.detector.score(data, ctx, model=model).scores, ref.double())
    assert not torch.equal(get_detector("ifgsm-sce", "paper").score(data, ctx, model=model).scores, ref.double())
    paper = PaperSettings(defense_params={"aibd": {"pgd_step": 2 / 255, "pgd_cap": 20}})
    aibd = get_defense("aibd", "paper", {}, paper)
    flip = get_defense("isolate-then-train", "paper", {"detector": "aibd-flip"}, paper)
    a = aibd.params
    stats = pgd_statistics(model, data.x, data.y, flip_config(a.pgd_step, a.pgd_cap, a.grad_norm_p))
    want = amplified_scores(flip_counts(stats, aibd.params.pgd_cap), stats.grad_norm)
    assert torch.equal(flip.detector.score(data, ctx, model=model).scores, want)


def tiny_quick(extra=None):
    over = {"detector_params": {"model": {"epochs": 1}},
            "train": {"epochs": 1, "adversary": {"steps": 1}}}
    return {**over, **(extra or {})}


def test_isolate_then_train_quick_is_a_abl(small_train):
    """The detector + treatment defense in its quick configuration reproduces A-ABL exactly."""
    data = small_train
    ctx = DefenseContext(ab.model_factory("cnn-small", data), seed=3)
    a = ab.get_defense("a-abl", "quick", {"naive": {"epochs": 1},
                                          "final": {"epochs": 1, "adversary": {"steps": 1}}}).run(data, ctx)
    b = ab.get_defense("isolate-then-train", "quick", tiny_quick()).run(data, ctx)
    assert torch.equal(a.kept, b.kept) and torch.equal(a.scores.double(), b.scores)
    assert a.info["threshold"] == b.info["threshold"]
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.parametrize("treatment", ["drop", "relabel", "unlearn"])
def test_treatments_train_on_what_they_say(small_train, monkeypatch, train_calls, treatment):
    data = small_train
    n = len(data)
    isolated = torch.zeros(n, dtype=torch.bool)
    isolated[:30] = True
    proposed = torch.full((n,), -1)
    proposed[:20] = (data.y[:20] + 1) % 10  # a proposed label for 20 of the 30 isolated samples

    def fake_score(self, d, ctx, model=None):
        return DetectionResult(torch.arange(len(d), dtype=torch.float64), True, isolated.clone(), "s", proposed,
                               None, {"threshold": None})

    monkeypatch.setattr(DETECTORS["spectral-signature"], "score", fake_score)
    train_calls.train = False  # what is trained on is the point, not the training
    r = ab.get_defense("isolate-then-train", "quick", {"detector": "spectral-signature", "treatment": treatment,
                                                       "train": {"adversary": None}}).run(
        data, DefenseContext(ab.model_factory("cnn-small", data)))
    assert torch.equal(r.kept, ~isolated)
    relabelled = torch.where(proposed >= 0, proposed, data.y)
    # per treatment: the samples trained on, their labels, their loss weights; relabel drops an isolated sample
    # without a proposed label, unlearn keeps every isolated one with weight -1
    trained, labels, weight = {
        "drop": (~isolated, data.y, torch.ones(n)),
        "relabel": (~isolated | (proposed >= 0), relabelled, torch.ones(n)),
        "unlearn": (torch.ones(n, dtype=torch.bool), data.y, torch.where(isolated, -1.0, 1.0)),
    }[treatment]
    (call,) = train_calls
    assert torch.equal(call.data.y, labels[trained])
    given = call.kwargs["sample_weight"]  # None: every weight 1
    assert torch.equal(torch.ones(len(call.data)) if given is None else given.cpu(), weight[trained])
    assert torch.equal(r.new_labels if r.new_labels is not None else data.y, labels)


def test_isolate_then_train_end_to_end(tmp_path, tiny_npz):
    """The Table 2 configuration (naive training on the kept set) with another detector, through the runner."""
    cfg = {"dataset": f"npz:{tiny_npz}", "model": "cnn-small", "defense": "isolate-then-train",
           "out": str(tmp_path), "defense_params": {
               "detector": "spectral-signature", "detector_params": {"model": {"epochs": 1}},
               "train": {"epochs": 1, "adversary": None}}}
    r = ab.run_experiment(cfg)
    m = r.metrics
    assert m["defense_info"]["detector"] == "spectral-signature" and m["isolated"] > 0
    assert (r.run_dir / "isolation.csv").is_file() and (r.run_dir / "roc.png").is_file()
    assert 0 <= m["auc"] <= 1
    resolved = (r.run_dir / "config.yaml").read_text()
    assert "detector_resolved" in resolved and "removal_factor" in resolved
    assert json.loads((r.run_dir / "metrics.json").read_text())["defense_info"]["rule"] == "native"


def test_bad_settings_are_config_errors_before_any_work(tmp_path, tiny_npz):
    with pytest.raises(ConfigError, match="treatment"):
        ab.get_defense("isolate-then-train", "quick", {"treatment": "burn"})
    with pytest.raises(ConfigError, match="unknown detector"):
        ab.get_defense("isolate-then-train", "quick", {"detector": "nope"})
    # the detector's own parameters are checked when the defense is built: unknown keys, wrong types, ...
    with pytest.raises(ConfigError, match=r"^--defense-param detector_params.facto: unknown parameter of detector "
                                          r"scale-up"):
        ab.get_defense("isolate-then-train", "quick", {"detector": "scale-up", "detector_params": {"facto": [2]}})
    with pytest.raises(ConfigError, match=r"reduce: 'svd' is not one of ica, pca"):
        get_detector("activation-clustering", overrides={"reduce": "svd"})
    # ... and a rule the detector cannot follow ('native' where it has no rule of its own)
    with pytest.raises(ConfigError, match="ifgsm-sce has no rule of its own"):
        get_detector("ifgsm-sce", overrides={"rule": {"kind": "native"}})
    assert get_detector("spectral-signature").params.rule.kind == "native"
    # through the runner: the run stops before its directory exists
    from antibackdoor.cli import main

    out = tmp_path / "runs"
    code = main(["run", "--dataset", f"npz:{tiny_npz}", "--defense", "isolate-then-train", "--defense-param",
                 "detector_params.rule.kind=native", "--out", str(out)])
    assert code == 2 and not out.exists()


def test_scoring_runs_in_the_context_precision():
    """Detectors compute in ctx.precision (bf16 autocast where asked), like the training loop and PGD."""
    from antibackdoor.detectors.scale_up import scaled_consistency
    from antibackdoor.models.features import capture, penultimate_features
    from antibackdoor.precision import resolve_precision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ab.build_model("cnn-small", 10).eval()
    imgs = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    bf16 = resolve_precision("bf16")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), capture(net, stages=False) as f:
        net((imgs.float() / 255).contiguous(memory_format=torch.channels_last))  # the layout bf16.batch gives
    expected = f.penultimate.float()
    got = penultimate_features(net, imgs, precision=bf16)
    assert torch.equal(got, expected)
    assert not torch.equal(got, penultimate_features(net, imgs))  # fp32 features differ from bf16 ones
    spc = scaled_consistency(net, imgs, (3, 5), "cpu", precision=bf16)
    assert spc.shape == (8,) and ((spc >= 0) & (spc <= 1)).all()
