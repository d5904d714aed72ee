"""The baselines' algorithmic pieces (ABL, NAD, CBD, D-BR/D-ST separation, D-ST losses), the training loop's
custom-loss hook and the trusted slice: small hand-checkable tensors, fp32, no training that must converge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_set

import antibackdoor as ab
from antibackdoor.data.trusted import reserve_trusted, trusted_counts
from antibackdoor.defenses.cbd import MIDiscriminator, cbd_weights, mi_estimate, normalise_weights
from antibackdoor.defenses.d_st import FrozenFeatures, mixed_head_loss, sensitivity_contrastive_loss
from antibackdoor.defenses.nad import NAD, attention_loss, attention_map
from antibackdoor.errors import ConfigError
from antibackdoor.models import build_model
from antibackdoor.precision import PLAIN, resolve_precision
from antibackdoor.stages import sample_features, sample_losses, top_fraction, unlearn
from antibackdoor.stages.abl import bounded_loss, isolate_lowest
from antibackdoor.stages.separation import (
    FCTDraw,
    apply_transforms,
    fct_scores,
    intra_class_loss,
    quantile_split,
)
from antibackdoor.training import StepOutput, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")




# -- ABL ---------------------------------------------------------------------------------------------------
def test_lga_and_flooding_values_per_sample_and_on_the_batch_mean():
    losses = torch.tensor([0.1, 0.4, 0.9, 2.0])
    # per sample: below the floor the loss is negated (LGA) or mirrored around b (flooding)
    assert bounded_loss(losses, "lga", 0.5, True).item() == pytest.approx((-0.1 - 0.4 + 0.9 + 2.0) / 4)
    assert bounded_loss(losses, "flooding", 0.5, True).item() == pytest.approx((0.9 + 0.6 + 0.9 + 2.0) / 4)
    # batch mean (the official code): mean 0.85 is above the floor, so both return it unchanged
    assert bounded_loss(losses, "lga", 0.5, False).item() == pytest.approx(0.85)
    assert bounded_loss(losses, "flooding", 0.5, False).item() == pytest.approx(0.85)
    assert bounded_loss(losses, "lga", 1.0, False).item() == pytest.approx(-0.85)
    assert bounded_loss(losses, "flooding", 1.0, False).item() == pytest.approx(1.15)
    with pytest.raises(ConfigError, match="abl.bound"):
        bounded_loss(losses, "clip")


@pytest.mark.parametrize("per_sample", [True, False])
def test_lga_and_flooding_have_the_same_gradient_when_gamma_equals_b(per_sample):
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    grads = []
    for bound in ("lga", "flooding"):
        z = logits.clone().requires_grad_(True)
        bounded_loss(F.cross_entropy(z, y, reduction="none"), bound, 1.1, per_sample).backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_lowest_loss_isolation_takes_the_ratio_with_ties_in_index_order():
    scores = torch.tensor([0.5, 0.1, 0.3, 0.1, 0.9, 0.2, 0.7, 0.8, 0.6, 0.4])
    assert torch.equal(isolate_lowest(scores, 0.3), torch.tensor([0, 1, 0, 1, 0, 1, 0, 0, 0, 0]).bool())
    assert int(isolate_lowest(scores, 0.01).sum()) == 1  # at least one sample
    assert torch.equal(top_fraction(torch.zeros(5), 0.4), torch.tensor([1, 1, 0, 0, 0]).bool())
    assert int(top_fraction(torch.arange(100.0), 0.29).sum()) == 29  # no float round-down to 28
    assert top_fraction(torch.arange(10.0), 0.2)[[8, 9]].all()
    # the one rule: round(fraction * N), at least one when the fraction is positive
    assert int(top_fraction(torch.arange(5170.0), 0.01).sum()) == 52
    assert int(top_fraction(torch.arange(10.0), 0.0).sum()) == 0


def ctx_for(classes=4, size=16):
    return ab.DefenseContext(lambda: build_model("cnn-small", classes, 3, size), precision=resolve_precision("fp32"))


def test_abl_scores_are_eval_mode_cross_entropy_without_augmentation():
    data = tiny_set()
    model = build_model("cnn-small", 4, 3, 16).train()
    a = sample_losses(model, data, ctx_for())
    assert model.training  # the mode is restored
    model.eval()
    with torch.no_grad():
        ref = torch.stack([F.cross_entropy(model(data.x[i:i + 1].float() / 255), data.y[i:i + 1])
                           for i in range(len(data))])
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)


def test_unlearning_is_gradient_ascent(train_calls):
    """unlearn trains the given model in place with every sample weighted -1 (that a weight of -1 turns the
    training step into ascent is tested in test_training.py)."""
    data = tiny_set()
    torch.manual_seed(0)
    model = build_model("cnn-small", 4, 3, 16)
    cfg = TrainConfig(epochs=2, optimizer="sgd", lr=0.01, batch_size=8, crop=0, flip=False)
    history = unlearn(ctx_for(), model, data, cfg, "unlearn")
    (call,) = train_calls
    assert call.stage == "unlearn" and call.model is model and call.data is data and call.cfg == cfg
    assert torch.equal(call.kwargs["sample_weight"], -torch.ones(len(data)))
    assert [h["epoch"] for h in history] == [1, 2]


# -- NAD ---------------------------------------------------------------------------------------------------
def test_attention_map_is_the_normalised_channel_mean_of_squares():
    f = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[1.0, 0.0], [2.0, -1.0]]]])  # 1 x 2 x 2 x 2
    a = attention_map(f)
    raw = torch.tensor([[(1 + 1) / 2, (4 + 0) / 2, (0 + 4) / 2, (9 + 1) / 2]])
    torch.testing.assert_close(a, raw / raw.norm(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_map(5 * f), a, rtol=1e-5, atol=1e-6)  # scale-free
    assert attention_loss(f, 3 * f).item() == pytest.approx(0.0, abs=1e-10)
    g = torch.zeros_like(f)
    g[0, 0, 0, 0] = 1.0  # all attention on one position
    expected = ((a - torch.tensor([[1.0, 0, 0, 0]])) ** 2).mean()
    assert attention_loss(f, g).item() == pytest.approx(expected.item(), rel=1e-5)


def test_nad_loss_is_cross_entropy_plus_beta_weighted_attention_distances():
    torch.manual_seed(0)
    student, teacher = build_model("cnn-small", 4, 3, 16).eval(), build_model("cnn-small", 4, 3, 16).eval()
    nad = ab.get_defense("nad", "quick", {"betas": [2.0, 3.0]})
    stages = nad.stages_for(student)
    assert stages == ["features.11", "features.14"]  # the last two of the model's four stages
    data = tiny_set(8)
    batch = ab_batch(data)
    out = nad.distillation_loss(teacher, stages)(student, batch)
    ce = F.cross_entropy(student(batch.x), batch.y)
    assert out.parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    at = [out.parts[f"at_{s}"] for s in stages]
    assert all(v.item() > 0 for v in at)
    assert out.loss.item() == pytest.approx(ce.item() + 2.0 * at[0].item() + 3.0 * at[1].item(), rel=1e-5)
    # the teacher's own maps give zero distance
    same = nad.distillation_loss(student, stages)(student, batch)
    assert same.loss.item() == pytest.approx(ce.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="--defense-param betas"):
        ab.get_defense("nad", "quick", {"betas": [1, 1, 1, 1, 1]}).stages_for(student)


def ab_batch(data):
    from antibackdoor.training import Batch

    return Batch(data.x.float() / 255, data.y, torch.arange(len(data)), None, 0, torch.Generator().manual_seed(0),
                 PLAIN)


# -- CBD ---------------------------------------------------------------------------------------------------
def test_cbd_weights_formula_and_batch_normalisation():
    lb = torch.tensor([0.01, 1.0, 3.0, 0.0])
    lc = torch.tensor([2.0, 1.0, 1.0, 0.0])
    w = cbd_weights(lb, lc)
    torch.testing.assert_close(w, torch.tensor([0.01 / 2.01, 0.5, 0.75, 0.0]))
    # a sample f_B fits much better than f_C (the backdoor) gets a small weight
    assert w[0] < 0.01
    n = normalise_weights(torch.tensor([0.1, 0.3, 0.6, 1.0]))
    assert n.mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(n / n[0], torch.tensor([1.0, 3.0, 6.0, 10.0]))


def test_mi_estimate_and_lipschitz_constraint():
    torch.manual_seed(0)
    disc = MIDiscriminator(5, 4, dropout=0.0)
    r, z = torch.randn(10, 5), torch.randn(10, 4)
    assert mi_estimate(disc, r, z, torch.arange(10)).item() == pytest.approx(0.0, abs=1e-7)
    assert mi_estimate(disc, r, z, torch.arange(10).flip(0)).item() != 0.0
    disc.lipschitz_()
    for m in disc.modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.linalg.matrix_norm(m.weight, ord=2).item() == pytest.approx(1.0, rel=1e-4)


# -- separation (D-BR, D-ST) -------------------------------------------------------------------------------
def test_fct_transform_and_score_with_a_fixed_draw():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros(3)
    torch.testing.assert_close(apply_transforms(x, zero, torch.zeros(3, 2)), x)
    # 90 degrees about the centre maps the pixel grid onto itself: a plain rot90 (either direction)
    r = apply_transforms(x, torch.full((3,), 90.0), torch.zeros(3, 2))
    assert torch.equal(r, torch.rot90(x, 1, (2, 3))) or torch.equal(r, torch.rot90(x, -1, (2, 3)))
    # a shift of 2 pixels along x: columns move by 2, zeros come in
    s = apply_transforms(x, zero, torch.tensor([[2.0, 0.0]] * 3))
    torch.testing.assert_close(s[..., 2:], x[..., :-2])
    assert (s[..., :2] == 0).all()
    data = tiny_set(12, size=8)
    model = build_model("cnn-small", 4, 3, 8)
    none = FCTDraw(torch.zeros(12), torch.zeros(12, 2))
    assert torch.equal(fct_scores(model, data, none), torch.zeros(12))
    draw = FCTDraw(torch.linspace(-180, 180, 12), torch.tensor([[1.0, -2.0]] * 12))
    plain = sample_features(model, data)
    moved = sample_features(model, data.with_images(
        (apply_transforms(data.x.float() / 255, draw.angle, draw.shift) * 255).round().byte()))
    scores = fct_scores(model, data, draw)
    assert scores.shape == (12,) and (scores > 0).all()
    # nearest-neighbour warps move pixels without changing them, so feeding the warped uint8 images agrees
    torch.testing.assert_close(scores, (plain - moved).pow(2).mean(1), rtol=1e-4, atol=1e-7)


def test_quantile_split_by_rank_with_thresholds():
    scores = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.0])
    clean, poisoned, g_c, g_p = quantile_split(scores, 0.2, 0.3)
    assert torch.equal(clean.nonzero().flatten(), torch.tensor([1, 9]))
    assert torch.equal(poisoned.nonzero().flatten(), torch.tensor([2, 4, 6]))
    assert (g_c, g_p) == (1.0, 7.0)
    with pytest.raises(ConfigError, match="overlap"):
        quantile_split(torch.zeros(3), 0.67, 0.67)


def test_intra_class_loss_is_the_mean_off_diagonal_centre_similarity():
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert intra_class_loss(f, y, 5).item() == pytest.approx(0.0)  # orthogonal centres; absent classes ignored
    g = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
    assert intra_class_loss(g, y, 3).item() == pytest.approx(0.5)  # [[0, 1], [1, 0]].mean()


# -- D-ST --------------------------------------------------------------------------------------------------
def test_head_loss_with_an_empty_poisoned_batch_is_finite():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    clean = torch.tensor([1, 1, 1, 0, 0, 0]).bool()
    none = torch.zeros(6, dtype=torch.bool)
    loss = mixed_head_loss(logits, y, clean, none, 0.001)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(F.cross_entropy(logits[:3], y[:3]).item())
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # with poisoned samples: CE(clean) - lambda * CE(poisoned)
    poison = torch.tensor([0, 0, 0, 1, 1, 0]).bool()
    expected = F.cross_entropy(logits[:3], y[:3]) - 0.5 * F.cross_entropy(logits[3:5], y[3:5])
    assert mixed_head_loss(logits, y, clean, poison, 0.5).item() == pytest.approx(expected.item())
    assert torch.isfinite(mixed_head_loss(logits, y, none, none))  # a batch from neither part


def test_contrastive_loss_ignores_the_labels_of_untrusted_samples():
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(6, 5, generator=g), dim=1)
    z2 = F.normalize(torch.randn(6, 5, generator=g), dim=1)
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    labelled = torch.tensor([1, 1, 1, 1, 0, 0]).bool()
    a = sensitivity_contrastive_loss(z1, z2, y, labelled, 0.1)
    b = sensitivity_contrastive_loss(z1, z2, torch.tensor([0, 0, 1, 1, 1, 0]), labelled, 0.1)
    assert a.item() == pytest.approx(b.item())
    # no labels at all: SimCLR, each anchor's only positive is its other view
    z = torch.cat([z1, z2])
    logits = (z @ z.T / 0.1).masked_fill(torch.eye(12, dtype=torch.bool), float("-inf"))
    log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
    simclr = -log_prob[torch.arange(12), (torch.arange(12) + 6) % 12].mean() * (0.1 / 0.07)
    unl = sensitivity_contrastive_loss(z1, z2, y, torch.zeros(6, dtype=torch.bool), 0.1)
    assert unl.item() == pytest.approx(simclr.item(), rel=1e-5)
    assert a.item() != pytest.approx(unl.item())  # trusted labels add positives


def test_frozen_features_train_only_the_head_and_keep_batchnorm_statistics():
    torch.manual_seed(0)
    model = build_model("cnn-small", 4, 3, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = FrozenFeatures(model)
    train(frozen, tiny_set(), TrainConfig(epochs=1, optimizer="adam", lr=1e-2, batch_size=8, crop=0, flip=False))
    after = frozen.release().state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert len(changed) == 2 and all(k.endswith(("head.weight", "head.bias")) for k in changed), changed
    assert all(q.requires_grad for q in model.parameters())


# -- the training loop's hooks -----------------------------------------------------------------------------
def test_custom_loss_parts_are_averaged_into_the_history_and_optimizer_carries_over():
    data = tiny_set(32)
    torch.manual_seed(0)
    model = build_model("cnn-small", 4, 3, 16)
    calls = []

    def loss_fn(m, batch):
        calls.append(len(batch.index))
        logits = m(batch.x)
        ce = F.cross_entropy(logits, batch.y)
        return StepOutput(ce, logits, {"const": torch.tensor(2.0), "ce_part": ce})

    cfg = TrainConfig(epochs=2, optimizer="sgd", lr=0.01, batch_size=8, crop=0, flip=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    hist = train(model, data, cfg, loss_fn=loss_fn, optimizer=opt)
    assert calls == [8] * 8
    assert hist[0]["const"] == pytest.approx(2.0) and hist[1]["ce_part"] == pytest.approx(hist[1]["loss"])
    assert "train_acc" in hist[0]
    assert opt.state  # the given optimizer did the steps
    no_logits = train(model, data, cfg, loss_fn=lambda m, b: StepOutput(m(b.x).pow(2).mean()))
    assert "train_acc" not in no_logits[0]


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_custom_loss_runs_in_the_loops_precision(name):
    """The hook gets the loop's precision, runs under its autocast (low-precision logits) and its batches are
    in the prepared model's layout; fp16 steps go through the gradient scaler."""
    data = tiny_set(16)
    torch.manual_seed(0)
    model = build_model("cnn-small", 4, 3, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def loss_fn(m, batch):
        logits = m(batch.x)
        seen.append((batch.precision.name, logits.dtype, batch.x.is_contiguous(memory_format=torch.channels_last)))
        return StepOutput(F.cross_entropy(logits.float(), batch.y), logits)

    cfg = TrainConfig(epochs=1, optimizer="sgd", lr=0.01, batch_size=8, crop=0, flip=False)
    hist = train(model, data, cfg, loss_fn=loss_fn, precision=name)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    assert seen == [(name, dtype, True)] * 2
    assert torch.isfinite(torch.tensor(hist[0]["loss"])) and "train_acc" in hist[0]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_warmup_scales_the_first_epochs():
    cfg = TrainConfig(epochs=10, lr=1.0, schedule="none", warmup_epochs=3)
    assert [round(cfg.lr_at(e), 4) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ConfigError, match="warmup_epochs"):
        TrainConfig(warmup_epochs=-1).validate("train")


# -- trusted slice and parameter errors --------------------------------------------------------------------
def test_trusted_slice_is_stratified_seeded_and_errors_name_the_key():
    data = tiny_set(200, classes=4)
    data.y[:80] = 0  # an unbalanced class: 80 + 40 + 40 + 40
    data.y[80:] = torch.arange(120) % 3 + 1
    m1 = reserve_trusted(data, 0.1, torch.Generator().manual_seed(3))
    m2 = reserve_trusted(data, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(m1, m2)
    assert torch.bincount(data.y[m1], minlength=4).tolist() == [8, 4, 4, 4]
    assert not torch.equal(m1, reserve_trusted(data, 0.1, torch.Generator().manual_seed(4)))
    with pytest.raises(ConfigError, match="trusted_fraction.*without a trusted sample"):
        trusted_counts(data, 0.01)
    with pytest.raises(ConfigError, match="every training sample"):
        trusted_counts(data, 0.99)
    with pytest.raises(ConfigError, match="must be in"):
        trusted_counts(data, 0.0)


def test_nad_without_a_trusted_slice_fails_clearly():
    data = tiny_set()
    nad = ab.get_defense("nad", "quick", {"backdoored": {"epochs": 0}})
    with pytest.raises(ConfigError, match="needs a trusted slice"):
        nad.run(data, ab.DefenseContext(lambda: build_model("cnn-small", 4, 3, 16)))
    assert isinstance(nad, NAD) and nad.trusted_fraction() == 0.05


@pytest.mark.parametrize("name,overrides,key", [
    ("abl", {"bound": "clip"}, "--defense-param bound"),
    ("abl", {"isolation_ratio": 1.5}, "--defense-param isolation_ratio"),
    ("abl", {"unlearn": {"optimizer": "rmsprop"}}, "--defense-param unlearn.optimizer"),
    ("nad", {"trusted_fraction": 0}, "--defense-param trusted_fraction"),
    ("nad", {"betas": [-1.0]}, "--defense-param betas"),
    ("cbd", {"mi_lr": 0}, "--defense-param mi_lr"),
    ("d-br", {"separation": {"clean_ratio": 0.9, "poison_ratio": 0.2}}, "--defense-param separation"),
    ("d-br", {"separation": {"warmup": {"schedule": "linear"}}}, "--defense-param separation.warmup.schedule"),
    ("d-st", {"temperature": -1}, "--defense-param temperature"),
    ("d-st", {"contrastive": {"crop": 4}}, "--defense-param contrastive"),
    ("d-st", {"separation": {"rotate": 400}}, "--defense-param separation.rotate"),
])
def test_bad_parameters_name_the_key(name, overrides, key):
    with pytest.raises(ConfigError) as err:
        ab.get_defense(name, "quick", overrides)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_every_baseline_is_registered_with_two_different_presets():
    for name in ("abl", "nad", "cbd", "d-br", "d-st"):
        quick, paper = ab.get_defense(name, "quick"), ab.get_defense(name, "paper")
        assert quick.describe()["name"] == name and name in ab.DEFENSES
        assert quick.params != paper.params
