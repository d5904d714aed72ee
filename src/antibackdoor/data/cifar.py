"""Full CIFAR-10 from the official python archive, read without trusting its pickles.

The official ``cifar-10-python.tar.gz`` holds Python pickles. Unpickling runs arbitrary code, so
``SafeUnpickler`` can only build the dict/list/bytes/ndarray the format needs and rejects anything else.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from ..errors import DataError
from .imageset import DatasetSplits, from_numpy_nhwc

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# The only globals a CIFAR batch pickle may reference (numpy moved `core` to `_core` in 2.0).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 store bytes through it
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy's array reconstruction."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of the CIFAR-10 format")


def safe_load_batch(data: bytes, source: str) -> dict:
    """Decode one CIFAR batch pickle from bytes; errors name ``source``."""
    try:
        obj = SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{source}: unsafe or corrupt pickle ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{source}: truncated or corrupt CIFAR batch ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a dict in the CIFAR batch, found {type(obj).__name__}")
    batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{source}: CIFAR batch lacks 'data' or 'labels'")
    x = np.asarray(batch["data"])
    y = np.asarray(batch["labels"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.shape != (x.shape[0],):
        raise DataError(f"{source}: 'data' has shape {x.shape} {x.dtype}; expected N x 3072 uint8 with N labels")
    return {"x": x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), "y": y.astype(np.int64)}


def _read_batches(read, names: list[str], where: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for n in names:
        b = safe_load_batch(read(n), f"{where}/{n}")
        xs.append(b["x"])
        ys.append(b["y"])
    return np.concatenate(xs), np.concatenate(ys)


def cifar10_present(root: Path) -> bool:
    return (root / CIFAR10_DIR / "test_batch").is_file() or (root / CIFAR10_ARCHIVE).is_file()


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str | None, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` via a temporary file; verify the checksum before the file appears."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name, suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        if md5 is not None and (got := md5sum(Path(tmp))) != md5:
            raise DataError(f"{url}: checksum mismatch (md5 {got}, expected {md5}); file discarded")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"{url}: download failed ({exc}); place {dest.name} in {dest.parent} by hand") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def load_cifar10(root: Path, download_missing: bool = True, url: str | None = None,
                 md5: str | None = None) -> DatasetSplits:
    """CIFAR-10 from ``root/cifar-10-batches-py`` or ``root/cifar-10-python.tar.gz`` (downloaded if absent).

    ``url``/``md5`` default to the official ones; ``$ANTIBACKDOOR_CIFAR10_URL`` overrides the url (mirrors,
    tests against a local server) and ``$ANTIBACKDOOR_CIFAR10_MD5`` the checksum.
    """
    folder = root / CIFAR10_DIR
    archive = root / CIFAR10_ARCHIVE
    names = CIFAR10_TRAIN + CIFAR10_TEST
    if folder.is_dir():
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DataError(f"{folder}: missing {', '.join(missing)} (expected the official cifar-10-batches-py)")
        xtr, ytr = _read_batches(lambda n: (folder / n).read_bytes(), CIFAR10_TRAIN, str(folder))
        xte, yte = _read_batches(lambda n: (folder / n).read_bytes(), CIFAR10_TEST, str(folder))
    else:
        if not archive.is_file():
            if not download_missing:
                raise DataError(f"{root}: neither {CIFAR10_DIR}/ nor {CIFAR10_ARCHIVE} found")
            url = url or os.environ.get("ANTIBACKDOOR_CIFAR10_URL", CIFAR10_URL)
            md5 = md5 or os.environ.get("ANTIBACKDOOR_CIFAR10_MD5", CIFAR10_MD5)
            download(url, archive, md5)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers()
                           if m.isfile() and Path(m.name).parent.name == CIFAR10_DIR}
                missing = [n for n in names if n not in members]
                if missing:
                    raise DataError(f"{archive}: archive lacks {CIFAR10_DIR}/{', '.join(missing)}")

                def read(n: str) -> bytes:
                    f = tar.extractfile(members[n])
                    assert f is not None
                    return f.read()

                xtr, ytr = _read_batches(read, CIFAR10_TRAIN, str(archive))
                xte, yte = _read_batches(read, CIFAR10_TEST, str(archive))
        except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
            raise DataError(f"{archive}: truncated or corrupt archive ({exc})") from None
    train = from_numpy_nhwc(xtr, ytr, "cifar10 (train)", CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD)
    test = from_numpy_nhwc(xte, yte, "cifar10 (test)", CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD)
    return DatasetSplits(train, test, {"split_eps": 2 / 255, "model": "resnet18", "aibd_model": "resnet18"})
