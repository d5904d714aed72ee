"""Fashion-MNIST from its idx files (gzipped or not), as Debian's ``dataset-fashion-mnist`` installs them."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..errors import DataError
from .imageset import DatasetSplits, from_numpy_nhwc

FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
FASHION_MEAN = (0.2860,)
FASHION_STD = (0.3530,)
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def fashion_mnist_dirs(root: Path) -> list[Path]:
    return [root / "fashion-mnist", SYSTEM_DIR]


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file: 2 zero bytes, a type byte (0x08 = uint8), a rank byte, big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not a uint8 idx file (bad magic number)")
    rank = raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise DataError(f"{path}: truncated or padded idx data ({len(raw) - header} bytes for shape {dims})")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def load_fashion_mnist(root: Path) -> DatasetSplits:
    dirs = fashion_mnist_dirs(root)
    arrays = {}
    for key, stem in FILES.items():
        path = _find(dirs, stem)
        if path is None:
            raise DataError(
                f"fashion-mnist: {stem}(.gz) not found in {' or '.join(map(str, dirs))} "
                "(apt-get install dataset-fashion-mnist, or copy the idx files there)"
            )
        arrays[key] = read_idx(path)
    train = from_numpy_nhwc(arrays["x_train"], arrays["y_train"].astype(np.int64), "fashion-mnist (train)",
                            FASHION_CLASSES, FASHION_MEAN, FASHION_STD)
    test = from_numpy_nhwc(arrays["x_test"], arrays["y_test"].astype(np.int64), "fashion-mnist (test)",
                           FASHION_CLASSES, FASHION_MEAN, FASHION_STD)
    return DatasetSplits(train, test, {"split_eps": 2 / 255})
