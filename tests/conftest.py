"""Shared fixtures: small slices of the bundled real CIFAR-10, tiny synthetic .npz files, a spy on the training
that defense stages start, and a classifier whose answers are known without training."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("ANTIBACKDOOR_PROGRESS", "0")
# precision "auto" means fp32 in every test (and in the CLI runs they start), so that no outcome depends on
# whether this CPU runs bf16 natively; tests of bf16/fp16 ask for them explicitly
os.environ["ANTIBACKDOOR_PRECISION"] = "fp32"
# CI has 2 quiet cores; on a busy machine set ANTIBACKDOOR_TEST_THREADS=1 to avoid oversubscription
torch.set_num_threads(int(os.environ.get("ANTIBACKDOOR_TEST_THREADS", min(2, torch.get_num_threads()))))


@pytest.fixture(scope="session")
def mini():
    from antibackdoor.data import load_dataset

    return load_dataset("cifar10-mini")


@pytest.fixture()
def small_train(mini):
    """300 real CIFAR-10 training images (every class present)."""
    return mini.train.subset(torch.arange(300))


def write_npz(path, n_train=240, n_test=60, size=16, classes=4, seed=0, **override):
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8),
        "y_test": np.arange(n_test) % classes,
    }
    # make the classes learnable: class c brightens quadrant c
    for key_x, key_y in (("x_train", "y_train"), ("x_test", "y_test")):
        x, y = arrays[key_x], arrays[key_y]
        for c in range(classes):
            r, q = divmod(c, 2)
            h = size // 2
            x[y == c, r * h:(r + 1) * h, q * h:(q + 1) * h] //= 4
    arrays.update(override)
    np.savez(path, **arrays)
    return path


@pytest.fixture()
def tiny_npz(tmp_path):
    return write_npz(tmp_path / "tiny.npz")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny networks gain nothing from two and lose badly on a shared, busy CPU
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``; module-scoped so that the
    module's own module-scoped fixtures can request it too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_set(n: int = 40, size: int = 16, classes: int = 4, seed: int = 0):
    """``n`` random uint8 images of ``size`` x ``size``, labels cycling through ``classes``: data that only has to
    flow through a defense, not be learned."""
    from antibackdoor.data.imageset import ImageSet

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % classes
    return ImageSet(x, y, [f"c{i}" for i in range(classes)], (0.5,) * 3, (0.25,) * 3, "tiny")


# -- which stages got trained with what ------------------------------------------------------------------------
#: where every defense stage's training loop is looked up (``train_stage`` calls ``<module>.train``): the one
#: place to change when the stages move
STAGE_TRAIN = "antibackdoor.stages.fit.train"


@dataclass
class TrainCall:
    """One training run a stage started: the arguments ``training.train`` got."""

    stage: str  # the stage name (train's ``desc``)
    data: Any  # the ImageSet it trained on
    model: nn.Module
    cfg: Any  # its TrainConfig
    kwargs: dict = field(default_factory=dict)  # the rest: seed, sample_weight, on_epoch_end, loss_fn, ...


class TrainSpy(list):
    """The stages' training runs in call order (a list of TrainCall). ``train = False`` skips the training
    itself: the model stays as built and the stage's history is empty."""

    def __init__(self, real):
        super().__init__()
        self.real = real
        self.train = True

    def __call__(self, model, data, cfg, **kwargs):
        self.append(TrainCall(kwargs.get("desc", "train"), data, model, cfg, kwargs))
        return self.real(model, data, cfg, **kwargs) if self.train else []

    @property
    def stages(self) -> list[str]:
        return [c.stage for c in self]


@pytest.fixture()
def train_calls(monkeypatch) -> TrainSpy:
    """Records every training run a defense stage starts (``train_stage``), and still trains."""
    import importlib

    module, name = STAGE_TRAIN.rsplit(".", 1)
    spy = TrainSpy(getattr(importlib.import_module(module), name))
    monkeypatch.setattr(STAGE_TRAIN, spy)
    return spy


# -- a classifier whose answers are known ----------------------------------------------------------------------
class KnownMargins(nn.Module):
    """A classifier whose every answer is known, with no training.

    It predicts the class written as the grey level of pixel (0, 0) in channel 1 (mod ``classes``), with a logit
    of (grey level of pixel (0, 0) in channel 0) - 0.5 for that class and 0 for every other. An image whose
    bottom-right 3x3 patch is brighter than 0.5 in every channel (BadNets' white patch) is predicted as
    ``target`` instead, with a logit of 255 * (the patch's mean) - 0.5.

    Only the margin pixel (or the patch) carries gradient, so a sign-gradient step of s lowers the logit by
    exactly 255 * s (until the pixel reaches 0): with steps of 1/255 a sample whose margin pixel holds v <= 15
    flips after exactly v steps, to the first other class, and an L-inf attack of eps lowers its logit to
    max(v - 255 * eps, 0) - 0.5. A logit above ~17 saturates float32's softmax: the loss's gradient is exactly 0
    and no attack moves the sample (a triggered one, or a clean one with a margin of 20 or more). Training
    cannot change any of that: its one parameter is added to every logit alike.
    """

    def __init__(self, classes: int, target: int = 0):
        super().__init__()
        self.classes, self.target = classes, target
        self.anchor = nn.Parameter(torch.zeros(()))  # an optimizer needs a parameter; softmax ignores it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        written = (x[:, 1, 0, 0] * 255).round().long() % self.classes
        patch = x[:, :, -3:, -3:]
        triggered = patch.amin(dim=(1, 2, 3)) > 0.5
        label = torch.where(triggered, torch.full_like(written, self.target), written)
        logit = torch.where(triggered, patch.mean(dim=(1, 2, 3)) * 255, x[:, 0, 0, 0] * 255) - 0.5
        return F.one_hot(label, self.classes).float() * logit[:, None] + self.anchor


def known_margin_set(margins, labels, classes: int, size: int = 8):
    """Black ``size`` x ``size`` images that tell KnownMargins their label (channel 1) and margin (channel 0) in
    pixel (0, 0); labels are the given ones."""
    from antibackdoor.data.imageset import ImageSet

    margins, labels = torch.as_tensor(margins), torch.as_tensor(labels).long()
    x = torch.zeros(len(labels), 3, size, size, dtype=torch.uint8)
    x[:, 0, 0, 0] = margins.to(torch.uint8)
    x[:, 1, 0, 0] = labels.to(torch.uint8)
    return ImageSet(x, labels, [f"c{i}" for i in range(classes)], (0.5,) * 3, (0.25,) * 3, "known-margins")


def margin_logits(margins, labels, classes: int) -> torch.Tensor:
    """The logits KnownMargins gives a sample whose label logit is ``margins`` (others 0)."""
    labels = torch.as_tensor(labels).long()
    return F.one_hot(labels, classes).float() * torch.as_tensor(margins, dtype=torch.float32)[:, None]
