"""Loaders for the bundled mini CIFAR-10, any ``.npz`` file, full CIFAR-10 and Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .cifar import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, cifar10_present, load_cifar10
from .fashion_mnist import FASHION_CLASSES, fashion_mnist_dirs, load_fashion_mnist
from .imageset import DatasetSplits, from_numpy_nhwc
from .registry import register_dataset
from .rules import check_same_images, check_training_labels
from .safe_npz import open_npz

BUNDLED_MINI = Path(__file__).parent / "assets" / "cifar10_mini.npz"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: Path, name: str, classes=None, mean=None, std=None) -> DatasetSplits:
    """Read an ``.npz`` with x_train/y_train/x_test/y_test (uint8 NHWC or NHW images, integer labels), through
    the checked reader (``safe_npz``), and apply the data rules (``rules``) naming the arrays."""
    where = f"npz:{path}"
    with open_npz(path) as f:
        missing = [k for k in NPZ_KEYS if k not in f]
        if missing:
            raise DataError(f"{path}: missing array(s) {', '.join(missing)}; expected {', '.join(NPZ_KEYS)}")
        arrays = f.read(NPZ_KEYS)
    ys = [arrays["y_train"], arrays["y_test"]]
    if classes is None:
        if any(not np.issubdtype(v.dtype, np.integer) for v in ys):
            raise DataError(f"{path}: labels must be integers (got {ys[0].dtype}, {ys[1].dtype})")
        if any(v.size and v.min() < 0 for v in ys):
            raise DataError(f"{path}: negative labels")
        n = int(max(v.max() if v.size else -1 for v in ys)) + 1
        classes = [str(i) for i in range(n)]
    train = from_numpy_nhwc(arrays["x_train"], arrays["y_train"], f"{path} (train)", classes, mean, std)
    check_same_images(arrays["x_train"].shape, arrays["x_test"].shape, where, "x_train", "x_test")
    check_training_labels(train.y, classes, where, "y_train", ys[1] if ys[1].ndim == 1 else None, "y_test")
    test = from_numpy_nhwc(arrays["x_test"], arrays["y_test"], f"{path} (test)", classes, train.mean, train.std)
    return DatasetSplits(train, test)


@register_dataset(
    "cifar10-mini",
    "5,170 train / 1,017 test real CIFAR-10 images bundled with the package (offline default)",
    where=lambda root: str(BUNDLED_MINI),
    present=lambda root: BUNDLED_MINI.is_file(),
    label="CIFAR-10",
)
def _cifar10_mini(arg, root) -> DatasetSplits:
    splits = load_npz(BUNDLED_MINI, "cifar10-mini", CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD)
    splits.train.name, splits.test.name = "cifar10-mini (train)", "cifar10-mini (test)"
    return splits


@register_dataset(
    "npz",
    "any .npz with x_train, y_train, x_test, y_test (uint8 NHWC/NHW images, integer labels): npz:PATH",
    takes_argument=True,
    where=lambda root: "the PATH given",
    present=lambda root: True,
)
def _npz(arg, root) -> DatasetSplits:
    return load_npz(Path(arg).expanduser(), arg)


@register_dataset(
    "cifar10",
    "full CIFAR-10 (50,000 / 10,000); downloaded with checksum check when missing",
    where=lambda root: str(root / "cifar-10-batches-py"),
    present=cifar10_present,
    label="CIFAR-10",
)
def _cifar10(arg, root) -> DatasetSplits:
    return load_cifar10(root)


@register_dataset(
    "fashion-mnist",
    "Fashion-MNIST (60,000 / 10,000, 28x28 grey) from its idx files",
    where=lambda root: " or ".join(str(d) for d in fashion_mnist_dirs(root)),
    present=lambda root: any((d / "train-images-idx3-ubyte.gz").exists() or (d / "train-images-idx3-ubyte").exists()
                             for d in fashion_mnist_dirs(root)),
)
def _fashion(arg, root) -> DatasetSplits:
    return load_fashion_mnist(root)


__all__ = ["FASHION_CLASSES", "load_npz", "BUNDLED_MINI"]
