"""GTSRB (43 German traffic-sign classes) from its official layout or the common ``Train/`` + ``Test.csv``.

Official (the benchmark's own zips, unpacked under the data root)::

    GTSRB/Final_Training/Images/000NN/*.ppm + GT-000NN.csv   (Filename;Width;Height;Roi.X1;...;ClassId)
    GTSRB/Final_Test/Images/*.ppm
    GT-final_test.csv (from GTSRB_Final_Test_GT.zip) in GTSRB/Final_Test/Images/, GTSRB/Final_Test/,
    GTSRB/ or beside GTSRB/

Folder layout (as on Kaggle)::

    GTSRB/Train/<class id>/*.png, GTSRB/Test/*.png, GTSRB/Test.csv (Path,ClassId,Roi.X1,...), GTSRB/Train.csv

``GTSRB`` may also be spelled ``gtsrb`` or sit in ``gtsrb/GTSRB`` (torchvision's place). Images are resized
to 32x32 whole (``gtsrb``, as BackdoorBench does) or cropped to the sign's ROI box first (``gtsrb-roi``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .images import Arrays, Box, cached_arrays, decode_images, int_field, is_image, read_table
from .imageset import PaperSettings
from .registry import register_dataset

GTSRB_SIZE = 32
GTSRB_CLASSES = [
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70",
    "speed limit 80", "end of speed limit 80", "speed limit 100", "speed limit 120", "no passing",
    "no passing over 3.5t", "right-of-way at next intersection", "priority road", "yield", "stop",
    "no vehicles", "over 3.5t prohibited", "no entry", "general caution", "dangerous curve left",
    "dangerous curve right", "double curve", "bumpy road", "slippery road", "road narrows on the right",
    "road work", "traffic signals", "pedestrians", "children crossing", "bicycles crossing",
    "beware of ice/snow", "wild animals crossing", "end of all speed and passing limits", "turn right ahead",
    "turn left ahead", "ahead only", "go straight or right", "go straight or left", "keep right", "keep left",
    "roundabout mandatory", "end of no passing", "end of no passing over 3.5t",
]
ROI = ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2")
TEST_GT = "GT-final_test.csv"
#: A-ABL: ResNet-18 and split eps 2/255 on GTSRB, CLB poisons 50% of the target class, Blend uses the
#: Hello-Kitty pattern; AIBD: WRN-16-1 on GTSRB.
#: A-ABL trains ResNet-18 on GTSRB, AIBD WRN-16-1
GTSRB_PAPER = PaperSettings(model="resnet18", models={"aibd": "wrn16-1"})
LAYOUT = ("GTSRB/Final_Training/Images/000NN/*.ppm with GT-000NN.csv and GTSRB/Final_Test/Images/*.ppm with "
          f"{TEST_GT}, or GTSRB/Train/<class>/*.png with GTSRB/Test.csv")


def gtsrb_candidates(root: Path) -> list[Path]:
    return [root / "GTSRB", root / "gtsrb", root / "gtsrb" / "GTSRB"]


def find_gtsrb(root: Path) -> tuple[str, Path] | None:
    """("official" | "folder", the GTSRB folder), or None when neither layout is under ``root``."""
    for d in gtsrb_candidates(root):
        if (d / "Final_Training" / "Images").is_dir():
            return "official", d
        if (d / "Train").is_dir():
            return "folder", d
    return None


def _box(row: dict[str, str], path: Path) -> Box:
    x1, y1, x2, y2 = (int_field(row, k, path) for k in ROI)
    return x1, y1, x2, y2


def _label(row: dict[str, str], path: Path) -> int:
    y = int_field(row, "ClassId", path)
    if not 0 <= y < len(GTSRB_CLASSES):
        raise DataError(f"{path}:{row['_line']}: ClassId {y} outside 0..{len(GTSRB_CLASSES) - 1}")
    return y


def _listed(rows: list[dict[str, str]], key: str, base: Path, csv: Path, roi: bool):
    """Paths, labels and ROI boxes of the rows of one CSV, each file checked to exist."""
    paths, labels, boxes = [], [], []
    for row in rows:
        p = base / row[key]
        if not p.is_file():
            raise DataError(f"{p}: missing (listed in {csv}:{row['_line']})")
        paths.append(p)
        labels.append(_label(row, csv))
        boxes.append(_box(row, csv) if roi else None)
    return paths, labels, boxes


def _official(d: Path, roi: bool):
    images = d / "Final_Training" / "Images"
    train: tuple[list, list, list] = ([], [], [])
    for c in range(len(GTSRB_CLASSES)):
        folder = images / f"{c:05d}"
        if not folder.is_dir():
            raise DataError(f"{folder}: missing (expected one folder per class 00000..00042 in {images})")
        csv = folder / f"GT-{c:05d}.csv"
        rows = read_table(csv, ["Filename", "ClassId", *(ROI if roi else ())], delimiter=";")
        part = _listed(rows, "Filename", folder, csv, roi)
        bad = [y for y in part[1] if y != c]
        if bad:
            raise DataError(f"{csv}: ClassId {bad[0]} in the folder of class {c}")
        for acc, new in zip(train, part, strict=True):
            acc.extend(new)
    test_dir = d / "Final_Test" / "Images"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: missing (expected the GTSRB test images there)")
    places = [test_dir / TEST_GT, test_dir.parent / TEST_GT, d / TEST_GT, d.parent / TEST_GT]
    csv = next((p for p in places if p.is_file()), None)
    if csv is None:
        unlabeled = ""
        if (test_dir / "GT-final_test.test.csv").exists():
            unlabeled = " (GT-final_test.test.csv has no labels)"
        raise DataError(f"{places[0]}: missing{unlabeled}; put {TEST_GT} from GTSRB_Final_Test_GT.zip in "
                        f"{' or '.join(str(p.parent) for p in places)}")
    rows = read_table(csv, ["Filename", "ClassId", *(ROI if roi else ())], delimiter=";")
    return train, _listed(rows, "Filename", test_dir, csv, roi)


def _folder(d: Path, roi: bool):
    train_dir = d / "Train"
    boxes_by_path: dict[Path, Box] = {}
    if roi:
        csv = d / "Train.csv"
        if not csv.is_file():
            raise DataError(f"{csv}: missing; gtsrb-roi needs the ROI boxes of the training images")
        for row in read_table(csv, ["Path", *ROI]):
            boxes_by_path[(d / row["Path"]).resolve()] = _box(row, csv)
    paths, labels, boxes = [], [], []
    for c in range(len(GTSRB_CLASSES)):
        folder = next((train_dir / n for n in (str(c), f"{c:05d}") if (train_dir / n).is_dir()), None)
        if folder is None:
            raise DataError(f"{train_dir / str(c)}: missing (expected class folders 0..42 in {train_dir})")
        files = sorted(p for p in folder.iterdir() if is_image(p))
        if not files:
            raise DataError(f"{folder}: no images")
        for p in files:
            paths.append(p)
            labels.append(c)
            if roi:
                box = boxes_by_path.get(p.resolve())
                if box is None:
                    raise DataError(f"{d / 'Train.csv'}: no row for {p.relative_to(d)}")
                boxes.append(box)
            else:
                boxes.append(None)
    csv = d / "Test.csv"
    if not csv.is_file():
        raise DataError(f"{csv}: missing (expected Path,ClassId columns for the test images)")
    rows = read_table(csv, ["Path", "ClassId", *(ROI if roi else ())])
    return (paths, labels, boxes), _listed(rows, "Path", d, csv, roi)


def load_gtsrb(root: Path, roi: bool = False, size: int = GTSRB_SIZE) -> Arrays:
    """Decoded GTSRB (train, test), from the cache beside the data when it is current."""
    found = find_gtsrb(root)
    if found is None:
        raise DataError(f"{root / 'GTSRB'}: GTSRB not found; expected {LAYOUT} under {root}")
    layout, d = found

    def build() -> Arrays:
        (ptr, ytr, btr), (pte, yte, bte) = (_official if layout == "official" else _folder)(d, roi)
        name = "gtsrb-roi" if roi else "gtsrb"
        return Arrays(decode_images(ptr, size, 3, btr if roi else None, f"decoding {name} train"),
                      np.asarray(ytr, np.int64),
                      decode_images(pte, size, 3, bte if roi else None, f"decoding {name} test"),
                      np.asarray(yte, np.int64), list(GTSRB_CLASSES))

    # torchvision keeps GT-final_test.csv beside GTSRB/, outside the fingerprinted tree: add it by hand
    outside = d.parent / TEST_GT
    stamp = f"{outside.stat().st_size}:{outside.stat().st_mtime_ns}" if outside.is_file() else "-"
    tag = f"gtsrb{'-roi' if roi else ''}-{size}"
    return cached_arrays(d, tag, f"{layout} roi={roi} size={size} outside_gt={stamp}", build)


def _where(root: Path) -> str:
    found = find_gtsrb(root)
    if found is None:
        return f"{root / 'GTSRB'} (Final_Training/ + Final_Test/, or Train/ + Test.csv)"
    return str(found[1])


def _present(root: Path) -> bool:
    return find_gtsrb(root) is not None


@register_dataset("gtsrb", "GTSRB, 43 traffic-sign classes (39,209 / 12,630), whole images resized to 32x32",
                  where=_where, present=_present, label="GTSRB")
def _gtsrb(arg, root: Path):
    return load_gtsrb(root).splits("gtsrb", GTSRB_PAPER)


@register_dataset("gtsrb-roi", "GTSRB cropped to each sign's ROI box (from the CSVs), then resized to 32x32",
                  where=_where, present=_present, label="GTSRB")
def _gtsrb_roi(arg, root: Path):
    return load_gtsrb(root, roi=True).splits("gtsrb-roi", GTSRB_PAPER)
