"""A practitioner's own data for ``antibackdoor defend``, taken as given, with a real folder's defects.

``DATA`` is one of:

- ``folder:PATH``: one sub-folder per class (``PATH/<class>/...``, images anywhere below it), or
  ``PATH/train/<class>/`` with ``PATH/test/<class>/`` (or ``val/``) beside it; or any layout with labels from a
  CSV file, ``folder:PATH?labels=FILE``. Options after ``?``: ``size=N``, ``channels=1|3``, ``labels=FILE``.
- ``npz:PATH``: ``x_train`` (N x H x W [x C] uint8) and ``y_train`` (integers); ``x_test``/``y_test`` and
  ``classes`` (strings) are optional.
- a registered dataset (``cifar10-mini``, ...): its training split, and its test split as DATA's own.

Unlike ``run``'s ``folder:`` loader nothing is held out here (the defense sees every training file), and a
folder's defects are found file by file: an unreadable or truncated image, a file that is not an image, a
CSV row naming a missing file, a broken link, and a file that lies outside PATH (an absolute CSV path, one
that climbs out with ``..``, a link pointing outside PATH: a dataset from elsewhere must not pull the
machine's other files into the training data, the report or ``kept/``). Each stops the load with one line
naming the file, or, when ``skip_bad`` is set, is skipped and listed (``UserData.bad``) for the report.
Grey, RGBA, palette and 16-bit images among RGB ones are converted and images of other sizes resized; both
are listed in ``UserData.notes``.

DATA's training part must meet the data rules ``run`` applies (``rules``): samples, two classes or more,
and a sample of every class. The class list is the list of class folders (or CSV labels) and never changes
silently, so an empty class folder, or a class whose every file was skipped, is an error here, with or
without ``skip_bad``. Data given with ``--test`` or ``--trusted`` may lack classes (with ``skip_bad``, an
empty class folder there stays in the class list with no samples, and is named in the notes).

Labels CSV: a header line with the columns ``file`` and ``label`` (comma- or semicolon-separated; other
columns are ignored). ``file`` is a path relative to PATH, ``label`` a class name. Classes are the distinct
labels in sorted order (numerically when all are integers). Image files below PATH that the CSV does not
name are not used (their number is noted).

Every sample has an *index*: its position in DATA's list of image files (class folders in sorted order, the
files below each sorted; with a CSV, the CSV's row order; for arrays, the row). Skipped files keep their
index, so indices, poison masks and the files they name agree whether or not bad files were skipped.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .folder import split_spec
from .images import (
    GRAY_MODES,
    Arrays,
    cached_arrays,
    channel_stats,
    decode_images_lenient,
    inside,
    is_image,
    list_files,
    read_headers,
    read_table,
    real_folder,
)
from .imageset import ImageSet, PaperSettings, from_numpy_nhwc
from .registry import DATASETS, load_dataset
from .rules import check_same_images, check_training_labels, class_list
from .safe_npz import open_npz

log = logging.getLogger("antibackdoor")

OPTIONS = {"size": int, "channels": int, "labels": str}
FALLBACK_SIZE = 32
MAX_AUTO_SIZE = 64
SKIP_HINT = "remove it or pass --skip-bad-files"


@dataclass
class BadFile:
    """A file that gave no sample: where, why, and its index when it had one."""

    path: str
    reason: str
    index: int | None = None


@dataclass
class UserData:
    """Training samples as given (``train``), with where each came from and what was wrong on the way."""

    spec: str
    train: ImageSet
    #: DATA's own test split (folder test/, npz x_test, a registered dataset's test split), if any
    test: ImageSet | None = None
    #: per training sample: its file relative to ``root`` (folders only)
    sources: list[str] | None = None
    root: Path | None = None
    #: per training sample: its index in DATA (see the module docstring)
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: how many indices DATA has (samples plus skipped image files)
    num_indexed: int = 0
    bad: list[BadFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kind: str = "dataset"  # "folder", "npz" or "dataset"
    #: what the papers used on a registered dataset (its model, data-dependent defense parameters), applied
    #: under ``--preset paper`` only, as ``run`` applies them; folders and arrays have the generic settings
    paper: PaperSettings = field(default_factory=PaperSettings)


# -- spec ---------------------------------------------------------------------------------------------------
def parse_folder_spec(arg: str, role: str = "DATA") -> tuple[Path, dict]:
    """``PATH?key=value,...`` -> (PATH, options); a ``?`` that is part of an existing path stays in it."""
    return split_spec(arg, OPTIONS, f"{role} folder:{arg}")


# -- listing a folder ---------------------------------------------------------------------------------------
@dataclass
class _Listing:
    classes: list[str]
    files: list[Path | None]  # None: a file that gives no sample (missing, a link outside PATH); it keeps its index
    labels: list[int]
    test_files: list[Path]
    test_labels: list[int]
    bad: list[BadFile]
    notes: list[str]


def _visible(p: Path, base: Path) -> bool:
    return not any(s.startswith(".") for s in p.relative_to(base).parts)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(folder: Path, root: Path, root_real: Path, bad: list[BadFile], start: int | None,
                 linked: list[Path]) -> list[Path | None]:
    """Image files below a class folder, in order. An image file that must not be read (a link outside PATH, a
    broken link: ``images.list_files``) goes to ``bad`` and, for training files (``start``: the index of the
    folder's first file), stays in the list as None so that it keeps its index. Other visible files go to
    ``bad`` as not images; linked sub-folders (not followed) to ``linked``."""
    entries, links = list_files(folder, root_real)
    linked += links
    images: list[Path | None] = []
    for p, why in entries:
        if is_image(p) and why is None:
            images.append(p)
        elif is_image(p):
            bad.append(BadFile(_rel(p, root), why, None if start is None else start + len(images)))
            if start is not None:
                images.append(None)
        else:
            bad.append(BadFile(_rel(p, root), why or f"not an image file (suffix {p.suffix or 'none'!r})"))
    return images


def _rel(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def _list_class_tree(tree: Path, root: Path, skip_bad: bool, bad: list[BadFile], notes: list[str],
                     classes: list[str] | None = None,
                     every_class: bool = True) -> tuple[list[str], list[Path | None], list[int]]:
    """Classes, files and labels of ``PATH/<class>/...`` (training) or, given ``classes``, of a test tree.

    An empty training class folder is an error; where ``every_class`` is off (``--test``/``--trusted`` data)
    and ``skip_bad`` is set, the class stays in the class list with no samples instead."""
    dirs = _class_dirs(tree)
    is_test = classes is not None
    if classes is None:
        classes = [d.name for d in dirs]
    index = {c: i for i, c in enumerate(classes)}
    root_real = real_folder(root)
    files: list[Path | None] = []
    labels: list[int] = []
    linked: list[Path] = []
    for d in dirs:
        if d.name not in index:
            raise DataError(f"{d}: class {d.name!r} is not one of the training classes ({', '.join(classes)})")
        if not inside(d, root_real):  # the class folder (or train/ above it) is a link leading outside PATH
            bad.append(BadFile(_rel(d, root), f"resolves to {real_folder(d)} through a link, outside {root}; "
                                              "class folders must lie inside PATH"))
            continue
        found = _class_files(d, root, root_real, bad, None if is_test else len(files), linked)
        if not found and is_test:
            notes.append(f"test folder {_rel(d, root)}/ has no images")
        elif not found:
            msg = f"{d}: empty class folder (no images)"
            if every_class:
                raise DataError(f"{msg}; a classifier needs a training sample of every class: remove the folder "
                                "or put images in it")
            if not skip_bad:
                raise DataError(f"{msg}; remove the folder or pass --skip-bad-files (the class then stays in "
                                "the class list with no samples)")
            notes.append(f"class {d.name!r} has no images (empty folder); it stays in the class list "
                         f"(label {index[d.name]}) with no samples")
        files += found
        labels += [index[d.name]] * len(found)
    top = [p for p in tree.iterdir() if not p.name.startswith(".")]
    bad += [BadFile(_rel(p, root), "a broken link") for p in top if p.is_symlink() and not p.exists()]
    loose = [p for p in top if p.is_file() and not p.name.startswith("antibackdoor-cache-")]
    if loose:
        notes.append(f"{len(loose)} file(s) directly in {_rel(tree, root) or '.'}/ are in no class folder and "
                     f"were not used (e.g. {loose[0].name})")
    if linked:
        notes.append(f"{len(linked)} linked folder(s) below class folders were not followed (e.g. "
                     f"{_rel(linked[0], root)})")
    return classes, files, labels


def _natural_sorted(names: set[str]) -> list[str]:
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def _csv_row_problem(text: str, p: Path, real: Path, root: Path, root_real: Path) -> str | None:
    """Why a CSV row's file gives no sample, said after "named on labels.csv line N" (None: a file inside
    PATH). A CSV shipped with a dataset must not pull files from elsewhere on the machine into the training
    data, the report or ``kept/``, so absolute paths and paths (links included) leading outside PATH are refused."""
    if Path(text).is_absolute():
        return f"is an absolute path; files must be given relative to {root} and lie inside it"
    if not real.is_relative_to(root_real):
        return f"resolves to {real}, outside {root}; files must lie inside it"
    if p.is_symlink() and not p.exists():
        return "but a broken link"
    if not p.is_file():
        return "but missing"
    return None


def _list_csv(root: Path, csv_path: Path, skip_bad: bool, bad: list[BadFile], notes: list[str]) -> _Listing:
    rows = read_table(csv_path, ["file", "label"])
    if not rows:
        raise DataError(f"{csv_path}: no rows after the header")
    classes = _natural_sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    files: list[Path | None] = []
    labels: list[int] = []
    seen: dict[str, str] = {}
    root_real = real_folder(root)
    for i, r in enumerate(rows):
        p = root / r["file"]  # an absolute file replaces root here (and is refused below)
        real = p.resolve()
        key = _rel(real, root_real)
        if key in seen:
            raise DataError(f"{csv_path}:{r['_line']}: {r['file']} is listed twice (first on line {seen[key]})")
        seen[key] = r["_line"]
        problem = _csv_row_problem(r["file"], p, real, root, root_real)
        if problem is None:
            files.append(p)
        else:
            bad.append(BadFile(r["file"], f"named on {csv_path.name} line {r['_line']} {problem}", i))
            files.append(None)
        labels.append(index[r["label"]])
    listed = {p.resolve() for p in files if p is not None}
    unlisted = [p for p in root.rglob("*") if p.is_file() and is_image(p) and _visible(p, root)
                and p.resolve() not in listed]
    if unlisted:
        notes.append(f"{len(unlisted)} image file(s) below {root} are not in {csv_path.name} and were not used "
                     f"(e.g. {_rel(unlisted[0], root)})")
    return _Listing(classes, files, labels, [], [], bad, notes)


def list_folder(root: Path, labels_csv: Path | None, skip_bad: bool, every_class: bool = True) -> _Listing:
    """Classes and files of a folder in any of the three layouts (see the module docstring); ``every_class``:
    an empty class folder is an error even with ``skip_bad`` (training data, see ``_list_class_tree``)."""
    bad: list[BadFile] = []
    notes: list[str] = []
    if labels_csv is not None:
        listing = _list_csv(root, labels_csv, skip_bad, bad, notes)
    elif (root / "train").is_dir():
        test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
        classes, files, labels = _list_class_tree(root / "train", root, skip_bad, bad, notes,
                                                  every_class=every_class)
        test_files: list[Path] = []
        test_labels: list[int] = []
        if test_dir is not None:
            _, found, test_labels = _list_class_tree(test_dir, root, True, bad, notes, classes)
            test_files = [p for p in found if p is not None]  # test files keep no index, so none is None
        listing = _Listing(classes, list(files), labels, test_files, test_labels, bad, notes)
    else:
        classes, files, labels = _list_class_tree(root, root, skip_bad, bad, notes, every_class=every_class)
        listing = _Listing(classes, list(files), labels, [], [], bad, notes)
    if not listing.classes:
        raise DataError(f"{root}: no class sub-folders (expected PATH/<class>/<images>, PATH/train/<class>/, "
                        "or folder:PATH?labels=FILE)")
    if len(listing.classes) < 2:
        raise DataError(f"{root}: only one class ({listing.classes[0]!r}); a classifier needs at least two")
    return listing


# -- decoding -----------------------------------------------------------------------------------------------
def _auto_format(headers: list) -> tuple[int, int]:
    sizes: Counter = Counter()
    grey = True
    for h in headers:
        if isinstance(h, tuple):
            sizes[h[0]] += 1
            grey = grey and h[1] in GRAY_MODES
    if not sizes:
        return FALLBACK_SIZE, 3
    (w, h), _ = sizes.most_common(1)[0]
    return (w if w == h and w <= MAX_AUTO_SIZE else FALLBACK_SIZE), (1 if grey else 3)


def _format_notes(headers: list, size: int, channels: int) -> list[str]:
    """What decoding changes: colour modes converted, sizes resized (with counts)."""
    modes: Counter = Counter()
    sizes: Counter = Counter()
    for h in headers:
        if isinstance(h, tuple):
            modes[h[1]] += 1
            sizes[h[0]] += 1
    notes = []
    target = "L" if channels == 1 else "RGB"
    converted = {m: n for m, n in modes.items() if m != target}
    if converted:
        how = {"RGBA": "alpha dropped", "LA": "alpha dropped", "P": "palette", "I;16": "16-bit, scaled to 8",
               "I;16B": "16-bit, scaled to 8", "I": "32-bit read as 16-bit, scaled to 8", "F": "float",
               "CMYK": "CMYK"}
        parts = ", ".join(f"{n} {m}" + (f" ({how[m]})" if m in how else "") for m, n in sorted(converted.items()))
        notes.append(f"converted to {'grey' if channels == 1 else 'RGB'}: {parts}")
    other = {s: n for s, n in sizes.items() if s != (size, size)}
    if other:
        top = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(other.items(), key=lambda t: -t[1])[:5])
        stretched = sum(n for (w, h), n in other.items() if w != h)
        notes.append(f"resized to {size}x{size}: {sum(other.values())} image(s) of other sizes ({top}"
                     f"{', ...' if len(other) > 5 else ''})" + (f"; {stretched} not square (stretched)"
                                                               if stretched else ""))
    return notes


def _compact(x: np.ndarray, keep: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Rows ``keep`` (increasing) moved to the front in place, in chunks (no second full-size array)."""
    for s in range(0, len(keep), chunk):
        part = keep[s:s + chunk]
        if part[0] != s or part[-1] != s + len(part) - 1:
            x[s:s + len(part)] = x[part]
    return x[:len(keep)]


def _decode_listed(files: list[Path | None], root: Path, size: int, channels: int, headers: list,
                   skip_bad: bool, bad: list[BadFile], desc: str) -> tuple[np.ndarray, np.ndarray]:
    """(images of the good files, their positions in ``files``); header/decode failures go to ``bad``."""
    usable = [i for i, p in enumerate(files) if p is not None and isinstance(headers[i], tuple)]
    for i, p in enumerate(files):
        if p is not None and not isinstance(headers[i], tuple):
            bad.append(BadFile(_rel(p, root), _reason(headers[i], p), i))
    if bad and not skip_bad:
        _raise_first(bad, root)
    x, errors = decode_images_lenient([files[i] for i in usable], size, channels, desc=desc,
                                      stop_on_error=not skip_bad)
    for j, msg in sorted(errors.items()):
        bad.append(BadFile(_rel(files[usable[j]], root), _reason(msg, files[usable[j]]), usable[j]))
    if errors and not skip_bad:
        _raise_first(bad, root)
    good = np.array([j for j in range(len(usable)) if j not in errors], np.int64)
    if errors:
        x = _compact(x, good)
    return x, np.asarray(usable, np.int64)[good]


def _reason(msg: str, path: Path) -> str:
    """The error text without the leading path (the report lists the file beside it), on one line."""
    text = msg.split(f"{path}: ", 1)[-1]
    return " ".join(text.split())


def _raise_first(bad: list[BadFile], root: Path) -> None:
    b = bad[0]
    shown = b.path if Path(b.path).is_absolute() else str(root / b.path)
    raise DataError(f"{shown}: {b.reason} ({SKIP_HINT})")


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def load_user_folder(arg: str, skip_bad: bool = False, role: str = "DATA", size: int | None = None,
                     channels: int | None = None) -> UserData:
    """``folder:arg`` as given: every image a training sample (test/ as DATA's own test split)."""
    root, opts = parse_folder_spec(arg, role)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected PATH/<class>/<images>, or PATH/train/<class>/)")
    size, channels = opts.get("size", size), opts.get("channels", channels)
    labels_csv = None
    if "labels" in opts:
        labels_csv = Path(opts["labels"]).expanduser()
        labels_csv = labels_csv if labels_csv.is_absolute() else root / labels_csv
        if not labels_csv.is_file():
            raise DataError(f"{labels_csv}: no such labels file (folder:PATH?labels=FILE, relative to PATH)")

    def build() -> Arrays:
        listing = list_folder(root, labels_csv, skip_bad, every_class=role == "DATA")
        bad = listing.bad
        if bad and not skip_bad:
            _raise_first(bad, root)
        files = listing.files
        headers = read_headers([p for p in files + listing.test_files if p is not None],
                               desc="reading image headers")
        it = iter(headers)
        train_headers = [next(it) if p is not None else "missing" for p in files]
        test_headers = list(it)
        s, c = size, channels
        if s is None or c is None:
            auto_s, auto_c = _auto_format(train_headers + test_headers)
            s, c = s or auto_s, c or auto_c
        notes = listing.notes + _format_notes(train_headers + test_headers, s, c)
        x, pos = _decode_listed(files, root, s, c, train_headers, skip_bad, bad, "decoding images")
        test_bad: list[BadFile] = []
        xt, tpos = _decode_listed(list(listing.test_files), root, s, c, test_headers, skip_bad, test_bad,
                                  "decoding test images")
        for b in test_bad:  # a test file has no index among DATA's training samples
            b.index = None
        bad += test_bad
        y = np.asarray(listing.labels, np.int64)[pos] if len(pos) else np.zeros(0, np.int64)
        yt = np.asarray(listing.test_labels, np.int64)[tpos] if len(tpos) else np.zeros(0, np.int64)
        meta = {
            "sources": np.array([_rel(files[i], root) for i in pos], dtype=str),
            "index": pos,
            "num_indexed": np.array(len(files)),
            "bad_path": np.array([b.path for b in bad], dtype=str),
            "bad_reason": np.array([b.reason for b in bad], dtype=str),
            "bad_index": np.array([-1 if b.index is None else b.index for b in bad], np.int64),
            "notes": np.array(notes, dtype=str),
            "has_test": np.array(bool(listing.test_files)),
        }
        return Arrays(x, y, xt, yt, listing.classes, meta=meta)

    # links=inside: caches written before links and CSV paths were checked may hold files from outside PATH
    options = f"defend size={size} channels={channels} skip={skip_bad} links=inside"
    if labels_csv is not None:
        options += f" labels={labels_csv} sha={_file_digest(labels_csv)}"
    tag = "defend" + (f"-size{size}" if size else "") + (f"-channels{channels}" if channels else "") + \
        (f"-{hashlib.sha256(str(labels_csv).encode()).hexdigest()[:8]}" if labels_csv else "") + \
        ("-skip" if skip_bad else "")
    arrays = cached_arrays(root, tag, options, build)
    return _from_arrays(arrays, f"folder:{arg}", root, role)


def _outside_source(sources: np.ndarray) -> str | None:
    """The first source that is absolute or climbs out with ``..`` (only a forged cache can hold one); string
    ufuncs over the array, since this runs on every load of a cached folder."""
    sources = np.asarray(sources, dtype=str)
    if not sources.size:
        return None
    suspect = np.char.startswith(sources, "/") | (np.char.find(sources, "..") >= 0)
    for s in map(str, sources[suspect]):
        if s.startswith("/") or posixpath.normpath(s).split("/")[0] == "..":
            return s
    return None


def _from_arrays(a: Arrays, spec: str, root: Path, role: str) -> UserData:
    m = a.meta
    notes = [str(n) for n in m.get("notes", [])]
    bad = [BadFile(str(p), str(r), None if int(i) < 0 else int(i))
           for p, r, i in zip(m.get("bad_path", []), m.get("bad_reason", []), m.get("bad_index", []), strict=True)]
    outside = _outside_source(m.get("sources", np.zeros(0, str)))
    if outside is not None:  # export-kept copies sources: a cache shipped with the data must not name others
        raise DataError(f"{root}: its decoded-image cache names {outside}, outside the folder (not written by this "
                        f"version); delete the antibackdoor-cache-* files in {root}")
    counts = np.bincount(a.y_train, minlength=len(a.classes))
    empty = [i for i in range(len(a.classes)) if counts[i] == 0]
    if int((counts > 0).sum()) < 2:
        have = [a.classes[i] for i in range(len(a.classes)) if counts[i] > 0]
        raise DataError(f"{root}: images of {len(have)} class(es) left ({', '.join(have) or 'none'}) after "
                        "skipping bad files; a classifier needs at least two")
    if empty and role == "DATA":  # every file of the class was skipped as bad (an empty folder fails earlier)
        raise DataError(f"{root}: no usable image of class {class_list(empty, a.classes)} is left after skipping "
                        "bad files; a classifier needs a training sample of every class: fix or remove the bad "
                        "files, or remove the class")
    for i in empty:
        c = a.classes[i]
        if not any(n.startswith(f"class {c!r}") for n in notes):
            notes.append(f"class {c!r} has no usable images; it stays in the class list with no samples")
    if role == "DATA":
        check_training_labels(a.y_train, a.classes, spec, "the training images")
    mean, std = a.mean, a.std
    if mean is None or std is None:
        mean, std = channel_stats(a.x_train)
    train = from_numpy_nhwc(a.x_train, a.y_train, f"{spec} ({role})", a.classes, mean, std)
    test = None
    if bool(m.get("has_test", False)) and len(a.x_test):
        test = from_numpy_nhwc(a.x_test, a.y_test, f"{spec} (test)", a.classes, mean, std)
    return UserData(spec, train, test, [str(s) for s in m.get("sources", [])], root,
                    np.asarray(m.get("index", np.arange(len(a.y_train))), np.int64),
                    int(m.get("num_indexed", len(a.y_train))), bad, notes, "folder")


# -- arrays -------------------------------------------------------------------------------------------------
def load_user_npz(path: Path, role: str = "DATA") -> UserData:
    """``npz:PATH`` with x_train/y_train and optionally x_test/y_test and classes, through the checked reader
    (``safe_npz``: no pickles, no decompression bombs); as DATA it must meet the data rules (``rules``)."""
    where = f"npz:{path}"
    with open_npz(path) as f:
        if "x_train" not in f or "y_train" not in f:
            raise DataError(f"{path}: needs arrays x_train and y_train (has {', '.join(f.files) or 'none'})")
        has_test = "x_test" in f and "y_test" in f
        arrays = f.read(["x_train", "y_train", "x_test", "y_test", "classes"] if has_test else
                        ["x_train", "y_train", "classes"])
    ys = [arrays["y_train"]] + ([arrays["y_test"]] if has_test else [])
    if any(not np.issubdtype(v.dtype, np.integer) for v in ys):
        raise DataError(f"{path}: labels must be integers (got {', '.join(str(v.dtype) for v in ys)})")
    if any(v.size and v.min() < 0 for v in ys):
        raise DataError(f"{path}: negative labels")
    n = int(max(v.max() if v.size else -1 for v in ys)) + 1
    classes = [str(c) for c in np.atleast_1d(arrays["classes"])] if "classes" in arrays else [str(i) for i in range(n)]
    if len(classes) < n:
        raise DataError(f"{path}: {len(classes)} class names but labels up to {n - 1}")
    if role == "DATA":  # run's rules; --test and --trusted data may lack classes
        check_training_labels(arrays["y_train"], classes, where, "y_train", arrays["y_test"] if has_test else None,
                              "y_test")
    elif not any(v.size for v in ys):
        raise DataError(f"{role} {where}: no samples")
    elif len(classes) < 2:
        raise DataError(f"{where}: only one class; a classifier needs at least two classes")
    train = from_numpy_nhwc(arrays["x_train"], arrays["y_train"], f"{where} ({role})", classes)
    if has_test:
        check_same_images(arrays["x_train"].shape, arrays["x_test"].shape, where, "x_train", "x_test")
    test = None
    if has_test and len(arrays["y_test"]):
        test = from_numpy_nhwc(arrays["x_test"], arrays["y_test"], f"{where} (test)", classes,
                               train.mean, train.std)
    return UserData(f"npz:{path}", train, test, None, None, np.arange(len(train), dtype=np.int64), len(train),
                    kind="npz")


def load_user_data(spec: str, *, skip_bad: bool = False, data_root: str | Path | None = None,
                   role: str = "DATA", size: int | None = None, channels: int | None = None) -> UserData:
    """Load ``spec`` (folder:PATH, npz:PATH or a registered dataset) as given (see the module docstring)."""
    name, _, arg = spec.partition(":")
    if name == "folder":
        if not arg:
            raise ConfigError(f"{role}: folder needs a path, e.g. folder:PATH")
        return load_user_folder(arg, skip_bad, role, size, channels)
    if name == "npz":
        if not arg:
            raise ConfigError(f"{role}: npz needs a path, e.g. npz:PATH")
        return load_user_npz(Path(arg).expanduser(), role)

    if name not in DATASETS:
        raise ConfigError(f"{role}: unknown data {spec!r}; use folder:PATH, npz:PATH or one of "
                          f"{', '.join(sorted(k for k in DATASETS if k not in ('folder', 'npz')))}")
    splits = load_dataset(spec, data_root)
    train = splits.train
    return UserData(spec, train, splits.test, None, None, np.arange(len(train), dtype=np.int64), len(train),
                    kind="dataset", paper=splits.paper)


def conform(other: UserData, like: ImageSet, role: str, use_test: bool) -> ImageSet:
    """``other``'s images (its test split when ``use_test`` and it has one) as a set shaped and labelled like
    ``like``: the same image shape and class list (folders are matched by class name)."""
    part = other.test if (use_test and other.test is not None) else other.train
    if len(part) == 0:
        raise DataError(f"{role} {other.spec}: no samples")
    if part.x.shape[1:] != like.x.shape[1:]:
        raise DataError(f"{role} {other.spec}: images are {tuple(part.x.shape[1:])} (C, H, W) but DATA's are "
                        f"{tuple(like.x.shape[1:])}")
    y = part.y
    if part.classes != like.classes:
        if other.kind == "folder":
            index = {c: i for i, c in enumerate(like.classes)}
            unknown = [c for c in part.classes if c not in index]
            if unknown:
                raise DataError(f"{role} {other.spec}: class(es) {', '.join(map(repr, unknown))} are not classes "
                                f"of DATA ({', '.join(like.classes)})")
            import torch

            remap = torch.tensor([index[c] for c in part.classes], dtype=torch.int64)
            y = remap[part.y]
        elif len(part.classes) != len(like.classes):
            raise DataError(f"{role} {other.spec}: {len(part.classes)} classes but DATA has {len(like.classes)}")
    return ImageSet(part.x, y, list(like.classes), like.mean, like.std, f"{other.spec} ({role})")


__all__ = ["BadFile", "UserData", "conform", "list_folder", "load_user_data", "parse_folder_spec"]
