"""defend's data intake: a real folder's defects (each a one-line error naming the file, or skipped and listed),
conversions, labels from a CSV, poison masks, and the parallel decoder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from antibackdoor.cli import main
from antibackdoor.data import images as images_mod
from antibackdoor.data.userdata import load_user_data
from antibackdoor.errors import DataError

COLOURS = {"ant": (200, 30, 30), "bee": (30, 200, 30), "cow": (30, 30, 200)}


def make_folder(root, n=4, size=12):
    """Three classes of flat-coloured RGB PNGs (colour = class)."""
    for c, rgb in COLOURS.items():
        (root / c).mkdir(parents=True)
        for k in range(n):
            Image.new("RGB", (size, size), tuple(min(255, v + 5 * k) for v in rgb)).save(root / c / f"{k}.png")
    return root


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DEFECTS = {
    "truncated": (lambda r: truncate(r / "ant" / "1.png"), "ant/1.png", "cannot"),
    "not-an-image-content": (lambda r: (r / "bee" / "2.png").write_text("<html>not a png</html>"), "bee/2.png",
                             "cannot read image"),
    "non-image-file": (lambda r: (r / "cow" / "notes.txt").write_text("hello"), "cow/notes.txt",
                       "not an image file"),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_is_one_line_naming_the_file(tmp_path, defect):
    root = make_folder(tmp_path / "d")
    make, name, message = DEFECTS[defect]
    make(root)
    with pytest.raises(DataError) as exc:
        load_user_data(f"folder:{root}")
    text = str(exc.value)
    assert str(root / name) in text and message in text and "\n" not in text
    assert "--skip-bad-files" in text


def test_csv_label_naming_a_missing_file(tmp_path):
    root = make_folder(tmp_path / "d")
    rows = ["file,label"] + [f"{c}/{k}.png,{c}" for c in COLOURS for k in range(4)] + ["ant/gone.png,ant"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"ant/gone.png: named on labels.csv line 14 but missing.*skip-bad-files"):
        load_user_data(f"folder:{root}?labels=labels.csv")
    data = load_user_data(f"folder:{root}?labels=labels.csv", skip_bad=True)
    assert [b.path for b in data.bad] == ["ant/gone.png"] and data.bad[0].index == 12
    assert len(data.train) == 12 and data.num_indexed == 13


def test_one_class_only_is_an_error_even_when_skipping(tmp_path):
    root = tmp_path / "one"
    (root / "ant").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "ant" / "a.png")
    for skip in (False, True):
        with pytest.raises(DataError, match="only one class"):
            load_user_data(f"folder:{root}", skip_bad=skip)
    # two classes, but all of one are unreadable: skipping leaves one class -> an error, not a 1-class model
    (root / "bee").mkdir()
    (root / "bee" / "b.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"images of 1 class\(es\) left \(ant\)"):
        load_user_data(f"folder:{root}", skip_bad=True)


def test_an_empty_class_is_an_error_even_when_skipping(tmp_path):
    """run's data rule: a class with no training sample cannot be learned; the class list never changes silently,
    so the class is named, not dropped, with or without --skip-bad-files."""
    root = make_folder(tmp_path / "d")
    (root / "dog").mkdir()
    for skip in (False, True):
        with pytest.raises(DataError, match=r"d/dog: empty class folder \(no images\); a classifier needs a "
                                            r"training sample of every class"):
            load_user_data(f"folder:{root}", skip_bad=skip)
    # every file of a class skipped as bad: the same rule, after decoding
    (root / "dog" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"no usable image of class 'dog' \(label 3\) is left after skipping"):
        load_user_data(f"folder:{root}", skip_bad=True)
    # as --trusted data (which may lack classes) an emptied class stays in the class list, named in the notes
    trusted = load_user_data(f"folder:{root}", skip_bad=True, role="--trusted")
    assert trusted.train.class_counts().tolist() == [4, 4, 4, 0]
    assert any("'dog' has no usable images" in n for n in trusted.notes)


def test_skip_bad_files_lists_every_defect_and_keeps_the_class_list(tmp_path):
    root = make_folder(tmp_path / "d")
    for make, _, _ in DEFECTS.values():
        make(root)
    data = load_user_data(f"folder:{root}", skip_bad=True)
    assert data.train.classes == ["ant", "bee", "cow"]
    assert data.train.class_counts().tolist() == [3, 3, 4]
    assert sorted(b.path for b in data.bad) == ["ant/1.png", "bee/2.png", "cow/notes.txt"]
    # indices: position among the image files; the skipped images keep theirs, so later files do not shift
    by_file = dict(zip(data.sources, data.index.tolist(), strict=True))
    assert by_file["ant/0.png"] == 0 and by_file["ant/2.png"] == 2 and by_file["bee/3.png"] == 7
    assert data.num_indexed == 12
    # pixels belong to the right class and file
    for x, y, s in zip(data.train.x, data.train.y, data.sources, strict=True):
        assert data.train.classes[int(y)] == s.split("/")[0]
        assert int(x[:, 5, 5].argmax()) == int(np.argmax(COLOURS[s.split("/")[0]]))
    # cached: the second load reads the .npz beside the data and says the same
    again = load_user_data(f"folder:{root}", skip_bad=True)
    assert [b.path for b in again.bad] == [b.path for b in data.bad] and again.sources == data.sources
    assert any(p.name.startswith("antibackdoor-cache-defend") for p in root.iterdir())


def test_modes_and_sizes_are_converted_and_noted(tmp_path):
    root = make_folder(tmp_path / "d")
    Image.new("L", (12, 12), 90).save(root / "ant" / "grey.png")
    Image.new("RGBA", (12, 12), (10, 20, 30, 0)).save(root / "bee" / "alpha.png")
    Image.fromarray(np.full((12, 12), 40000, np.uint16)).save(root / "cow" / "deep.png")  # 16-bit grey
    Image.new("P", (12, 12), 3).save(root / "cow" / "palette.png")
    Image.new("RGB", (30, 18), (1, 2, 3)).save(root / "ant" / "wide.jpg")
    data = load_user_data(f"folder:{root}")
    assert data.train.x.shape[1:] == (3, 12, 12) and not data.bad
    pix = {s: data.train.x[i, :, 6, 6].tolist() for i, s in enumerate(data.sources)}
    assert pix["ant/grey.png"] == [90, 90, 90]
    assert pix["bee/alpha.png"] == [10, 20, 30]
    assert pix["cow/deep.png"] == [156, 156, 156]  # 40000 / 257, not clipped to 255
    notes = " ".join(data.notes)
    assert "1 I;16 (16-bit, scaled to 8)" in notes and "1 L" in notes and "1 RGBA (alpha dropped)" in notes
    assert "resized to 12x12: 1 image(s) of other sizes (30x18: 1); 1 not square" in notes


def test_train_test_layout_and_npz(tmp_path, tiny_npz):
    make_folder(tmp_path / "tt" / "train")
    make_folder(tmp_path / "tt" / "test", n=2)
    data = load_user_data(f"folder:{tmp_path / 'tt'}")
    assert len(data.train) == 12 and len(data.test) == 6
    assert data.sources[0] == "train/ant/0.png"
    npz = load_user_data(f"npz:{tiny_npz}")
    assert len(npz.train) == 240 and len(npz.test) == 60 and npz.sources is None
    only_train = tmp_path / "x.npz"
    np.savez(only_train, x_train=np.zeros((6, 8, 8, 3), np.uint8), y_train=np.arange(6) % 2,
             classes=np.array(["no", "yes"]))
    d = load_user_data(f"npz:{only_train}")
    assert d.test is None and d.train.classes == ["no", "yes"]


def test_parallel_decoding_matches_serial_and_collects_errors(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", n=30)
    truncate(root / "bee" / "7.png")
    paths = sorted(root.rglob("*.png"))
    monkeypatch.setattr(images_mod, "PARALLEL_MIN", 0)
    monkeypatch.setattr(images_mod, "CHUNK", 7)
    monkeypatch.setenv("ANTIBACKDOOR_DECODE_WORKERS", "2")
    par, errors = images_mod.decode_images_lenient(paths, 12, 3)
    monkeypatch.setenv("ANTIBACKDOOR_DECODE_WORKERS", "1")
    ser, errors1 = images_mod.decode_images_lenient(paths, 12, 3)
    bad = paths.index(root / "bee" / "7.png")
    assert set(errors) == set(errors1) == {bad}
    good = [i for i in range(len(paths)) if i != bad]
    assert np.array_equal(par[good], ser[good])
    with pytest.raises(DataError, match="bee/7.png"):
        images_mod.decode_images(paths, 12, 3)


def test_cli_bad_folder_exits_2_with_one_line(tmp_path, capsys):
    root = make_folder(tmp_path / "d")
    truncate(root / "cow" / "3.png")
    code = main(["defend", f"folder:{root}", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if not ln.startswith("[antibackdoor]")]
    assert lines == [f"antibackdoor: error: {root / 'cow' / '3.png'}: " + lines[0].split("3.png: ", 1)[1]]
    assert "Traceback" not in err and not (tmp_path / "runs").exists()  # nothing half-written
