"""A user's own images: ``folder:PATH``, one sub-folder per class.

Layouts (class = sub-folder name, label = its index in sorted order; images anywhere below it)::

    PATH/train/<class>/*  and  PATH/test/<class>/*  (or val/)   the given split
    PATH/<class>/*                                             split per class, ``test`` of each class to test

Options follow a ``?``: ``folder:PATH?size=64,test=0.2,seed=0,channels=1``.

- ``size``: images are resized to size x size. Default: the most common image size when it is square and at
  most 64 px (so 28, 32 and 64 px data keep their resolution), else 32.
- ``channels``: 1 or 3. Default: 1 when every image is grey, else 3.
- ``test``: fraction of each class held out when there is no train/test split (default 0.2); ``seed``
  (default 0) fixes which files, so the split is the same on every load and machine.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..seeding import fixed_numpy_rng
from .images import (
    GRAY_MODES,
    Arrays,
    cached_arrays,
    decode_images,
    inside,
    is_image,
    list_files,
    read_headers,
    real_folder,
)
from .registry import register_dataset

log = logging.getLogger("antibackdoor")

OPTIONS = {"size": int, "test": float, "seed": int, "channels": int}
DEFAULT_TEST = 0.2
FALLBACK_SIZE = 32
MAX_AUTO_SIZE = 64
LAYOUT = "PATH/<class>/<images>, or PATH/train/<class>/ and PATH/test/<class>/"


def split_spec(arg: str, options: dict[str, type], where: str) -> tuple[Path, dict]:
    """``PATH?key=value,...`` -> (PATH, options) for the ``options`` (name -> type) a loader knows; a ``?``
    that is part of an existing path stays in it. ``size`` and ``channels`` are checked here; errors start
    with ``where`` (e.g. ``--dataset folder:PATH``)."""
    path, opts = arg, {}
    if "?" in arg and not Path(arg).expanduser().exists():
        path, _, text = arg.rpartition("?")
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            key = key.strip()
            if key not in options or not sep:
                raise ConfigError(f"{where}: unknown option {item!r}; known: {', '.join(k + '=' for k in options)}")
            try:
                opts[key] = options[key](value.strip())
            except ValueError:
                raise ConfigError(f"{where}: {key}={value!r} is not a number") from None
    if "size" in opts and not 4 <= opts["size"] <= 512:
        raise ConfigError(f"{where}: size must be 4..512")
    if "channels" in opts and opts["channels"] not in (1, 3):
        raise ConfigError(f"{where}: channels must be 1 or 3")
    return Path(path).expanduser(), opts


def parse_spec(arg: str) -> tuple[Path, dict]:
    """``PATH?key=value,...`` -> (PATH, options) for ``--dataset folder:``."""
    path, opts = split_spec(arg, OPTIONS, f"--dataset folder:{arg}")
    if "test" in opts and not 0.0 < opts["test"] < 1.0:
        raise ConfigError(f"--dataset folder:{arg}: test must lie in (0, 1)")
    return path, opts


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path, root_real: Path) -> list[Path]:
    """Image files anywhere below ``folder``, skipping hidden files and folders (.ipynb_checkpoints ...).

    Links must stay inside the data's folder ``root_real``: an image that links outside it, a broken link to an
    image, or an unreadable sub-folder is an error naming it (``images.list_files``)."""
    if not inside(folder, root_real):
        raise DataError(f"{folder}: resolves to {real_folder(folder)} through a link, outside {root_real}; class "
                        "folders must lie inside the data's folder")
    entries, _ = list_files(folder, root_real)
    for p, why in entries:
        if why is not None and (is_image(p) or why.startswith("unreadable folder")):
            raise DataError(f"{p}: {why}")
    return [p for p, why in entries if why is None and is_image(p)]


def _collect(path: Path, test: float, seed: int):
    """(classes, train files, train labels, test files, test labels) for either layout."""
    root_real = real_folder(path)
    if (path / "train").is_dir():
        test_dir = next((path / n for n in ("test", "val") if (path / n).is_dir()), None)
        if test_dir is None:
            raise DataError(f"{path / 'test'}: missing (a train/ sub-tree needs test/ or val/ beside it)")
        classes = [p.name for p in _class_dirs(path / "train")]
        if not classes:
            raise DataError(f"{path / 'train'}: no class sub-folders (expected {LAYOUT})")
        ptr, ytr, pte, yte = [], [], [], []
        for i, c in enumerate(classes):
            files = _images(path / "train" / c, root_real)
            if not files:
                raise DataError(f"{path / 'train' / c}: no images")
            ptr += files
            ytr += [i] * len(files)
        index = {c: i for i, c in enumerate(classes)}
        for d in _class_dirs(test_dir):
            if d.name not in index:
                raise DataError(f"{d}: class {d.name!r} has no training folder in {path / 'train'}")
            files = _images(d, root_real)
            pte += files
            yte += [index[d.name]] * len(files)
        return classes, ptr, ytr, pte, yte
    dirs = _class_dirs(path)
    if not dirs:
        raise DataError(f"{path}: no class sub-folders (expected {LAYOUT})")
    rng = fixed_numpy_rng(seed)
    ptr, ytr, pte, yte = [], [], [], []
    for i, d in enumerate(dirs):
        files = _images(d, root_real)
        if not files:
            raise DataError(f"{d}: no images")
        n_test = min(int(round(len(files) * test)), len(files) - 1)
        order = rng.permutation(len(files))
        for j in order[:n_test]:
            pte.append(files[j])
            yte.append(i)
        for j in sorted(order[n_test:]):
            ptr.append(files[j])
            ytr.append(i)
    return [d.name for d in dirs], ptr, ytr, pte, yte


def auto_format(paths: list[Path]) -> tuple[int, int]:
    """(size, channels) the data suggests: its most common square size up to 64 px (else 32); grey or RGB."""
    sizes: Counter = Counter()
    grey = True
    for header in read_headers(paths, desc="reading image headers"):  # in parallel for large folders
        if isinstance(header, str):
            raise DataError(header)
        wh, mode = header
        sizes[wh] += 1
        grey = grey and mode in GRAY_MODES
    (w, h), _ = sizes.most_common(1)[0]
    size = w if w == h and w <= MAX_AUTO_SIZE else FALLBACK_SIZE
    return size, 1 if grey else 3


def load_folder(arg: str) -> Arrays:
    path, opts = parse_spec(arg)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder (expected {LAYOUT})")
    test, seed = opts.get("test", DEFAULT_TEST), opts.get("seed", 0)

    def build() -> Arrays:
        classes, ptr, ytr, pte, yte = _collect(path, test, seed)
        size, channels = opts.get("size"), opts.get("channels")
        if size is None or channels is None:
            auto_size, auto_channels = auto_format(ptr + pte)
            size, channels = size or auto_size, channels or auto_channels
            log.info("folder:%s: %d classes, %d+%d images, resized to %dx%d, %d channel(s)", path,
                     len(classes), len(ptr), len(pte), size, size, channels)
        x_train = decode_images(ptr, size, channels, desc="decoding train images")
        x_test = decode_images(pte, size, channels, desc="decoding test images")
        return Arrays(x_train, np.asarray(ytr, np.int64), x_test, np.asarray(yte, np.int64), classes)

    tag = "folder-" + "-".join(f"{k}{opts[k]}" for k in sorted(opts)) if opts else "folder"
    # links=inside: caches written before links were checked may hold files from outside PATH; rebuild them
    return cached_arrays(path, tag, f"test={test} seed={seed} size={opts.get('size')} "
                         f"channels={opts.get('channels')} links=inside", build)


@register_dataset(
    "folder",
    "your own images, one sub-folder per class: folder:PATH[?size=N,test=F,seed=S,channels=C]",
    takes_argument=True,
    where=lambda root: "the PATH given: PATH/<class>/* (split 80/20) or PATH/train|test/<class>/*",
    present=lambda root: True,
)
def _folder(arg, root: Path):
    return load_folder(arg).splits(f"folder:{arg}")
