"""Reading ``.npz`` and ``.npy`` files that may be hostile, with one clean error instead of a crash.

Every array file the package reads goes through here: ``npz:PATH`` data (``run`` and ``defend``), the
decoded-image caches beside image folders (a shipped dataset may carry a forged one) and ``.npy`` poison
masks. Loading an array allocates the size its header declares before reading any data, so a header that
lies, or a small archive that inflates to gigabytes, used to end in a MemoryError traceback or the
out-of-memory killer. Here every array's npy header is read first (a few hundred bytes; nothing else is
decompressed) and the file is refused, naming the file and the array, when:

- it is not a zip archive (a text or pickle file named ``.npz``) or an entry is not an npy array;
- an array holds Python objects (object dtype): loading it would unpickle, i.e. run code from the file;
- an array declares more bytes than its entry can hold: a stored entry holds its own size, a deflated one
  expands at most ~1032-fold (the format's limit), so a larger shape is a lie or a truncated file;
- the arrays read together declare more bytes than this process can get (``available_memory``).

Arrays are then read with ``allow_pickle=False``.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npformat

from ..errors import DataError

try:  # POSIX only
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

#: what one deflated byte can expand to at most (deflate's limit is 1032:1), with room to spare
DEFLATE_MAX_RATIO = 1100
#: bytes an npy header may take (numpy's own default limit is 10,000)
HEADER_SLACK = 1 << 16
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class ArrayHeader:
    """What an npy header declares, read without reading the data."""

    key: str  # the array's name in its npz ("" for a lone .npy file)
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        """e.g. ``x_train (100000000 x 32 x 32 x 3 uint8, 286.1 GiB)``."""
        what = f"{' x '.join(map(str, self.shape)) or 'scalar'} {self.dtype}, {human_bytes(self.nbytes)}"
        return f"{self.key} ({what})" if self.key else f"an array of {what}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# -- memory ---------------------------------------------------------------------------------------------
def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_left() -> int | None:
    """The address-space limit (``ulimit -v``, RLIMIT_AS) minus the address space this process maps now."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = 0
    try:
        with open("/proc/self/status") as f:
            used = next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:")), 0)
    except (OSError, ValueError):
        pass
    return max(0, soft - used)


def _cgroup_left() -> int | None:
    """A container's memory limit minus its usage (cgroup v2, else v1), where one is set."""
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        cap = _read_int(limit)
        if cap is not None and cap < _UNLIMITED:
            return max(0, cap - (_read_int(usage) or 0))
    return None


def available_memory() -> int | None:
    """Bytes this process can still get: the least of the system's available memory (MemAvailable, which
    counts reclaimable caches but not swap), a container's memory limit left, and the address-space limit
    left; None where none of them is known (then nothing is refused for its size)."""
    known = [v for v in (_meminfo_available(), _cgroup_left(), _address_space_left()) if v is not None]
    return min(known) if known else None


def check_fits(path: Path, headers: Iterable[ArrayHeader]) -> None:
    """Refuse arrays whose declared sizes together exceed ``available_memory()``, before reading them."""
    headers = list(headers)
    total = sum(h.nbytes for h in headers)
    free = available_memory()
    if free is not None and total > free:
        names = ", ".join(h.describe() for h in headers)
        verb = "declares" if len(headers) == 1 else f"declare {human_bytes(total)} in all,"
        raise DataError(f"{path}: {names} {verb} more than the {human_bytes(free)} of memory available; refused "
                        "before reading (a decompression bomb, or data too large for this machine)")


# -- headers --------------------------------------------------------------------------------------------
def _read_header(fp, path: Path, key: str) -> ArrayHeader:
    """The header at ``fp``'s position (the data is not read); object dtypes are refused here."""
    where = f"{path}: {key}" if key else str(path)
    try:
        version = npformat.read_magic(fp)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):  # numpy's message quotes the file's first bytes
        raise DataError(f"{where}: not an npy array (no npy header)") from None
    try:
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(fp)
        else:
            raise ValueError(f"npy format version {version[0]}.{version[1]} is not supported")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, zipfile.BadZipFile):
        raise DataError(f"{where}: not a readable npy array (a damaged npy header)") from None
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects (dtype {dtype}); refused, since loading it would unpickle "
                        "code from the file")
    return ArrayHeader(key, tuple(int(s) for s in shape), dtype, bool(fortran))


def _capacity(info: zipfile.ZipInfo) -> int | None:
    """The most bytes a zip entry can expand to (None: a compression method without a known bound)."""
    if info.compress_type == zipfile.ZIP_STORED:
        return info.compress_size
    if info.compress_type == zipfile.ZIP_DEFLATED:
        return info.compress_size * DEFLATE_MAX_RATIO + HEADER_SLACK
    return None


def _not_npz(path: Path) -> DataError:
    try:
        with open(path, "rb") as f:
            start = f.read(8)
    except OSError as exc:
        return DataError(f"{path}: unreadable ({exc.strerror or exc})")
    if start.startswith(b"\x93NUMPY"):
        return DataError(f"{path}: a single .npy array, not an npz file (an npz is a zip archive of named arrays, "
                         "as numpy.savez writes)")
    if start.startswith(b"PK"):
        return DataError(f"{path}: not a readable npz file (a truncated or damaged zip archive)")
    kind = "empty" if not start else "not a zip archive"
    return DataError(f"{path}: not an npz file ({kind}; an npz is a zip archive of named .npy arrays, as "
                     "numpy.savez writes)")


class SafeNpz:
    """An ``.npz`` whose every array header has been checked; arrays are read on demand (see the module doc).

    ``files`` lists the array names; ``headers[name]`` says what each declares. Reading arrays checks first
    that they fit in memory together (``read``) or alone (``[name]``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            raise _not_npz(self.path)
        try:
            self.zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise DataError(f"{self.path}: not a readable npz file ({_one_line(exc)})") from None
        try:
            self.headers = self._headers()
        except BaseException:
            self.zip.close()
            raise
        self.files = list(self.headers)

    def _headers(self) -> dict[str, ArrayHeader]:
        out = {}
        for info in self.zip.infolist():
            if info.is_dir() or not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            try:
                with self.zip.open(info) as fp:
                    h = _read_header(fp, self.path, key)
                    offset = fp.tell()
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
                raise DataError(f"{self.path}: {key} is not readable ({_one_line(exc)})") from None
            need = offset + h.nbytes
            cap = _capacity(info)
            if info.file_size < need or (cap is not None and cap < need):
                holds = info.file_size if cap is None else min(info.file_size, cap)
                raise DataError(f"{self.path}: {h.describe()} declares more than its entry can hold (at most "
                                f"{human_bytes(max(0, holds - offset))}); a damaged or truncated file, or a "
                                "decompression bomb")
            out[key] = h
        return out

    def __enter__(self) -> SafeNpz:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.zip.close()

    def __contains__(self, key: str) -> bool:
        return key in self.headers

    def read(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The arrays ``keys`` (those present), after checking that together they fit in memory."""
        present = [k for k in keys if k in self.headers]
        check_fits(self.path, (self.headers[k] for k in present))
        return {k: self._read(k) for k in present}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.headers:
            raise KeyError(key)
        check_fits(self.path, [self.headers[key]])
        return self._read(key)

    def _read(self, key: str) -> np.ndarray:
        try:
            with self.zip.open(f"{key}.npy") as fp:
                return npformat.read_array(fp, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{self.path}: {key} is not readable ({_one_line(exc)})") from None

    def read_images_nchw(self, key: str, out_factory, chunk: int = 2048) -> np.ndarray:
        """``key`` (N x H x W x C uint8) read in chunks into ``out_factory(n, h, w, c)`` (an NHWC view of NCHW
        memory): no second full-size copy. Other layouts are read as they are."""
        h = self.headers[key]
        if h.fortran or len(h.shape) != 4 or h.dtype != np.uint8:
            return self[key]
        check_fits(self.path, [h])
        n, height, width, c = h.shape
        out = out_factory(n, height, width, c)
        row = height * width * c
        try:
            with self.zip.open(f"{key}.npy") as fp:
                _read_header(fp, self.path, key)
                for s in range(0, n, chunk):
                    k = min(chunk, n - s)
                    buf = fp.read(k * row)
                    if len(buf) != k * row:
                        raise DataError(f"{self.path}: {key} is truncated")
                    out[s:s + k] = np.frombuffer(buf, np.uint8).reshape(k, height, width, c)
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{self.path}: {key} is not readable ({_one_line(exc)})") from None
        return out


def open_npz(path: Path) -> SafeNpz:
    """``path`` opened as a checked npz (a ``DataError`` naming the file when it is missing or refused)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return SafeNpz(path)


def read_npy(path: Path) -> np.ndarray:
    """One ``.npy`` array, checked like an npz entry (object dtype, a header declaring more than the file
    holds, more than the memory available) before it is read without pickles."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with open(path, "rb") as fp:
            h = _read_header(fp, path, "")
            offset = fp.tell()
            size = os.fstat(fp.fileno()).st_size
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if size - offset < h.nbytes:
        raise DataError(f"{path}: {h.describe()} declared, but the file holds {human_bytes(size - offset)} of data; "
                        "a damaged or truncated file")
    check_fits(path, [h])
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise DataError(f"{path}: not a readable .npy array (a damaged file)") from None


__all__ = ["ArrayHeader", "SafeNpz", "available_memory", "check_fits", "human_bytes", "open_npz", "read_npy"]
