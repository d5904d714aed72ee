"""Tiny-ImageNet (200 classes, 64x64) from its official ``tiny-imagenet-200/`` folder.

Layout::

    tiny-imagenet-200/wnids.txt                       the 200 WordNet ids, one a line
    tiny-imagenet-200/words.txt                       wnid<TAB>names (optional: class names, else the wnids)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG      500 a class
    tiny-imagenet-200/val/images/*.JPEG               10,000, labelled by val/val_annotations.txt

The labelled val split is the test split (the official test split has no labels). Label ``i`` is the
``i``-th wnid in sorted order (not the order of wnids.txt), as torchvision's ImageFolder numbers them, so
labels agree with models trained by other code. Grey JPEGs (a few hundred) become RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .images import Arrays, cached_arrays, decode_images, is_image
from .imageset import PaperSettings
from .registry import register_dataset

TINY_DIR = "tiny-imagenet-200"
TINY_SIZE = 64
#: A-ABL: ResNet-34, split eps 1/255 (larger images), CLB poisons all of the target class, Blend uses noise.
#: A-ABL on Tiny-ImageNet: ResNet-34 and a smaller split eps for the 64x64 images
TINY_PAPER = PaperSettings(model="resnet34", defense_params={"a-abl": {"split_eps": 1 / 255}})
LAYOUT = ("wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt "
          f"in {TINY_DIR}/")


def _wnids(d: Path) -> list[str]:
    path = d / "wnids.txt"
    try:
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise DataError(f"{path}: missing (expected {LAYOUT})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if not ids:
        raise DataError(f"{path}: empty")
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: repeated wnids")
    return sorted(ids)


def _names(d: Path, wnids: list[str]) -> list[str]:
    """First synonym of each wnid from words.txt ("goldfish, Carassius auratus" -> "goldfish")."""
    path = d / "words.txt"
    if not path.is_file():
        return list(wnids)
    words: dict[str, str] = {}
    try:
        for line in path.read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    return [words.get(w) or w for w in wnids]


def _train_files(d: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        folder = d / "train" / wnid / "images"
        if not folder.is_dir():
            raise DataError(f"{folder}: missing (wnids.txt lists {wnid}; expected train/<wnid>/images/)")
        files = sorted(p for p in folder.iterdir() if is_image(p))
        if not files:
            raise DataError(f"{folder}: no images")
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _val_files(d: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    ann = d / "val" / "val_annotations.txt"
    try:
        lines = ann.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{ann}: missing (expected file<TAB>wnid<TAB>box lines for val/images)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{ann}: unreadable ({exc})") from None
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(f"{ann}:{lineno}: expected file<TAB>wnid, got {line!r}")
        name, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            raise DataError(f"{ann}:{lineno}: wnid {wnid} is not in wnids.txt")
        p = d / "val" / "images" / name
        if not p.is_file():
            raise DataError(f"{p}: missing (listed in {ann}:{lineno})")
        paths.append(p)
        labels.append(index[wnid])
    return paths, labels


def load_tiny_imagenet(root: Path, size: int = TINY_SIZE) -> Arrays:
    """Decoded Tiny-ImageNet (train, val as test), from the cache beside the data when it is current."""
    d = root / TINY_DIR
    if not d.is_dir():
        raise DataError(f"{d}: Tiny-ImageNet not found; expected {LAYOUT} under {root}")

    def build() -> Arrays:
        wnids = _wnids(d)
        ptr, ytr = _train_files(d, wnids)
        pte, yte = _val_files(d, wnids)
        x_train = decode_images(ptr, size, 3, desc="decoding tiny-imagenet train")
        x_test = decode_images(pte, size, 3, desc="decoding tiny-imagenet val")
        return Arrays(x_train, np.asarray(ytr, np.int64), x_test, np.asarray(yte, np.int64), _names(d, wnids))

    return cached_arrays(d, f"tiny-imagenet-{size}", f"size={size}", build)


@register_dataset(
    "tiny-imagenet",
    "Tiny-ImageNet, 200 classes (100,000 / 10,000 val as test), 64x64; labels = sorted wnids",
    where=lambda root: str(root / TINY_DIR),
    present=lambda root: (root / TINY_DIR / "wnids.txt").is_file(),
    label="Tiny-ImageNet",
)
def _tiny(arg, root: Path):
    return load_tiny_imagenet(root).splits("tiny-imagenet", TINY_PAPER)
