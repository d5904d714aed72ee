"""Hostile and careless data: files outside the data's folder (CSV paths, links), the one data rule of run and
defend, npz files that lie about their size or inflate past memory, and triggers that do not fit the images.

Each case ends in one line naming the file or option (exit code 2 through the CLI), never a traceback, a crash
or a silently used file."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npformat
from PIL import Image

from antibackdoor.attacks.base import get_attack
from antibackdoor.cli import main
from antibackdoor.data import load_dataset
from antibackdoor.data.safe_npz import open_npz, read_npy
from antibackdoor.data.userdata import conform, load_user_data
from antibackdoor.errors import ConfigError, DataError

needs_links = pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="POSIX links")


def make_folder(root: Path, classes=("ant", "bee"), n: int = 3) -> Path:
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for k in range(n):
            Image.new("RGB", (8, 8), (40 * i + 10 * k, 0, 0)).save(root / c / f"{k}.png")
    return root


@pytest.fixture()
def outside(tmp_path) -> Path:
    """An image beside the data folder, which no dataset may pull in."""
    p = tmp_path / "private.png"
    Image.new("RGB", (8, 8), (250, 250, 250)).save(p)
    return p


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if not ln.startswith("[antibackdoor]")]
    assert len(lines) == 1 and lines[0].startswith("antibackdoor: error: ") and "Traceback" not in err, err
    return lines[0]


# -- files outside the data's folder ------------------------------------------------------------------------
def test_labels_csv_may_not_name_files_outside_the_folder(tmp_path, outside):
    root = make_folder(tmp_path / "d")
    other = tmp_path / "other.png"
    Image.new("RGB", (8, 8), (250, 250, 250)).save(other)
    rows = ["file,label", "ant/0.png,ant", "bee/0.png,bee", "../private.png,ant", f"{other},bee",
            "ant/1.png,ant", "bee/1.png,bee"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    spec = f"folder:{root}?labels=labels.csv"
    with pytest.raises(DataError, match=r"named on labels.csv line 4 resolves to .*private.png, outside") as exc:
        load_user_data(spec)
    assert "\n" not in str(exc.value) and "--skip-bad-files" in str(exc.value)
    rows.remove("../private.png,ant")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"named on labels.csv line 4 is an absolute path"):
        load_user_data(spec)
    # skipped: listed with their CSV index, and never a sample
    rows.insert(3, "../private.png,ant")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    data = load_user_data(spec, skip_bad=True)
    assert sorted(data.sources) == ["ant/0.png", "ant/1.png", "bee/0.png", "bee/1.png"]
    assert {b.path: b.index for b in data.bad} == {"../private.png": 2, str(other): 3}
    assert data.num_indexed == 6 and len(data.train) == 4
    assert not (data.train.x == 250).all(dim=(1, 2, 3)).any()  # the outside image's pixels are nowhere
    # a path that climbs out and back in is inside, and fine
    (root / "labels.csv").write_text("file,label\nant/../ant/0.png,ant\nbee/0.png,bee\n")
    assert len(load_user_data(spec).train) == 2


@needs_links
def test_links_leading_outside_the_folder_are_refused_and_broken_ones_listed(tmp_path, outside):
    root = make_folder(tmp_path / "d")
    os.symlink(outside, root / "ant" / "link.png")
    with pytest.raises(DataError, match=r"ant/link.png: a link to .*private.png, outside .*--skip-bad-files"):
        load_user_data(f"folder:{root}")
    os.symlink(tmp_path / "gone.png", root / "bee" / "broken.png")
    os.symlink(root / "ant" / "0.png", root / "bee" / "inside.png")  # a link inside PATH is a sample
    os.symlink(tmp_path, root / "ant" / "up")  # a linked folder outside PATH: refused too
    data = load_user_data(f"folder:{root}", skip_bad=True)
    reasons = {b.path: b.reason for b in data.bad}
    assert set(reasons) == {"ant/link.png", "ant/up", "bee/broken.png"}
    assert "a broken link" in reasons["bee/broken.png"] and "outside" in reasons["ant/up"]
    assert "bee/inside.png" in data.sources and "ant/link.png" not in data.sources
    # the skipped image files keep their index (the position among the image files), so later ones do not shift
    assert {b.path: b.index for b in data.bad}["ant/link.png"] == 3
    assert data.index[data.sources.index("bee/0.png")] == 4  # after ant's 0, 1, 2 and link.png


@needs_links
def test_a_class_folder_linked_from_outside_is_refused(tmp_path):
    elsewhere = make_folder(tmp_path / "elsewhere", classes=("cow",))
    root = make_folder(tmp_path / "d")
    os.symlink(elsewhere / "cow", root / "cow")
    with pytest.raises(DataError, match=r"d/cow: resolves to .*elsewhere/cow through a link, outside"):
        load_user_data(f"folder:{root}")
    with pytest.raises(DataError, match=r"d/cow: resolves to .*elsewhere/cow through a link, outside"):
        load_dataset(f"folder:{root}")


@needs_links
def test_runs_folder_loader_refuses_links_outside_and_broken_ones(tmp_path, outside):
    root = make_folder(tmp_path / "d", n=5)
    os.symlink(root / "ant" / "0.png", root / "bee" / "inside.png")
    assert len(load_dataset(f"folder:{root}").train) + len(load_dataset(f"folder:{root}").test) == 11
    os.symlink(outside, root / "ant" / "link.png")
    with pytest.raises(DataError, match=r"ant/link.png: a link to .*private.png, outside"):
        load_dataset(f"folder:{root}")
    os.remove(root / "ant" / "link.png")
    os.symlink(root / "nowhere.png", root / "ant" / "broken.png")
    with pytest.raises(DataError, match=r"ant/broken.png: a broken link"):
        load_dataset(f"folder:{root}")


def test_a_forged_cache_cannot_name_files_outside_the_folder(tmp_path):
    """export-kept copies the sources a cache lists; a cache shipped with the data must not name other files."""
    root = make_folder(tmp_path / "d")
    load_user_data(f"folder:{root}")
    cache = next(root.glob("antibackdoor-cache-defend*.npz"))
    with np.load(cache) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["meta_sources"] = np.array(["../../etc/passwd"] + list(arrays["meta_sources"][1:]))
    with open(cache, "wb") as out:
        np.savez(out, **arrays)
    with pytest.raises(DataError, match=r"cache names \.\./\.\./etc/passwd, outside the folder"):
        load_user_data(f"folder:{root}")


# -- one data rule for run and defend -----------------------------------------------------------------------
def arrays_npz(path: Path, y_train, y_test=None, channels_test: int = 3, **extra) -> Path:
    arrays = {"x_train": np.zeros((len(y_train), 8, 8, 3), np.uint8), "y_train": np.asarray(y_train, np.int64)}
    if y_test is not None:
        shape = (len(y_test), 8, 8, channels_test) if channels_test != 1 else (len(y_test), 8, 8)
        arrays.update(x_test=np.zeros(shape, np.uint8), y_test=np.asarray(y_test, np.int64))
    np.savez(path, **arrays, **extra)
    return path


RULES = {
    "no training sample": (dict(y_train=[], y_test=[0, 1, 2, 0]), r"y_train has no samples"),
    "a class with no sample": (dict(y_train=[0, 2, 0, 2], y_test=[0, 2]),
                               r"y_train has no sample of class 1 \(of 3 classes\)"),
    "test labels the training split lacks": (dict(y_train=[0, 1, 0, 1], y_test=[0, 1, 2]),
                                             r"y_train has no sample of class 2, which y_test has"),
    "one class": (dict(y_train=[0, 0, 0], y_test=[0]), r"only one class \('0'\); a classifier needs at least two"),
    "grey train, RGB test": (dict(y_train=[0, 1, 0, 1], y_test=[0, 1], channels_test=1),
                             r"x_train images are 8x8, 3 channel\(s\) but x_test images are 8x8, 1 channel"),
}


@pytest.mark.parametrize("case", list(RULES))
def test_run_and_defend_apply_the_same_data_rules(tmp_path, capsys, case):
    kwargs, message = RULES[case]
    path = arrays_npz(tmp_path / "x.npz", **kwargs)
    for load in (lambda: load_dataset(f"npz:{path}"), lambda: load_user_data(f"npz:{path}")):
        with pytest.raises(DataError, match=message) as exc:
            load()
        assert str(exc.value).startswith(f"npz:{path}: ")
    out = tmp_path / "runs"
    assert main(["defend", f"npz:{path}", "--out", str(out)]) == 2
    assert message.split("\\")[0] in one_error_line(capsys.readouterr().err)
    assert main(["run", "--dataset", f"npz:{path}", "--out", str(out)]) == 2
    assert message.split("\\")[0] in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_class_named_but_without_sample_is_refused_by_defend(tmp_path):
    path = arrays_npz(tmp_path / "x.npz", y_train=[0, 1, 0, 1], classes=np.array(["cat", "dog", "emu"]))
    with pytest.raises(DataError, match=r"y_train has no sample of class 'emu' \(label 2\)"):
        load_user_data(f"npz:{path}")
    # --test and --trusted data may lack classes, but not be empty
    assert load_user_data(f"npz:{path}", role="--trusted").train.class_counts().tolist() == [2, 2, 0]
    data = load_user_data(f"npz:{arrays_npz(tmp_path / 'ok.npz', y_train=[0, 1, 2])}")
    for role in ("--trusted", "--test"):
        with pytest.raises(DataError, match=rf"^{role} npz:.*empty.npz: no samples"):
            load_user_data(f"npz:{arrays_npz(tmp_path / 'empty.npz', y_train=[])}", role=role)
    # trusted data is the training part: a file with test samples only has none to give
    test_only = arrays_npz(tmp_path / "test-only.npz", y_train=[], y_test=[0, 1])
    with pytest.raises(DataError, match=r"^--trusted npz:.*test-only.npz: no samples"):
        conform(load_user_data(f"npz:{test_only}", role="--trusted"), data.train, "--trusted", use_test=False)


def test_runs_folder_loader_refuses_one_class(tmp_path):
    root = make_folder(tmp_path / "d", classes=("ant",), n=4)
    with pytest.raises(DataError, match=r"only one class \('ant'\)"):
        load_dataset(f"folder:{root}")


# -- npz files that lie or inflate --------------------------------------------------------------------------
def npy_header(shape, dtype="|u1") -> bytes:
    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def header_bomb(path: Path) -> Path:
    """x_train's header declares 100,000,000 x 32 x 32 x 3 bytes; its entry holds 100."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x_train.npy", npy_header((100_000_000, 32, 32, 3)) + bytes(100))
        z.writestr("y_train.npy", npy_bytes(np.zeros(4, np.int64)))
        z.writestr("x_test.npy", npy_bytes(np.zeros((2, 32, 32, 3), np.uint8)))
        z.writestr("y_test.npy", npy_bytes(np.zeros(2, np.int64)))
    return path


def zip_bomb(path: Path, n: int = 500_000) -> Path:
    """A valid npz whose deflated x_train (n x 32 x 32 x 3 zeros, 1.5 GB for the default n) takes ~1.5 MB.

    Written by hand: after a full flush deflate restarts from scratch, so every 16 MiB run of zeros compresses
    to the same bytes, and the entry is that block repeated (no gigabytes are compressed here)."""
    header = npy_header((n, 32, 32, 3))
    total = n * 32 * 32 * 3
    chunk = 1 << 24
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(chunk)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH) == block  # the state really restarts
    k, rest = divmod(total - 2 * chunk, chunk)
    tail = c.compress(bytes(rest)) + c.flush()
    data = head + block * (k + 2) + tail
    crc = zlib.crc32(header)
    for _ in range(k + 2):
        crc = zlib.crc32(zeros, crc)
    crc = zlib.crc32(bytes(rest), crc)
    assert len(zlib.decompressobj(-15).decompress(data, 1 << 20)) == 1 << 20  # a real deflate stream
    name = b"x_train.npy"
    size = len(header) + total
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), size, len(name), 0) + name
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), size, len(name),
                          0, 0, 0, 0, 0, 0) + name
    with open(path, "wb") as f:
        f.write(local + data)
        offset = f.tell()
        f.write(central)
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), offset, 0))
    with zipfile.ZipFile(path, "a") as z:  # the other arrays, small and honest
        z.writestr("y_train.npy", npy_bytes(np.zeros(n, np.uint8)))
        z.writestr("x_test.npy", npy_bytes(np.zeros((2, 32, 32, 3), np.uint8)))
        z.writestr("y_test.npy", npy_bytes(np.zeros(2, np.int64)))
    with zipfile.ZipFile(path) as z:  # what the zip declares: a 1.5 GB entry, ~1000x its compressed size
        info = z.getinfo("x_train.npy")
        assert info.file_size == size and info.compress_size == len(data) < size / 900
    return path


LIMITED = textwrap.dedent("""
    import resource, sys
    from antibackdoor.cli import main
    with open("/proc/self/status") as f:
        used = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:"))
    # this process may map 768 MiB more than it has now: a ceiling the test sets for itself
    resource.setrlimit(resource.RLIMIT_AS, (used + (768 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
    sys.exit(main(sys.argv[1:]))
""")


def limited_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, ANTIBACKDOOR_PROGRESS="0", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", LIMITED, *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
@pytest.mark.parametrize("bomb", ["zip", "header"])
def test_npz_bombs_are_refused_under_a_memory_ceiling(tmp_path, bomb):
    path = zip_bomb(tmp_path / "zip.npz") if bomb == "zip" else header_bomb(tmp_path / "header.npz")
    expect = "of memory available; refused before reading" if bomb == "zip" else "declares more than its entry can hold"
    for command in (["defend", f"npz:{path}"], ["run", "--dataset", f"npz:{path}"]):
        done = limited_cli([*command, "--out", str(tmp_path / "runs")])
        assert done.returncode == 2, done.stderr[-2000:]
        line = one_error_line(done.stderr)
        assert line.startswith(f"antibackdoor: error: {path}: x_train (") and expect in line
    assert not (tmp_path / "runs").exists()


def test_not_an_npz_says_so(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("x_train,y_train\n1,2\n")
    with pytest.raises(DataError, match=r"notes.npz: not an npz file \(not a zip archive") as exc:
        load_dataset(f"npz:{text}")
    assert "allow_pickle" not in str(exc.value)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.npz: not an npz file \(empty"):
        load_user_data(f"npz:{empty}")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(arrays_npz(tmp_path / "whole.npz", y_train=[0, 1]).read_bytes()[:300])
    with pytest.raises(DataError, match=r"cut.npz: not a readable npz file \(a truncated or damaged zip archive\)"):
        load_dataset(f"npz:{cut}")
    single = tmp_path / "single.npz"
    single.write_bytes(npy_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match=r"single.npz: a single .npy array, not an npz file"):
        load_user_data(f"npz:{single}")


def test_object_arrays_are_refused_before_unpickling(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x_train=np.zeros((4, 8, 8, 3), np.uint8), y_train=np.array([0, 1, 0, {"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"obj.npz: y_train: holds Python objects \(dtype object\); refused"):
        load_user_data(f"npz:{path}")


def test_npy_reader_for_poison_masks(tmp_path):
    good = tmp_path / "mask.npy"
    np.save(good, np.array([True, False, True]))
    assert read_npy(good).tolist() == [True, False, True]
    lie = tmp_path / "lie.npy"
    lie.write_bytes(npy_header((10**12,), "|b1") + bytes(3))
    with pytest.raises(DataError, match=r"lie.npy: an array of 1000000000000 bool, .* declared, but the file holds 3"):
        read_npy(lie)
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([1, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj.npy: holds Python objects"):
        read_npy(obj)
    text = tmp_path / "t.npy"
    text.write_text("1\n2\n")
    with pytest.raises(DataError, match=r"t.npy: not an npy array \(no npy header\)"):
        read_npy(text)


def test_safe_reader_reads_what_numpy_wrote(tmp_path):
    path = tmp_path / "ok.npz"
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez_compressed(path, x_train=x, names=np.array(["a", "b"]))
    with open_npz(path) as f:
        assert f.files == ["x_train", "names"] and f.headers["x_train"].nbytes == x.nbytes
        got = f.read(["x_train", "names", "absent"])
    assert np.array_equal(got["x_train"], x) and got["names"].tolist() == ["a", "b"] and "absent" not in got


# -- triggers that do not fit, patterns that are not images --------------------------------------------------
@pytest.mark.parametrize("attack, params, key", [
    ("badnets", {"size": 40}, "size"),
    ("badnets", {"size": 3, "margin": 30}, "margin"),
    ("trojan", {"size": 33}, "size"),
    ("pixels", {"row": 40, "col": 0}, "row"),
])
def test_a_trigger_that_does_not_fit_the_images_names_its_key(mini, attack, params, key):
    a = get_attack(attack, **params)
    with pytest.raises(ConfigError, match=rf"^--attack-param {key}: .*does not fit in 32x32 images"):
        a.check(mini.train, 0.1, 0)


def test_run_stops_on_a_trigger_too_large_before_the_run_directory(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["run", "--dataset", "cifar10-mini", "--attack", "badnets", "--attack-param", "size=40",
                 "--out", str(out)])
    assert code == 2 and "--attack-param size: a 40x40 patch does not fit in 32x32 images" in one_error_line(
        capsys.readouterr().err)
    assert not out.exists()


def test_blend_pattern_file_must_be_an_image(tmp_path):
    text = tmp_path / "pattern.png"
    text.write_text("not an image")
    with pytest.raises(ConfigError, match=r"--attack-param pattern_file: .*pattern.png: cannot decode image"):
        get_attack("blend", pattern_file=str(text))
    Image.new("RGB", (5, 7), (1, 2, 3)).save(text)
    assert get_attack("blend", pattern_file=str(text)).params.pattern_file == str(text)
