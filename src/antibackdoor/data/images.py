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
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..caching import CACHE_PREFIX, atomic_write, cache_hasher, cache_path
from ..errors import DataError
from ..progress import bar
from .imageset import DatasetSplits, PaperSettings, from_numpy_nhwc
from .safe_npz import SafeNpz

log = logging.getLogger("antibackdoor")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff",
                            ".webp"})
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})

Box = tuple[int, int, int, int]


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def real_folder(path: Path) -> Path:
    """``path`` with every link resolved: what "inside the folder" is checked against."""
    return Path(os.path.realpath(path))


def inside(path: Path | str, root_real: Path) -> bool:
    """Whether ``path``, links resolved, lies in ``root_real`` (a ``real_folder``)."""
    return Path(os.path.realpath(path)).is_relative_to(root_real)


def list_files(folder: Path, root_real: Path) -> tuple[list[tuple[Path, str | None]], list[Path]]:
    """Every visible file below ``folder`` in sorted order as ``(path, None)``, or ``(path, why)`` for one that
    must not be read, and the linked folders below it (not followed, as before).

    Files and folders whose name starts with ``.`` are skipped. A link is followed when its target lies
    inside ``root_real`` (the data's folder); one that points outside it, a broken one (missing target, a
    loop) and anything not a regular file (a pipe, a device) come with the reason instead: a dataset from
    elsewhere must not make the loader read the rest of the machine. One ``scandir`` per folder; only links
    cost a ``realpath``."""
    entries: list[tuple[Path, str | None]] = []
    linked: list[Path] = []
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError as exc:
            entries.append((d, f"unreadable folder ({exc.strerror or exc})"))
            continue
        with it:
            for e in it:
                if e.name.startswith("."):
                    continue
                p = d / e.name
                if e.is_symlink():
                    try:
                        st = os.stat(e.path)
                    except OSError as exc:
                        entries.append((p, f"a broken link ({exc.strerror or exc})"))
                        continue
                    target = Path(os.path.realpath(e.path))
                    if not target.is_relative_to(root_real):
                        entries.append((p, f"a link to {target}, outside {root_real}; files must lie inside the "
                                           "data's folder"))
                    elif stat.S_ISDIR(st.st_mode):
                        linked.append(p)
                    else:
                        entries.append((p, None if stat.S_ISREG(st.st_mode) else "not a regular file"))
                elif e.is_dir(follow_symlinks=False):
                    stack.append(p)
                else:
                    entries.append((p, None if e.is_file(follow_symlinks=False) else "not a regular file"))
    entries.sort(key=lambda t: t[0])
    return entries, sorted(linked)


def image_header(path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and Pillow mode from the header only (no pixel decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None


def _to_8bit(im):
    """Pillow image -> an 8-bit mode ("L", "LA", "RGB", "RGBA", "P", ...), scaling high bit depths.

    Pillow's own conversion of a 16-bit grey image ("I;16") to "L" clips every value above 255 to white;
    the full range is mapped to 0..255 here instead (16-bit: / 257; 32-bit "I" read as 16-bit; float "F"
    read as 0..1 when it fits there, else as 0..255).
    """
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8), "L")
    return im


def decode_image(path: Path, size: int, channels: int = 3, box: Box | None = None) -> np.ndarray:
    """One file -> ``size x size x channels`` uint8; ``box`` (left, top, right, bottom) crops first.

    Resampling is Pillow's bilinear filter, which widens its support when shrinking (anti-aliased, like
    torchvision's ``Resize``); grey images become RGB and colour images grey as ``channels`` asks; 16-bit
    and float images are scaled to 8 bits (``_to_8bit``); an alpha channel is dropped.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # Pillow asks for this detour for palette images with transparency
            im = _to_8bit(im).convert("L" if channels == 1 else "RGB")
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


def decode_workers() -> int:
    """Decoding processes: ``$ANTIBACKDOOR_DECODE_WORKERS``, else the CPU count (at most 8)."""
    env = os.environ.get("ANTIBACKDOOR_DECODE_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(8, os.cpu_count() or 1))


#: below this many files one process decodes (starting workers costs more than it saves)
PARALLEL_MIN = 2000
CHUNK = 256


def _decode_chunk(paths: Sequence[Path], size: int, channels: int, boxes, stop_on_error: bool):
    """Decode a run of files; failures become messages (index within the run, text) instead of raising."""
    out = np.zeros((len(paths), size, size, channels), np.uint8)
    errors: list[tuple[int, str]] = []
    for i, p in enumerate(paths):
        try:
            out[i] = decode_image(p, size, channels, None if boxes is None else boxes[i])
        except DataError as exc:
            errors.append((i, str(exc)))
            if stop_on_error:
                break
    return out, errors


def _pool(n: int):
    """A process pool (fork: workers share the parent's loaded modules, start in milliseconds) or, where
    fork is unavailable, a thread pool (Pillow releases the GIL while decoding and resizing)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    workers = decode_workers()
    if workers > 1 and n >= PARALLEL_MIN and sys.platform.startswith("linux"):
        return ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
    return ThreadPoolExecutor(workers)


def decode_images_lenient(paths: Sequence[Path], size: int, channels: int = 3,
                          boxes: Sequence[Box | None] | None = None, desc: str | None = None,
                          stop_on_error: bool = False) -> tuple[np.ndarray, dict[int, str]]:
    """Many files -> (``N x size x size x channels`` uint8, {index: error} for files that failed).

    Runs of files are decoded in parallel and copied into one preallocated array, so memory stays at the
    size of that array plus a run per worker; rows of failed files are zero. The array is an N x H x W x C
    view of N x C x H x W memory (``nchw_backed``), so building the ImageSet from it copies nothing.
    ``stop_on_error`` ends early at the first failure (the caller raises it).
    """
    n = len(paths)
    out = nchw_backed(n, size, size, channels)
    errors: dict[int, str] = {}
    starts = list(range(0, n, CHUNK))
    progress = bar(None, desc, total=n, unit="img") if desc is not None else None
    with _pool(n) as ex:
        futures = {ex.submit(_decode_chunk, paths[s:s + CHUNK], size, channels,
                             None if boxes is None else boxes[s:s + CHUNK], stop_on_error): s for s in starts}
        from concurrent.futures import as_completed

        for fut in as_completed(futures):
            s = futures.pop(fut)  # drop the finished future: it holds its decoded run until released
            part, errs = fut.result()
            out[s:s + len(part)] = part
            errors.update({s + i: e for i, e in errs})
            if progress is not None and hasattr(progress, "update"):
                progress.update(len(part))
            if errs and stop_on_error:
                for f in futures:
                    f.cancel()
                break
    if progress is not None and hasattr(progress, "close"):
        progress.close()
    return out, errors


def _header_chunk(paths: Sequence[Path]) -> list[tuple[tuple[int, int], str] | str]:
    out: list[tuple[tuple[int, int], str] | str] = []
    for p in paths:
        try:
            out.append(image_header(p))
        except DataError as exc:
            out.append(str(exc))
    return out


def read_headers(paths: Sequence[Path], desc: str | None = None) -> list[tuple[tuple[int, int], str] | str]:
    """Each file's ((width, height), mode) from its header, or an error message (in parallel, in order)."""
    n = len(paths)
    results: list = [None] * n
    progress = bar(None, desc, total=n, unit="img") if desc is not None else None
    with _pool(n) as ex:
        from concurrent.futures import as_completed

        futures = {ex.submit(_header_chunk, paths[s:s + CHUNK]): s for s in range(0, n, CHUNK)}
        for fut in as_completed(futures):
            s = futures.pop(fut)
            part = fut.result()
            results[s:s + len(part)] = part
            if progress is not None and hasattr(progress, "update"):
                progress.update(len(part))
    if progress is not None and hasattr(progress, "close"):
        progress.close()
    return results


def decode_images(paths: Sequence[Path], size: int, channels: int = 3,
                  boxes: Sequence[Box | None] | None = None, desc: str | None = None) -> np.ndarray:
    """Many files -> one ``N x size x size x channels`` uint8 array (in parallel); a bad file raises."""
    out, errors = decode_images_lenient(paths, size, channels, boxes, desc, stop_on_error=True)
    if errors:
        raise DataError(errors[min(errors)])
    return out


def nchw_backed(n: int, h: int, w: int, c: int) -> np.ndarray:
    """An N x H x W x C uint8 array whose memory is laid out N x C x H x W.

    Images are decoded and cached as NHWC (the ``npz:`` format) but held as NCHW tensors; filling this view
    and later transposing it back yields a contiguous NCHW array without a second full-size copy.
    """
    return np.empty((n, c, h, w), np.uint8).transpose(0, 2, 3, 1)


def channel_stats(x: np.ndarray, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
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
    #: extra arrays a loader keeps with the cache (e.g. the source file of every image), stored as meta_<key>
    meta: dict[str, np.ndarray] = field(default_factory=dict)

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
            except OSError:  # vanished meanwhile, or a broken link: counted, so that its coming and going is seen
                entries.append(f"{rel}/{f}\0unreadable\n")
                continue
            entries.append(f"{rel}/{f}\0{st.st_size}\0{st.st_mtime_ns}\n")
    for e in sorted(entries):
        h.update(e.encode())
    return h.hexdigest()


def dataset_cache_path(folder: Path, tag: str) -> Path:
    return cache_path(folder, tag, ".npz")


def _read_cache(path: Path, fingerprint: str) -> Arrays | None:
    """The cache's arrays, read through ``SafeNpz`` (a cache in a shipped dataset folder may be forged)."""
    if not path.is_file():
        return None
    try:
        with SafeNpz(path) as f:
            if str(f["fingerprint"]) != fingerprint:
                log.info("%s: stale (the data changed); decoding again", path)
                return None
            meta_keys = [k for k in f.files if k.startswith("meta_")]
            small = f.read(["classes", "y_train", "y_test", "mean", "std", *meta_keys])
            classes = [str(c) for c in small["classes"]]
            meta = {k[5:]: v for k, v in small.items() if k.startswith("meta_")}
            return Arrays(f.read_images_nchw("x_train", nchw_backed), small["y_train"],
                          f.read_images_nchw("x_test", nchw_backed), small["y_test"], classes,
                          tuple(float(v) for v in small["mean"]), tuple(float(v) for v in small["std"]), meta)
    except (DataError, KeyError, ValueError) as exc:
        log.warning("%s: unreadable cache (%s); decoding again", path, exc)
        return None


def _write_cache(path: Path, arrays: Arrays, fingerprint: str) -> None:
    def write(tmp: Path) -> None:
        # "x" mode honours the umask, unlike mkstemp's 0600, so others sharing the data folder can read it
        with open(tmp, "xb") as out:
            np.savez(out, x_train=arrays.x_train, y_train=arrays.y_train, x_test=arrays.x_test,
                     y_test=arrays.y_test, classes=np.array(arrays.classes, dtype=str),
                     mean=np.array(arrays.mean), std=np.array(arrays.std), fingerprint=np.array(fingerprint),
                     **{f"meta_{k}": v for k, v in arrays.meta.items()})

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
