from __future__ import annotations

import pytest
import torch

from antibackdoor.adversarial import PGDConfig
from antibackdoor.errors import RunStateError, TrainingDivergedError
from antibackdoor.models import build_model
from antibackdoor.training import TrainConfig, train

CFG = TrainConfig(epochs=3, batch_size=64, optimizer="sgd", lr=0.05, schedule="step", milestones=(2,))


def _model(data, seed=0):
    torch.manual_seed(seed)
    return build_model("cnn-small", data.num_classes, mean=data.mean, std=data.std)


def test_training_learns(small_train):
    m = _model(small_train)
    hist = train(m, small_train, CFG, seed=1)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[2]["lr"] == pytest.approx(0.005)


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


def test_adversarial_training_runs(small_train):
    cfg = TrainConfig(epochs=1, batch_size=100, optimizer="sgd", lr=0.05,
                      adversary=PGDConfig(eps=8 / 255, step=4 / 255, steps=2))
    m = _model(small_train)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    hist = train(m, small_train, cfg)
    assert hist[0]["train_acc"] <= 1.0
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_nan_loss_is_reported(small_train):
    m = _model(small_train)
    with torch.no_grad():
        m.backbone.head.weight.fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match="loss became nan in epoch 1"):
        train(m, small_train, TrainConfig(epochs=1, batch_size=100))


def test_negative_weights_ascend(small_train):
    """Negative sample weights (unlearning) push the loss of those samples up."""
    m = _model(small_train)
    train(m, small_train, TrainConfig(epochs=2, batch_size=100, lr=2e-3, crop=0, flip=False), seed=0)
    from antibackdoor.metrics import accuracy

    before = accuracy(m, small_train)
    w = -torch.ones(len(small_train))
    train(m, small_train, TrainConfig(epochs=1, batch_size=100, lr=2e-3, crop=0, flip=False), sample_weight=w)
    assert accuracy(m, small_train) < before
