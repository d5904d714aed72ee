"""GTSRB, Tiny-ImageNet and image-folder loaders on tiny fixtures written in each official layout.

Every image's colour encodes its class, so a test can tell from the pixels whether a label (from a folder
name, a CSV or val_annotations.txt) reached the right image, and whether an ROI crop happened.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from antibackdoor.data import DATASETS, load_dataset
from antibackdoor.data import images as images_mod
from antibackdoor.errors import ConfigError, DataError

N_GTSRB = 43


def colour(c: int) -> tuple[int, int, int]:
    return (c * 5, 255 - c * 5, 77)


def sign(path: Path, c: int, size: int = 16, border: int = 4, fmt: str | None = None) -> tuple[int, ...]:
    """A size x size image: black border, class colour inside; returns its ROI box (x1, y1, x2, y2)."""
    a = np.zeros((size, size, 3), np.uint8)
    a[border:size - border, border:size - border] = colour(c)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format=fmt)
    return border, border, size - border, size - border


def make_gtsrb_official(root: Path, per_class: int = 2) -> Path:
    d = root / "GTSRB"
    for c in range(N_GTSRB):
        folder = d / "Final_Training" / "Images" / f"{c:05d}"
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for k in range(per_class):
            name = f"00000_{k:05d}.ppm"
            box = sign(folder / name, c, fmt="PPM")
            rows.append(f"{name};16;16;{';'.join(map(str, box))};{c}")
        (folder / f"GT-{c:05d}.csv").write_text("\n".join(rows) + "\n")
    test = d / "Final_Test" / "Images"
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(N_GTSRB):
        c = (i * 7) % N_GTSRB  # test files are not in class order
        box = sign(test / f"{i:05d}.ppm", c, fmt="PPM")
        rows.append(f"{i:05d}.ppm;16;16;{';'.join(map(str, box))};{c}")
    (test / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return d


def make_gtsrb_folder(root: Path) -> Path:
    d = root / "GTSRB"
    train_rows = ["Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path"]
    for c in range(N_GTSRB):
        for k in range(2):
            rel = f"Train/{c}/{c:05d}_00000_{k:05d}.png"
            box = sign(d / rel, c)
            train_rows.append(f"16,16,{','.join(map(str, box))},{c},{rel}")
    test_rows = ["Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path"]
    for i in range(N_GTSRB):
        c = (i * 5) % N_GTSRB
        box = sign(d / f"Test/{i:05d}.png", c)
        test_rows.append(f"16,16,{','.join(map(str, box))},{c},Test/{i:05d}.png")
    (d / "Train.csv").write_text("\n".join(train_rows) + "\n")
    (d / "Test.csv").write_text("\n".join(test_rows) + "\n")
    return d


def centre_colours(x) -> np.ndarray:
    return x[:, :, 16, 16].numpy().astype(int)


@pytest.fixture()
def gtsrb_root(tmp_path):
    make_gtsrb_official(tmp_path)
    return tmp_path


# -- GTSRB ----------------------------------------------------------------------------------------------


def test_gtsrb_official_layout(gtsrb_root):
    s = load_dataset("gtsrb", gtsrb_root)
    assert s.train.x.shape == (2 * N_GTSRB, 3, 32, 32) and s.test.x.shape == (N_GTSRB, 3, 32, 32)
    assert s.train.num_classes == 43 and s.train.classes[14] == "stop"
    assert s.train.class_counts().tolist() == [2] * N_GTSRB
    # labels came from the CSVs and sit on the right images (test files are listed out of class order)
    for split in (s.train, s.test):
        want = np.array([colour(int(c)) for c in split.y])
        assert np.abs(centre_colours(split.x) - want).max() <= 1
    assert s.test.y[:3].tolist() == [0, 7, 14]
    # the whole image was resized: the black border is still there
    assert int(s.train.x[:, :, 0, 0].max()) < 40
    assert s.paper.model_for("a-abl") == "resnet18" and s.paper.model_for("aibd") == "wrn16-1"
    assert s.paper.defense_params == {}  # A-ABL's paper preset (split eps 2/255) as it is


def test_gtsrb_roi_crops_to_the_box(gtsrb_root):
    s = load_dataset("gtsrb-roi", gtsrb_root)
    corners = s.train.x[:, :, 0, 0].numpy().astype(int)
    want = np.array([colour(int(c)) for c in s.train.y])
    assert np.abs(corners - want).max() <= 1
    # both variants cache side by side
    assert (gtsrb_root / "GTSRB" / "antibackdoor-cache-gtsrb-roi-32.npz").is_file()


def test_gtsrb_registry_entry(gtsrb_root, tmp_path_factory):
    entry = DATASETS["gtsrb"]
    assert entry.present(gtsrb_root) and str(gtsrb_root / "GTSRB") in entry.where(gtsrb_root)
    empty = tmp_path_factory.mktemp("empty")
    assert not entry.present(empty) and "Final_Training" in entry.where(empty)
    assert DATASETS["gtsrb-roi"].present(gtsrb_root)


def test_cache_skips_decoding_and_notices_changes(gtsrb_root, monkeypatch):
    first = load_dataset("gtsrb", gtsrb_root)
    d = gtsrb_root / "GTSRB"
    assert (d / "antibackdoor-cache-gtsrb-32.npz").is_file()
    assert not list(d.glob("*.tmp"))

    def no_decoding(*a, **k):
        raise AssertionError("decoded although the cache is current")

    with monkeypatch.context() as m:
        m.setattr(images_mod, "decode_image", no_decoding)
        second = load_dataset("gtsrb", gtsrb_root)
    assert np.array_equal(first.train.x.numpy(), second.train.x.numpy())
    assert first.train.mean == second.train.mean
    # the cache is a plain npz: dataset (x_train, y_train, x_test, y_test)
    as_npz = load_dataset(f"npz:{d / 'antibackdoor-cache-gtsrb-32.npz'}")
    assert np.array_equal(as_npz.test.y.numpy(), first.test.y.numpy())
    # rewrite one training image as class 9's colour: the cache is stale and the new pixels appear
    img = d / "Final_Training" / "Images" / "00000" / "00000_00001.ppm"
    sign(img, 9, fmt="PPM")
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = load_dataset("gtsrb", gtsrb_root)
    assert np.abs(centre_colours(third.train.x[1:2])[0] - np.array(colour(9))).max() <= 1
    assert third.train.y[1] == 0


def test_corrupt_cache_is_rebuilt(gtsrb_root):
    load_dataset("gtsrb", gtsrb_root)
    cache = gtsrb_root / "GTSRB" / "antibackdoor-cache-gtsrb-32.npz"
    cache.write_bytes(b"not a zip")
    s = load_dataset("gtsrb", gtsrb_root)
    assert len(s.train) == 2 * N_GTSRB
    assert zipfile.is_zipfile(cache)


def test_unwritable_cache_still_loads(gtsrb_root, monkeypatch):
    real_open = open

    def refuse(file, mode="r", *a, **k):
        if "x" in mode:
            raise PermissionError(f"{file}: read-only file system")
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr("builtins.open", refuse)
    s = load_dataset("gtsrb", gtsrb_root)
    assert len(s.test) == N_GTSRB
    assert not list((gtsrb_root / "GTSRB").glob("antibackdoor-cache-*"))


def _corrupt(path: Path) -> None:
    path.write_bytes(b"P6\n16 16\n255\n" + b"\x00" * 20)  # truncated pixel data


def _drop_class_id(path: Path) -> None:
    path.write_text(path.read_text().replace(";ClassId", ";Class"))


@pytest.mark.parametrize(
    "damage, named, message",
    [
        (lambda d: (d / "Final_Training/Images/00005/GT-00005.csv").unlink(), "GT-00005.csv", "missing"),
        (lambda d: _corrupt(d / "Final_Training/Images/00003/00000_00001.ppm"), "00003/00000_00001.ppm",
         "cannot decode"),
        (lambda d: (d / "Final_Test/Images/GT-final_test.csv").unlink(), "GT-final_test.csv", "missing"),
        (lambda d: (d / "Final_Test/Images/00004.ppm").unlink(), "Images/00004.ppm", "listed in"),
        (lambda d: _drop_class_id(d / "Final_Training/Images/00001/GT-00001.csv"), "GT-00001.csv", "ClassId"),
        (lambda d: [p.unlink() for p in (d / "Final_Training/Images/00042").iterdir()]
         and (d / "Final_Training/Images/00042").rmdir(), "00042", "missing"),
    ],
    ids=["class-csv", "corrupt-ppm", "test-csv", "listed-file", "column", "class-folder"],
)
def test_gtsrb_errors_name_the_file(gtsrb_root, damage, named, message):
    damage(gtsrb_root / "GTSRB")
    with pytest.raises(DataError, match=message) as exc:
        load_dataset("gtsrb", gtsrb_root)
    assert named in str(exc.value)
    assert "\n" not in str(exc.value)


def test_gtsrb_absent_names_the_layout(tmp_path):
    with pytest.raises(DataError, match="Final_Training/Images") as exc:
        load_dataset("gtsrb", tmp_path)
    assert str(tmp_path / "GTSRB") in str(exc.value)


def test_gtsrb_folder_layout(tmp_path):
    make_gtsrb_folder(tmp_path)
    s = load_dataset("gtsrb", tmp_path)
    assert s.train.x.shape == (2 * N_GTSRB, 3, 32, 32) and s.train.class_counts().tolist() == [2] * N_GTSRB
    assert s.test.y[:3].tolist() == [0, 5, 10]
    for split in (s.train, s.test):
        want = np.array([colour(int(c)) for c in split.y])
        assert np.abs(centre_colours(split.x) - want).max() <= 1
    roi = load_dataset("gtsrb-roi", tmp_path)
    assert np.abs(roi.test.x[:, :, 0, 0].numpy().astype(int)
                  - np.array([colour(int(c)) for c in roi.test.y])).max() <= 1
    (tmp_path / "GTSRB" / "Test.csv").unlink()
    with pytest.raises(DataError, match="Test.csv"):
        load_dataset("gtsrb", tmp_path)


# -- Tiny-ImageNet --------------------------------------------------------------------------------------

WNIDS = ["n03000003", "n01000001", "n02000002"]  # deliberately unsorted in wnids.txt
RGB = {"n01000001": (220, 30, 30), "n02000002": (30, 220, 30), "n03000003": (30, 30, 220)}


def make_tiny(root: Path, per_class: int = 3) -> Path:
    d = root / "tiny-imagenet-200"
    d.mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (d / "words.txt").write_text("n00000000\tentity\nn01000001\tgoldfish, Carassius auratus\n"
                                 "n02000002\tEuropean fire salamander, Salamandra salamandra\n"
                                 "n03000003\tbullfrog, Rana catesbeiana\n")
    for w in WNIDS:
        folder = d / "train" / w / "images"
        folder.mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", (64, 64), RGB[w]).save(folder / f"{w}_{k}.JPEG", format="JPEG")
        (d / "train" / w / f"{w}_boxes.txt").write_text("")
    # one grey JPEG (the real set has a few hundred) and one of another size
    Image.new("L", (64, 64), 128).save(d / f"train/{WNIDS[0]}/images/{WNIDS[0]}_0.JPEG", format="JPEG")
    odd = d / f"train/{WNIDS[1]}/images/{WNIDS[1]}_1.JPEG"
    Image.new("RGB", (50, 50), RGB[WNIDS[1]]).save(odd, format="JPEG")
    val = d / "val" / "images"
    val.mkdir(parents=True)
    lines = []
    for i, w in enumerate(["n02000002", "n03000003", "n01000001", "n02000002"]):
        Image.new("RGB", (64, 64), RGB[w]).save(val / f"val_{i}.JPEG", format="JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (d / "test" / "images").mkdir(parents=True)
    return d


def test_tiny_imagenet_layout_and_label_order(tmp_path):
    make_tiny(tmp_path)
    s = load_dataset("tiny-imagenet", tmp_path)
    assert s.train.x.shape == (9, 3, 64, 64) and s.test.x.shape == (4, 3, 64, 64)
    assert s.train.classes == ["goldfish", "European fire salamander", "bullfrog"]  # sorted wnids
    assert s.test.y.tolist() == [1, 2, 0, 1]
    sorted_ids = sorted(WNIDS)
    for split in (s.train, s.test):
        for x, y in zip(split.x, split.y, strict=True):
            px = x[:, 32, 32].numpy().astype(int)
            if px.std() < 5:  # the grey image
                continue
            assert int(np.argmax(px)) == int(np.argmax(RGB[sorted_ids[int(y)]]))
    assert s.paper.model_for("aibd") == "resnet34"
    assert s.paper.defense_params["a-abl"]["split_eps"] == pytest.approx(1 / 255)
    entry = DATASETS["tiny-imagenet"]
    assert entry.present(tmp_path) and entry.where(tmp_path).endswith("tiny-imagenet-200")


def test_tiny_imagenet_without_words_uses_wnids(tmp_path):
    d = make_tiny(tmp_path)
    (d / "words.txt").unlink()
    assert load_dataset("tiny-imagenet", tmp_path).train.classes == sorted(WNIDS)


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda d: (d / "wnids.txt").unlink(), "wnids.txt"),
        (lambda d: (d / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09999999\t0\t0\t1\t1\n"),
         "val_annotations.txt:1"),
        (lambda d: (d / "train/n02000002/images/n02000002_2.JPEG").write_bytes(b"\xff\xd8\xff junk"),
         "n02000002_2.JPEG"),
        (lambda d: [p.unlink() for p in (d / "train" / "n01000001" / "images").iterdir()]
         and (d / "train" / "n01000001" / "images").rmdir(), "train/n01000001/images"),
    ],
    ids=["wnids", "annotation", "corrupt-jpeg", "class-folder"],
)
def test_tiny_imagenet_errors_name_the_file(tmp_path, damage, named):
    damage(make_tiny(tmp_path))
    with pytest.raises(DataError) as exc:
        load_dataset("tiny-imagenet", tmp_path)
    assert named in str(exc.value)


def test_tiny_imagenet_absent(tmp_path):
    with pytest.raises(DataError, match="tiny-imagenet-200.*wnids.txt"):
        load_dataset("tiny-imagenet", tmp_path)
    assert not DATASETS["tiny-imagenet"].present(tmp_path)


# -- image folders ----------------------------------------------------------------------------------------

FOLDER_RGB = {"cat": (200, 40, 40), "dog": (40, 200, 40), "emu": (40, 40, 200)}


def make_folder(path: Path, n: int = 10, size: int = 28, mode: str = "RGB") -> Path:
    for c, rgb in FOLDER_RGB.items():
        (path / c).mkdir(parents=True)
        for k in range(n):
            fill = rgb if mode == "RGB" else rgb[0]
            Image.new(mode, (size, size), fill).save(path / c / f"{k:03d}.png")
    Image.new(mode, (40, 40), 0).save(path / "cat" / "odd-size.png")  # not the most common size
    (path / "dog" / "notes.txt").write_text("not an image")
    return path


def test_folder_split_is_stratified_and_fixed(tmp_path):
    make_folder(tmp_path / "pets")
    s = load_dataset(f"folder:{tmp_path / 'pets'}")
    assert s.train.classes == ["cat", "dog", "emu"]
    assert s.train.x.shape[1:] == (3, 28, 28)  # the most common size, kept
    assert s.train.class_counts().tolist() == [9, 8, 8] and s.test.class_counts().tolist() == [2, 2, 2]
    for split in (s.train, s.test):
        for x, y in zip(split.x, split.y, strict=True):
            if int(x.max()) > 0:
                assert int(x[:, 14, 14].argmax()) == int(np.argmax(FOLDER_RGB[split.classes[int(y)]]))
    again = load_dataset(f"folder:{tmp_path / 'pets'}?test=0.2,seed=0")
    assert np.array_equal(again.test.x.numpy(), s.test.x.numpy())
    other = load_dataset(f"folder:{tmp_path / 'pets'}?seed=3,size=16,channels=1")
    assert other.train.x.shape[1:] == (1, 16, 16)
    assert (tmp_path / "pets" / "antibackdoor-cache-folder.npz").is_file()


def test_folder_grey_and_non_square(tmp_path):
    make_folder(tmp_path / "grey", n=4, mode="L")
    assert load_dataset(f"folder:{tmp_path / 'grey'}").train.x.shape[1] == 1
    wide = tmp_path / "wide"
    for c in ("a", "b"):
        (wide / c).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (48, 24), (k * 50, 0, 0)).save(wide / c / f"{k}.jpg")
    assert load_dataset(f"folder:{wide}").train.x.shape[1:] == (3, 32, 32)


def test_folder_train_test_layout(tmp_path):
    make_folder(tmp_path / "d" / "train", n=3)
    make_folder(tmp_path / "d" / "test", n=2)
    s = load_dataset(f"folder:{tmp_path / 'd'}")
    assert len(s.train) == 10 and len(s.test) == 7 and s.test.classes == ["cat", "dog", "emu"]
    (tmp_path / "d" / "test" / "yak").mkdir()
    with pytest.raises(DataError, match="yak"):
        load_dataset(f"folder:{tmp_path / 'd'}")


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_dataset(f"folder:{tmp_path / 'absent'}")
    make_folder(tmp_path / "p", n=3)
    with pytest.raises(ConfigError, match="unknown option"):
        load_dataset(f"folder:{tmp_path / 'p'}?colour=1")
    (tmp_path / "p" / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images"):
        load_dataset(f"folder:{tmp_path / 'p'}")
    (tmp_path / "p" / "empty").rmdir()
    (tmp_path / "p" / "dog" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="dog/001.png"):
        load_dataset(f"folder:{tmp_path / 'p'}")
