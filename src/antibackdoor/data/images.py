"""Decoding image files with Pillow, and caching the decoded arrays as one ``.npz`` beside the data.

Decoding GTSRB (~52k files) or Tiny-ImageNet (~110k files) takes tens of seconds; the cache makes every
later load a single file read. A cache is keyed by a fingerprint of the dataset folder (every file's
relative path, size and mtime, plus the loader's options and format version), so adding, removing or
rewriting any file rebuilds it. It is written to a temporary file and renamed into place, so a crash
or a concurrent load never leaves a half-written cache. Its arrays are named like the ``npz:PATH``
format (x_train, y_train, x_test, y_test; NHWC uint8), so a cache file is also a valid ``npz:`` dataset.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..caching import CACHE_PREFIX, atomic_write, cache_hasher, cache_path
from ..errors import DataError
from ..progress import bar
from .imageset import DatasetSplits, PaperSettings, from_numpy_nhwc

log = logging.getLogger("antibackdoor")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff",
                            ".webp"})
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})

Box = tuple[int, int, int, int]


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def image_header(path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and Pillow mode from the header only (no pixel decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None


def decode_image(path: Path, size: int, channels: int = 3, box: Box | None = None) -> np.ndarray:
    """One file -> ``size x size x channels`` uint8; ``box`` (left, top, right, bottom) crops first.

    Resampling is Pillow's bilinear filter, which widens its support when shrinking (anti-aliased, like
    torchvision's ``Resize``); grey images become RGB and colour images grey as ``channels`` asks.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if box is not None:
                left, top = max(0, box[0]), max(0, box[1])
                right, bottom = min(im.width, box[2]), min(im.height, box[3])
                if right <= left or bottom <= top:
                    raise DataError(f"{path}: crop box {box} lies outside the {im.width}x{im.height} image")
                im = im.crop((left, top, right, bottom))
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None
    return arr[..., None] if arr.ndim == 2 else arr


def decode_images(paths: Sequence[Path], size: int, channels: int = 3,
                  boxes: Sequence[Box | None] | None = None, desc: str | None = None) -> np.ndarray:
    """Many files -> one ``N x size x size x channels`` uint8 array, filled in place (no list of arrays)."""
    out = np.empty((len(paths), size, size, channels), np.uint8)
    for i in bar(range(len(paths)), desc):
        out[i] = decode_image(paths[i], size, channels, None if boxes is None else boxes[i])
    return out


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of NHWC uint8 images, in chunks (Tiny-ImageNet in float32: 5 GB)."""
    c = x.shape[-1]
    if len(x) == 0:
        return (0.5,) * c, (0.25,) * c
    s = np.zeros(c)
    s2 = np.zeros(c)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].reshape(-1, c).astype(np.float64)
        s += part.sum(0)
        s2 += np.square(part).sum(0)
    n = x.size // c
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return tuple(float(v) / 255 for v in mean), tuple(float(v) / 255 for v in std)


@dataclass
class Arrays:
    """Decoded train/test arrays of one dataset, as stored in its cache."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def splits(self, name: str, paper: PaperSettings | None = None) -> DatasetSplits:
        if self.mean is None or self.std is None:
            self.mean, self.std = channel_stats(self.x_train)
        m, s = self.mean, self.std
        train = from_numpy_nhwc(self.x_train, self.y_train, f"{name} (train)", self.classes, m, s)
        test = from_numpy_nhwc(self.x_test, self.y_test, f"{name} (test)", self.classes, m, s)
        return DatasetSplits(train, test, paper or PaperSettings())


def tree_fingerprint(folder: Path, options: str) -> str:
    """Hash of every folder and file below ``folder`` (path, size, mtime) but our caches, and ``options``."""
    h = cache_hasher("dataset")  # the "dataset" version in caching.CACHE_VERSIONS: bump it when decoding changes
    h.update(f"{options}\0".encode())
    entries = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        rel = os.path.relpath(dirpath, folder)
        entries.append(f"{rel}/\n")  # folders count too: an empty class folder changes the data
        for f in filenames:
            if f.lstrip(".").startswith(CACHE_PREFIX):  # our caches and their temporary files
                continue
            try:
                st = os.stat(os.path.join(dirpath, f))
            except OSError:  # vanished meanwhile, or a dangling link: the loader will name it if it matters
                continue
            entries.append(f"{rel}/{f}\0{st.st_size}\0{st.st_mtime_ns}\n")
    for e in sorted(entries):
        h.update(e.encode())
    return h.hexdigest()


def dataset_cache_path(folder: Path, tag: str) -> Path:
    return cache_path(folder, tag, ".npz")


def _read_cache(path: Path, fingerprint: str) -> Arrays | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["fingerprint"]) != fingerprint:
                log.info("%s: stale (the data changed); decoding again", path)
                return None
            classes = [str(c) for c in f["classes"]]
            return Arrays(f["x_train"], f["y_train"], f["x_test"], f["y_test"], classes,
                          tuple(float(v) for v in f["mean"]), tuple(float(v) for v in f["std"]))
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("%s: unreadable cache (%s); decoding again", path, exc)
        return None


def _write_cache(path: Path, arrays: Arrays, fingerprint: str) -> None:
    def write(tmp: Path) -> None:
        # "x" mode honours the umask, unlike mkstemp's 0600, so others sharing the data folder can read it
        with open(tmp, "xb") as out:
            np.savez(out, x_train=arrays.x_train, y_train=arrays.y_train, x_test=arrays.x_test,
                     y_test=arrays.y_test, classes=np.array(arrays.classes, dtype=str),
                     mean=np.array(arrays.mean), std=np.array(arrays.std), fingerprint=np.array(fingerprint))

    try:
        atomic_write(path, write)
    except OSError as exc:  # read-only data folder, full disk: loading still works, only slower next time
        log.warning("%s: cannot write the decoded-image cache (%s); the next load decodes again", path, exc)


def cached_arrays(folder: Path, tag: str, options: str, build: Callable[[], Arrays]) -> Arrays:
    """``build()``'s arrays, from ``folder/antibackdoor-cache-<tag>.npz`` when it matches the data there."""
    path = dataset_cache_path(folder, tag)
    fingerprint = tree_fingerprint(folder, options)
    arrays = _read_cache(path, fingerprint)
    if arrays is None:
        arrays = build()
        if arrays.mean is None or arrays.std is None:
            arrays.mean, arrays.std = channel_stats(arrays.x_train)
        _write_cache(path, arrays, fingerprint)
    return arrays


def read_table(path: Path, required: Sequence[str], delimiter: str | None = None) -> list[dict[str, str]]:
    """Rows of a CSV with a header line; ``delimiter`` None guesses ';' or ','. Errors name file and line."""
    import csv

    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{path}: empty; expected a header with {', '.join(required)}")
    if delimiter is None:
        delimiter = ";" if lines[0].count(";") > lines[0].count(",") else ","
    reader = csv.DictReader(lines, delimiter=delimiter)
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: no column(s) {', '.join(missing)} in the header ({', '.join(header)})")
    rows = []
    for lineno, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if any(not row.get(c) for c in required):
            raise DataError(f"{path}:{lineno}: empty or missing value in {', '.join(required)}")
        row["_line"] = str(lineno)
        rows.append(row)
    return rows


def int_field(row: dict[str, str], key: str, path: Path) -> int:
    try:
        return int(row[key])
    except ValueError:
        raise DataError(f"{path}:{row['_line']}: {key} is {row[key]!r}, not an integer") from None
