from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch
from conftest import write_npz

from antibackdoor.data import ImageSet, load_dataset
from antibackdoor.data.augment import random_crop, random_flip
from antibackdoor.data.cifar import load_cifar10
from antibackdoor.errors import ConfigError, DataError


def test_bundled_mini_cifar(mini):
    assert mini.train.x.shape == (5170, 3, 32, 32) and mini.train.x.dtype == torch.uint8
    assert mini.test.x.shape == (1017, 3, 32, 32)
    assert mini.train.num_classes == 10 and mini.train.classes[0] == "airplane"
    assert int(mini.train.class_counts().min()) > 400


def test_npz_loads_nhwc(tiny_npz):
    s = load_dataset(f"npz:{tiny_npz}")
    assert s.train.x.shape == (240, 3, 16, 16) and s.train.num_classes == 4
    assert len(s.test) == 60


@pytest.mark.parametrize(
    "override, message",
    [
        ({"x_train": np.zeros((240, 16, 16, 3), np.float32)}, "dtype float32"),
        ({"x_train": np.zeros((240, 16, 16, 5), np.uint8)}, "shape"),
        ({"y_train": np.arange(239) % 4}, "labels of shape"),
        ({"y_train": -(np.arange(240) % 4)}, "negative labels"),
        ({"y_test": np.full(60, 7)}, r"y_train has no sample of class 7, which y_test has"),
    ],
)
def test_npz_bad_content(tmp_path, override, message):
    path = write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DataError, match=message) as exc:
        load_dataset(f"npz:{path}")
    assert str(path) in str(exc.value)


def test_npz_missing_and_truncated(tmp_path, tiny_npz):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")
    data = tiny_npz.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.npz"):
        load_dataset(f"npz:{cut}")
    np.savez(tmp_path / "keys.npz", x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="missing array"):
        load_dataset(f"npz:{tmp_path / 'keys.npz'}")


def test_unknown_dataset_spec():
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="needs an argument"):
        load_dataset("npz")


def test_imageset_rejects_bad_labels():
    with pytest.raises(DataError, match="outside"):
        ImageSet(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 5]), ["a", "b"], (0.5,) * 3,
                 (0.2,) * 3)


# -- CIFAR-10 in the official format -----------------------------------------------------------

def _batch_pickle(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"fake batch", b"labels": [int(i % 10) for i in range(n)],
         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
    return pickle.dumps(d, protocol=2)


def make_cifar_archive(path, n=20):
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
            data = _batch_pickle(n, i)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_cifar10_from_archive_and_folder(tmp_path):
    make_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    s = load_cifar10(tmp_path, download_missing=False)
    assert s.train.x.shape == (100, 3, 32, 32) and s.test.x.shape == (20, 3, 32, 32)
    # the same images from an extracted folder
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:
        tar.extractall(tmp_path / "ex", filter="data")
    s2 = load_cifar10(tmp_path / "ex", download_missing=False)
    assert torch.equal(s.train.x, s2.train.x) and torch.equal(s.test.y, s2.test.y)


def test_cifar10_rejects_malicious_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(_batch_pickle(4, 0))
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3: unsafe or corrupt pickle .*posix.system|nt.system"):
        load_cifar10(tmp_path, download_missing=False)


def test_cifar10_truncated_archive(tmp_path):
    archive = make_cifar_archive(tmp_path / "full.tar.gz")
    data = archive.read_bytes()
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path, download_missing=False)


@pytest.fixture()
def local_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **kw)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_cifar10_download_with_checksum(tmp_path, local_server, monkeypatch):
    served, base = local_server
    archive = make_cifar_archive(served / "cifar-10-python.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    root = tmp_path / "root"
    monkeypatch.setenv("ANTIBACKDOOR_CIFAR10_URL", f"{base}/cifar-10-python.tar.gz")
    monkeypatch.setenv("ANTIBACKDOOR_CIFAR10_MD5", "0" * 32)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("cifar10", root)
    assert not any(root.iterdir()), "a file that failed its checksum must not stay behind"
    monkeypatch.setenv("ANTIBACKDOOR_CIFAR10_MD5", md5)
    s = load_dataset("cifar10", root)
    assert len(s.train) == 100 and (root / "cifar-10-python.tar.gz").is_file()
    monkeypatch.setenv("ANTIBACKDOOR_CIFAR10_URL", f"{base}/missing.tar.gz")
    with pytest.raises(DataError, match="download failed"):
        load_dataset("cifar10", tmp_path / "other")


# -- Fashion-MNIST idx files -------------------------------------------------------------------

def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_fashion_mnist_idx(tmp_path):
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(30) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(10) % 10,
    }
    for name, arr in files.items():
        with gzip.open(d / f"{name}.gz", "wb") as f:
            f.write(_idx(arr))
    s = load_dataset("fashion-mnist", tmp_path)
    assert s.train.x.shape == (30, 1, 28, 28) and s.test.num_classes == 10
    with gzip.open(d / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(_idx(np.arange(10) % 10)[:-3])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: truncated"):
        load_dataset("fashion-mnist", tmp_path)


# -- augmentation ------------------------------------------------------------------------------

def test_random_crop_shifts_content():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, g)
    assert out.shape == x.shape
    for i in range(2):  # every crop is a shifted window of the zero-padded image
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        assert any(torch.equal(out[i], padded[:, a:a + 6, b:b + 6]) for a in range(5) for b in range(5))
    flipped = random_flip(x.repeat(50, 1, 1, 1), torch.Generator().manual_seed(1))
    n_flipped = sum(torch.equal(f, x[i % 2].flip(2)) for i, f in enumerate(flipped))
    assert 20 < n_flipped < 80
