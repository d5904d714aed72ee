from __future__ import annotations

import math

import pytest
import torch

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
    # the statistics are informative: some samples flip, at various steps
    assert (batched.flip_step > 0).any()


def test_pgd_stays_in_ball_and_box(trained_model, mini):
    x = mini.test.x[:64].double() / 255
    y = mini.test.y[:64]
    r = pgd(trained_model, x, y, PGDConfig(eps=4 / 255, step=1 / 255, steps=6),
            generator=torch.Generator().manual_seed(0))
    assert (r.x_adv - x).abs().max() <= 4 / 255 + 1e-9
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    assert trained_model.training is False
    # the attack raises the loss on average
    clean = pgd(trained_model, x, y, PGDConfig(eps=0, step=0, steps=0, random_start=False))
    assert r.loss.mean() > clean.loss.mean()


def test_early_stop_freezes_flipped_samples(trained_model, mini):
    x = mini.test.x[:64].double() / 255
    y = mini.test.y[:64]
    cfg = PGDConfig(eps=math.inf, step=1 / 255, steps=30, random_start=False, early_stop=True)
    r = pgd(trained_model, x, y, cfg)
    flipped = r.flip_step >= 0
    assert flipped.any()
    # a frozen sample sits exactly flip_step steps of size 1/255 away at most, and is misclassified there
    dist = (r.x_adv - x).abs().flatten(1).max(1).values
    assert torch.all(dist[flipped] <= r.flip_step[flipped].double() / 255 + 1e-9)
    assert torch.equal(r.pred[flipped], r.flip_label[flipped])
    assert torch.all(r.flip_label[flipped] != y[flipped])


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
