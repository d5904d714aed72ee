"""The training loop, checked where its answer is known: one epoch of full-batch SGD on a linear model is the
gradient step computed by hand, and sample weights and the adversary's images enter that step as they should;
the schedule, exact resume, AdamW's decay and a NaN loss. How well a short training learns is not tested here
(benchmarks/training_outcomes.py measures it)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from antibackdoor.adversarial import PGDConfig
from antibackdoor.errors import ConfigError, RunStateError, TrainingDivergedError
from antibackdoor.models import build_model
from antibackdoor.precision import PLAIN
from antibackdoor.training import TrainConfig, train

CFG = TrainConfig(epochs=3, batch_size=64, optimizer="sgd", lr=0.05, schedule="step", milestones=(2,))


def _model(data, seed=0):
    torch.manual_seed(seed)
    return build_model("cnn-small", data.num_classes, mean=data.mean, std=data.std)


def _linear(data, seed=0):
    """A linear classifier on the raw pixels: its gradient step is easy to compute by hand."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(data.x[0].numel(), data.num_classes))


def _sgd_step(model, x, y, lr, weight=None):
    """The parameters after one plain SGD step on the mean (weighted) cross-entropy of (x, y)."""
    model = copy.deepcopy(model)
    per = F.cross_entropy(model(x), y, reduction="none")
    loss = (per * weight).mean() if weight is not None else per.mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return [p.detach() - lr * g for p, g in zip(model.parameters(), grads, strict=True)]


# plain SGD, one batch per epoch, no augmentation: one epoch is exactly one gradient step
ONE_STEP = TrainConfig(epochs=1, batch_size=10_000, optimizer="sgd", lr=0.5, momentum=0.0, weight_decay=0.0,
                       crop=0, flip=False)


def test_one_epoch_of_full_batch_sgd_is_one_gradient_step(small_train):
    data = small_train.subset(torch.arange(64))
    m = _linear(data)
    expected = _sgd_step(m, data.float_images(), data.y, 0.5)
    hist = train(m, data, ONE_STEP, precision=PLAIN)
    for got, want in zip(m.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want)
    assert [h["epoch"] for h in hist] == [1] and hist[0]["lr"] == 0.5


def test_history_follows_the_schedule(small_train):
    hist = train(_linear(small_train), small_train, CFG, seed=1)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert [h["lr"] for h in hist] == pytest.approx([0.05, 0.05, 0.005])


def test_resume_after_interrupt_is_identical(small_train, tmp_path):
    ref = _model(small_train)
    train(ref, small_train, CFG, seed=1, checkpoint=tmp_path / "a.ckpt")

    def interrupt(epoch, model):
        if epoch == 1:
            raise KeyboardInterrupt

    m = _model(small_train)
    with pytest.raises(KeyboardInterrupt):
        train(m, small_train, CFG, seed=1, checkpoint=tmp_path / "b.ckpt", on_epoch_end=interrupt)
    with pytest.raises(RunStateError, match="--resume"):
        train(_model(small_train), small_train, CFG, seed=1, checkpoint=tmp_path / "b.ckpt")
    resumed = _model(small_train, seed=5)  # different init: everything must come from the checkpoint
    hist = train(resumed, small_train, CFG, seed=1, checkpoint=tmp_path / "b.ckpt", resume=True)
    assert len(hist) == 3
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_adversarial_training_trains_on_the_adversarys_images(small_train, monkeypatch):
    """With an adversary the loop takes its step on the images the adversary returns (here a known stand-in for
    PGD: the photographic negative), attacking the model being trained; that PGD then makes the
    model robust is a measurement (benchmarks/training_outcomes.py), and that training's adversary is the
    attack engine's PGD is tested in test_precision.py."""
    from antibackdoor import training

    data = small_train.subset(torch.arange(64))
    calls = []

    def negative(model, x, y, cfg, generator=None, precision=None):
        calls.append((cfg, model))
        return 1 - x

    monkeypatch.setattr(training, "adversarial_examples", negative)
    m = _linear(data)
    expected = _sgd_step(m, 1 - data.float_images(), data.y, 0.5)
    adv = PGDConfig(eps=8 / 255, step=4 / 255, steps=2)
    train(m, data, replace(ONE_STEP, adversary=adv), precision=PLAIN)
    assert calls == [(adv, m)]  # once per batch, against the model being trained
    for got, want in zip(m.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want)


def test_adam_applies_weight_decay():
    """``optimizer: adam`` with ``weight_decay`` is AdamW: with zero gradients every weight shrinks by
    lr * weight_decay per step (plain Adam silently ignored the configured decay)."""
    from antibackdoor.training import make_optimizer

    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(model, TrainConfig(optimizer="adam", lr=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for b, p in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), b * (1 - 0.1 * 0.5))
    with pytest.raises(ConfigError, match="weight_decay"):
        TrainConfig(weight_decay=-1.0).validate("train")


def test_nan_loss_is_reported(small_train):
    m = _model(small_train)
    with torch.no_grad():
        m.backbone.head.weight.fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match="loss became nan in epoch 1"):
        train(m, small_train, TrainConfig(epochs=1, batch_size=100))


def test_negative_weights_ascend(small_train):
    """Negative sample weights (unlearning) give those samples' loss the opposite sign in the step: exactly the
    gradient step on the weighted mean."""
    data = small_train.subset(torch.arange(64))
    w = torch.where(torch.arange(64) < 16, -1.0, 1.0)
    m = _linear(data)
    expected = _sgd_step(m, data.float_images(), data.y, 0.5, weight=w)
    plain = _sgd_step(m, data.float_images(), data.y, 0.5)
    train(m, data, ONE_STEP, sample_weight=w, precision=PLAIN)
    for got, want, other in zip(m.parameters(), expected, plain, strict=True):
        torch.testing.assert_close(got.detach(), want)
        assert not torch.allclose(got.detach(), other)
