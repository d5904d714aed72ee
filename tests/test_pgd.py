from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from antibackdoor.adversarial import PGDConfig, pgd, pgd_statistics, symmetric_cross_entropy
from antibackdoor.adversarial.reference import pgd_statistics_loop
from antibackdoor.models import build_model
from antibackdoor.precision import PLAIN, Precision
from antibackdoor.training import TrainConfig, train


@pytest.fixture(scope="module")
def trained_model(mini):
    """A cnn-small trained briefly on real CIFAR-10, in float64 so batched and single runs agree exactly."""
    torch.manual_seed(0)
    data = mini.train.subset(torch.arange(600))
    m = build_model("cnn-small", 10, mean=data.mean, std=data.std)
    train(m, data, TrainConfig(epochs=2, optimizer="adam", lr=2e-3), precision=PLAIN)
    return m.double().eval()


@pytest.mark.parametrize(
    "cfg",
    [
        PGDConfig.ifgsm(2 / 255, 5, loss="sce"),  # A-ABL's split
        PGDConfig(eps=math.inf, step=1 / 255, steps=40, random_start=False, early_stop=True,
                  grad_norm_p=2.0),  # AIBD's flip counting
        PGDConfig(eps=8 / 255, step=2 / 255, steps=10, random_start=False),
    ],
)
def test_batched_statistics_equal_batch_of_one_loop(trained_model, mini, cfg):
    x, y = mini.train.x[600:680], mini.train.y[600:680]
    batched = pgd_statistics(trained_model, x, y, cfg, batch_size=32, dtype=torch.float64)
    loop = pgd_statistics_loop(trained_model, x, y, cfg, dtype=torch.float64)
    assert torch.equal(batched.flip_step, loop.flip_step)
    assert torch.equal(batched.flip_label, loop.flip_label)
    assert torch.equal(batched.pred, loop.pred)
    torch.testing.assert_close(batched.loss, loop.loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.grad_norm, loop.grad_norm.float(), rtol=1e-5, atol=1e-7)


def test_pgd_stays_in_ball_and_box(trained_model, mini):
    x = mini.test.x[:64].double() / 255
    y = mini.test.y[:64]
    r = pgd(trained_model, x, y, PGDConfig(eps=4 / 255, step=1 / 255, steps=6),
            generator=torch.Generator().manual_seed(0))
    assert (r.x_adv - x).abs().max() <= 4 / 255 + 1e-9
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    assert trained_model.training is False


def test_attack_on_a_known_classifier_lowers_the_margin_by_eps():
    """KnownMargins: each step of 1/255 takes one grey level off the margin pixel, the eps-ball stops it at
    eps, the box at 0; the loss is the cross-entropy of the lowered margin, and every sample's loss rises."""
    from conftest import KnownMargins, known_margin_set, margin_logits

    margins, y = torch.arange(1, 11), torch.arange(10) % 4
    x = known_margin_set(margins, y, 4).float_images()
    model = KnownMargins(4)
    r = pgd(model, x, y, PGDConfig(eps=4 / 255, step=1 / 255, steps=6, random_start=False))
    left = (margins - 4).clamp(min=0)
    torch.testing.assert_close(r.x_adv[:, 0, 0, 0] * 255, left.float())
    assert torch.equal((r.x_adv - x)[:, :, 1:], torch.zeros_like(x[:, :, 1:]))  # nothing else moves
    lowered = F.cross_entropy(margin_logits(left - 0.5, y, 4), y, reduction="none")
    torch.testing.assert_close(r.loss, lowered)
    clean = pgd(model, x, y, PGDConfig(eps=0, step=0, steps=0, random_start=False))
    assert (r.loss > clean.loss).all()


def test_early_stop_freezes_flipped_samples():
    """KnownMargins flips a sample whose margin pixel holds v after exactly v steps of 1/255, to class 0 (or 1
    for class-0 samples); with early stop it stays frozen there, v grey levels from the start."""
    from conftest import KnownMargins, known_margin_set

    margins, y = torch.tensor([0, 1, 2, 5, 9, 14, 30, 60]), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    x = known_margin_set(margins, y, 4).float_images()
    cfg = PGDConfig(eps=math.inf, step=1 / 255, steps=12, random_start=False, early_stop=True)
    r = pgd(KnownMargins(4), x, y, cfg)
    flips = margins <= 12
    assert torch.equal(r.flip_step, torch.where(flips, margins, -1))
    assert torch.equal(r.flip_label, torch.where(flips, (y == 0).long(), -1))
    flipped = r.flip_step >= 0
    dist = (r.x_adv - x).abs().flatten(1).max(1).values
    torch.testing.assert_close(dist[flipped] * 255, margins[flipped].float())
    assert torch.equal(r.pred[flipped], r.flip_label[flipped])
    # the statistics over a dataset, batched and streamed, are the same numbers
    stats = pgd_statistics(KnownMargins(4), (x * 255).round().byte(), y, cfg, batch_size=3)
    assert torch.equal(stats.flip_step, r.flip_step) and torch.equal(stats.flip_label, r.flip_label)


def test_sce_matches_definition():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    y = torch.tensor([0, 0])
    p = logits.softmax(1)
    ce = -p[torch.arange(2), y].log()
    q = torch.full_like(p, 1e-4)
    q[torch.arange(2), y] = 1.0
    rce = -(p * q.log()).sum(1)
    torch.testing.assert_close(symmetric_cross_entropy(logits, y, 0.1, 1.0), 0.1 * ce + rce)


def test_precisions_keep_the_statistics(trained_model, mini):
    """fp32 with channels_last batches gives the same statistics; bf16 autocast stays close."""
    import copy

    model = copy.deepcopy(trained_model).float()
    x, y = mini.train.x[600:664], mini.train.y[600:664]
    cfg = PGDConfig(eps=math.inf, step=1 / 255, steps=20, random_start=False, early_stop=True)
    plain = pgd_statistics(model, x, y, cfg, batch_size=16)
    nhwc = pgd_statistics(model, x, y, cfg, batch_size=16, precision=Precision("fp32", "cpu"))
    assert model.backbone.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain.flip_step, nhwc.flip_step)
    torch.testing.assert_close(plain.loss, nhwc.loss, rtol=2e-3, atol=1e-4)  # other fp32 kernels
    bf16 = pgd_statistics(model, x, y, cfg, batch_size=16, precision=Precision("bf16", "cpu"))
    assert bf16.loss.dtype == torch.float32
    assert float((bf16.flip_step == plain.flip_step).float().mean()) >= 0.7
