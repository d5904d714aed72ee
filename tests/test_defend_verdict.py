"""``defend``'s verdict and report where they could mislead: no score means no verdict (a score-less defense
on data stored class by class read as a backdoor in the first class), a target whose rivals have no sample at
the top, an extreme split, long file names in the grid, and a --poison-mask file whose contents are never
quoted back."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_defend import parse, run_dir_of

from antibackdoor.cli import main
from antibackdoor.defend.analysis import LOW_KEPT_SHARE, split_warnings, why_unranked
from antibackdoor.defend.report import CAPTION_CHARS, short_name, verdict
from antibackdoor.defenses.a_abl import AABL
from antibackdoor.surplus import class_surplus

CLASSES = ("cat", "dog", "emu")
LONG = "a_photo_from_the_scraped_archive_with_a_very_long_name_and_no_spaces"


def class_folder(root: Path, per_class: int = 12) -> Path:
    """Noise images stored class by class (as every folder is), with long file names."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{LONG}_{k:03d}.png")
    return root


BASE = ["--model", "cnn-small", "--ra-samples", "2"]
#: the tests of A-ABL's verdicts name it (defend's default is a-abl-pdb)
A_ABL = ["--defense", "a-abl", *BASE]


class Captions(HTMLParser):
    """The file-name spans of the grid's captions: (shown text, title)."""

    def __init__(self):
        super().__init__()
        self.spans: list[list[str]] = []
        self._in = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and a.get("class") == "file":
            self.spans.append(["", a.get("title", "")])
            self._in = True

    def handle_endtag(self, tag):
        if tag == "span":
            self._in = False

    def handle_data(self, data):
        if self._in:
            self.spans[-1][0] += data


def test_a_defense_without_scores_gives_no_verdict(tmp_path, capsys):
    """Defense none ranks nothing: its index order put the first class at the top, and the surplus test
    called it a backdoor target (p 1e-18 on clean data)."""
    root = class_folder(tmp_path / "data")
    out = tmp_path / "runs"
    assert main(["defend", f"folder:{root}", "--defense", "none", "--defense-param", "train.epochs=1", *BASE,
                 "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    run_dir = run_dir_of(out)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["surplus"] is None
    assert m["verdict"] == {"kind": "unranked", "title": "No verdict: the samples have no ranking to test",
                            "unranked": "none gives no per-sample score"}
    page = parse(run_dir / "report.html")
    assert "No verdict" in page.of("verdict") and "suspected" not in page.of("verdict").lower()
    assert "says nothing about whether the data carries a backdoor" in page.of("verdict")
    assert [r[0] for r in page.rows["class-table"]] == ["class", *CLASSES]  # counts, no test columns
    assert len(page.rows["class-table"][0]) == 4
    verdict_line = next(ln for ln in summary.splitlines() if ln.strip().startswith("verdict"))
    assert "none: none gives no per-sample score, so there is no ranking to test" in verdict_line
    md = (run_dir / "report.md").read_text()
    assert "Backdoor suspected" not in md and "The first 32 samples (no ranking)" in md
    assert not (run_dir / "isolated_per_class.png").exists()
    # the grid's captions show long file names shortened (the whole name as the tooltip); report.md lists them
    captions = Captions()
    captions.feed((run_dir / "report.html").read_text(encoding="utf-8"))
    assert len(captions.spans) == 32
    for shown, full in captions.spans:
        assert full.startswith(CLASSES) and LONG in full and len(full) > CAPTION_CHARS
        assert len(shown) <= CAPTION_CHARS and shown == short_name(full) and shown[-7:] == full[-7:]
    assert f"/{LONG}_000.png |" in md


def test_equal_scores_are_no_ranking_either():
    assert why_unranked(None, "none") == "none gives no per-sample score"
    assert why_unranked(np.full(5, 0.3), "x") == "x gave every sample the same score"
    assert why_unranked(np.array([np.nan, 1.0, np.inf]), "x") == "x gave every sample the same score"
    assert why_unranked(np.array([0.1, 0.2]), "x") == ""


def test_a_target_without_rivals_at_the_top_reads_without_infinities():
    """The top 30 of the ranking are all class 0: the other classes' rate there is zero, and the verdict
    printed '0 (infx)'."""
    y = np.repeat(np.arange(3), 100)
    order = np.arange(300)
    isolated = np.zeros(300, bool)
    isolated[:30] = True
    s = class_surplus(y, order, isolated, list(CLASSES))
    assert s.target == 0 and s.rows[0].expected == 0
    v = verdict(s, "a-abl", 30, 300)
    assert v["kind"] == "target" and "inf" not in v["text"]
    assert "no sample of another class is among them" in v["text"]


def test_no_ranking_gives_no_verdict_whatever_was_isolated():
    v = verdict(None, "x", 7, 100, "x gives no per-sample score")
    assert v["kind"] == "unranked" and v["text"].startswith("x gives no per-sample score, so there is no order")
    assert "isolated 7 of the 100 samples" in v["text"]


def test_split_warnings_name_an_extreme_split():
    y = np.repeat(np.arange(3), 10)
    left_out = np.ones(30, bool)
    left_out[:2] = False  # two samples of class 0 kept: 6.7 %
    (share, classes) = split_warnings(left_out, y, list(CLASSES), "a-abl")
    assert share.startswith("a-abl kept only 2 of the 30 inspected samples (6.7 %) as given")
    assert "kept no sample of classes 'dog', 'emu' as given" in classes
    kept_enough = np.zeros(30, bool)
    kept_enough[: int(30 * (1 - LOW_KEPT_SHARE))] = True  # 22 of 30 left out: 26.7 % kept, every class kept
    kept_enough[[0, 10]] = False
    assert split_warnings(kept_enough, y, list(CLASSES), "a-abl") == []


def keep_three(self, model, d, ctx) -> torch.Tensor:
    """A-ABL split scores that keep three samples of the first class (high SCE) and isolate every other."""
    s = torch.full((len(d),), 0.01) + 0.001 * (torch.arange(len(d)) % 5)
    s[torch.nonzero(d.y.cpu() == 0).flatten()[:3]] = 5.0
    return s


def test_an_extreme_split_is_a_warning_in_the_report_and_the_summary(tmp_path, monkeypatch, capsys):
    root = class_folder(tmp_path / "data")
    out = tmp_path / "runs"
    monkeypatch.setattr(AABL, "split_scores", keep_three)
    assert main(["defend", f"folder:{root}", *A_ABL, "--defense-param", "naive.epochs=1", "--defense-param",
                 "final.epochs=1", "--defense-param", "final.adversary.steps=1", "--holdout", "0",
                 "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    run_dir = run_dir_of(out)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["kept"] == 3 and len(m["warnings"]) == 2
    assert m["warnings"][0].startswith("a-abl kept only 3 of the 36 inspected samples (8.3 %) as given")
    warning_rows = [ln.strip() for ln in summary.splitlines() if ln.strip().startswith("warning")]
    assert len(warning_rows) == 2 and "kept only 3 of the 36" in warning_rows[0]
    assert "kept no sample of classes 'dog', 'emu'" in warning_rows[1]
    page = parse(run_dir / "report.html")
    assert "kept only 3 of the 36" in page.of("warnings") and "'dog', 'emu'" in page.of("warnings")
    assert "**Warning:** a-abl kept only 3 of the 36" in (run_dir / "report.md").read_text()


# -- --poison-mask: errors never quote the file ------------------------------------------------------------------
SECRET = "root:x:0:0:Zq7-secret-line"


@pytest.mark.parametrize("name, content, message", [
    ("passwd", f"{SECRET}\nbin:x:1:1\n".encode(), "passwd: line 1 is not a sample index"),
    ("mask.npy", f"{SECRET}\n".encode(), "mask.npy: not an npy array (no npy header)"),
    ("binary", b"\x00\xff\xfe" + SECRET.encode(), "binary: not a .npy array nor a UTF-8 text file"),
])
def test_poison_mask_errors_do_not_quote_the_file(tmp_path, tiny_npz, capsys, name, content, message):
    mask = tmp_path / name
    mask.write_bytes(content)
    out = tmp_path / "runs"
    assert main(["defend", f"npz:{tiny_npz}", "--poison-mask", str(mask), "--out", str(out), *BASE]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if not ln.startswith("[antibackdoor]")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert "Zq7" not in err and "pickle" not in err  # nor numpy's advice to load a stranger's file unsafely
    assert not out.exists()


def test_poison_mask_file_names_unknown_to_a_folder_are_named_by_line(tmp_path, capsys):
    root = class_folder(tmp_path / "data", per_class=3)
    mask = tmp_path / "poison.txt"
    mask.write_text(f"cat/{LONG}_000.png\n{SECRET}\n")
    assert main(["defend", f"folder:{root}", "--poison-mask", str(mask), "--out", str(tmp_path / "r"), *BASE]) == 2
    err = capsys.readouterr().err
    assert f"{mask}: line 2 names no sample of folder:{root} (1 of 2 lines name none" in err
    assert "Zq7" not in err
