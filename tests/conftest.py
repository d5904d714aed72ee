"""Shared fixtures: small slices of the bundled real CIFAR-10 and tiny synthetic .npz files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

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


@pytest.fixture()
def one_thread():
    """One torch thread for the test: tiny networks gain nothing from two and lose badly on a shared, busy CPU
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
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
