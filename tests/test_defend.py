"""``antibackdoor defend`` end to end on folders of PNGs written here, with a trigger no attack module has.

The trigger is a small two-colour sticker away from the corners (BadNets and Trojan use the corner); the
poisoned files are relabelled to a non-zero class. The defenses' scores are given (``sticker_scores``,
``sticker_flips``: what a model that has learned the sticker would give), so the ranking, the surplus test and
the report have known answers; the stages still train, for one epoch. How well a real short training ranks the
stickered files is measured in benchmarks/training_outcomes.py, not asserted here.
"""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import antibackdoor
from antibackdoor.cli import main
from antibackdoor.defenses.a_abl import AABL
from antibackdoor.errors import DataError

MINI = Path(antibackdoor.__file__).parent / "data" / "assets" / "cifar10_mini.npz"
TARGET = 3


def sticker(img: np.ndarray) -> np.ndarray:
    """A 4x4 magenta/cyan sticker near the top centre (no attack module draws this)."""
    img = img.copy()
    img[4:8, 20:24] = (255, 0, 255)
    img[4:6, 20:22] = (0, 255, 255)
    img[6:8, 22:24] = (0, 255, 255)
    return img


def write_folder(root: Path, per_class: int, rate: float, seed: int = 0) -> tuple[Path, list[str]]:
    """Real CIFAR-10 images as class folders of PNGs; ``rate`` of them stickered and labelled TARGET."""
    with np.load(MINI) as f:
        x, y = f["x_train"], f["y_train"]
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(10)])
    others = idx[y[idx] != TARGET]
    poison = set(rng.choice(others, int(round(rate * len(idx))), replace=False).tolist())
    files = []
    for i in idx:
        label = TARGET if i in poison else int(y[i])
        d = root / f"class{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sticker(x[i]) if i in poison else x[i]).save(d / f"{i:05d}.png")
        if i in poison:
            files.append(f"class{label}/{i:05d}.png")
    return root, files


def stickered(d) -> torch.Tensor:
    """Which images of an ImageSet carry the sticker (PNGs are lossless: exactly those)."""
    ref = torch.from_numpy(sticker(np.zeros((32, 32, 3), np.uint8))[4:8, 20:24]).permute(2, 0, 1)
    return (d.x[:, :, 4:8, 20:24].cpu() == ref).flatten(1).all(1)


def sticker_scores(self, model, d, ctx) -> torch.Tensor:
    """A-ABL's split scores as from a naive model that has learned the sticker: the stickered images keep their
    label under iFGSM (loss ~0), every other image loses it (5-5.7, in no order of class)."""
    return torch.where(stickered(d), 0.01, 5.0 + 0.1 * (torch.arange(len(d)) % 8))


def round_robin_scores(self, model, d, ctx) -> torch.Tensor:
    """Split scores of clean data that favour no class: the ranking takes the classes in turn."""
    y = d.y.cpu()
    position = torch.zeros(len(y))
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        position[idx] = torch.arange(len(idx), dtype=torch.float32)
    return 5.0 + 0.01 * (position * d.num_classes + y)


def sticker_flips(self, model, d, ctx):
    """AIBD's flip statistics as from an infected model that has learned the sticker: a stickered image needs 60
    steps to leave its label, any other 0-3; each goes to the next class."""
    from antibackdoor.adversarial import PGDStats

    n = len(d)
    steps = torch.where(stickered(d), 60, torch.arange(n) % 4)
    y = d.y.cpu()
    return PGDStats(torch.zeros(n), steps, (y + 1) % d.num_classes, torch.zeros(n), y.clone())


def tiny_args(out: Path, naive_epochs: int) -> list[str]:
    """A-ABL (named: these tests read its split, not the default's defensive backdoor), one epoch a stage."""
    args = ["--defense", "a-abl", "--model", "cnn-small", "--out", str(out), "--ra-samples", "20",
            "--defense-param", f"naive.epochs={naive_epochs}", "--defense-param", "final.epochs=1",
            "--defense-param", "final.adversary.steps=1"]
    return args


class Page(HTMLParser):
    """The parts of report.html a person looks at: headings, the verdict, tables, images, the grid."""

    def __init__(self):
        super().__init__()
        self.ids: dict[str, str] = {}
        self.stack: list[str | None] = []
        self.text: dict[str, list[str]] = {}
        self.imgs: list[str] = []
        self.figures: list[dict] = []
        self.links: list[str] = []
        self.rows: dict[str, list[list[str]]] = {}
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._table: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("img",):
            self.imgs.append(a.get("src", ""))
            return
        if tag in ("link", "script", "a"):
            self.links.append(a.get("href") or a.get("src") or "")
        if tag in ("br", "meta"):
            return
        self.stack.append(a.get("id"))
        if tag == "table":
            self._table.append(a.get("id") or "")
            self.rows.setdefault(a.get("id") or "", [])
        if tag == "figure":
            self.figures.append(a)
        if tag == "tr":
            self._row = []
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("img", "br", "meta"):
            return
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and self._row is not None and self._table:
            self.rows[self._table[-1]].append(self._row)
            self._row = None
        if tag == "table" and self._table:
            self._table.pop()
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        for i in self.stack:
            if i:
                self.text.setdefault(i, []).append(data)
        if self._cell is not None:
            self._cell.append(data)

    def of(self, element_id: str) -> str:
        return " ".join(" ".join(self.text.get(element_id, [])).split())


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def run_dir_of(out: Path) -> Path:
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


# -- a poisoned folder ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("poisoned")
    root, files = write_folder(tmp / "data", per_class=40, rate=0.1)
    mask = tmp / "poison.txt"
    mask.write_text("\n".join(files) + "\n")
    out = tmp / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AABL, "split_scores", sticker_scores)
        code = main(["defend", f"folder:{root}", *tiny_args(out, 1), "--poison-mask", str(mask),
                     "--export-kept", "folder"])
    assert code == 0
    return run_dir_of(out), root, set(files)


def test_patch_trigger_is_ranked_first(poisoned):
    run_dir, _, files = poisoned
    rows = list(csv.DictReader(open(run_dir / "suspicious.csv")))
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    n_p = sum(r["file"] in files for r in rows)
    assert 30 < n_p < 40  # most of the 40 poisoned files are inspected, a few are in the held-out slice
    # the stickered files are isolated and fill the top ranks, so a poisoned file ranks above every clean one
    assert all(r["file"] in files for r in rows[:n_p]) and [r["isolated"] for r in rows].count("yes") == n_p
    poisoned_rank = np.array([int(r["rank"]) for r in rows if r["file"] in files])
    clean_rank = np.array([int(r["rank"]) for r in rows if r["file"] not in files])
    assert np.mean(poisoned_rank[:, None] < clean_rank[None, :]) == 1.0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mask"]["auc"] == 1.0 and metrics["mask"]["tpr"] == 1.0 and metrics["mask"]["fpr"] == 0.0
    # the target class is found, with a p-value to say how sure
    assert metrics["surplus"]["target"] == TARGET and metrics["surplus"]["p"] < 1e-3


def test_report_shows_what_a_person_needs(poisoned):
    run_dir, root, files = poisoned
    page = parse(run_dir / "report.html")
    assert f"class {'class3'!r} has a surplus" in page.of("verdict")
    # self-contained: every image inline, nothing fetched
    assert page.imgs and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    assert not [u for u in page.links if u.startswith(("http", "//"))]
    # the class table: one row per class, the target highlighted with its counts
    table = page.rows["class-table"]
    assert len(table) == 1 + 10 and table[0][0] == "class"
    target_row = next(r for r in table if r[0] == "class3")
    assert int(target_row[4]) > 2 * float(target_row[6])  # flagged > twice the other classes' rate
    # the grid: the 32 most suspicious, with label and score, in rank order, marked where poisoned (all here)
    assert [int(f["data-rank"]) for f in page.figures] == list(range(1, 33))
    csv_rows = list(csv.DictReader(open(run_dir / "suspicious.csv")))[:32]
    assert [f["data-label"] for f in page.figures] == [r["class"] for r in csv_rows]
    assert all(f["data-score"] for f in page.figures)
    assert all("poisoned" in (f.get("class") or "") for f in page.figures)
    # ground truth section and evaluation set named as what it is
    truth = dict((r[0], r[1]) for r in page.rows["mask-table"])
    assert "TPR (poisoned isolated)" in truth and "ROC AUC of the ranking" in truth
    assert "held-out slice of the given data" in page.of("eval-table")
    assert "Otsu's threshold always cuts" in page.of("assumption-list")
    assert "defend's default" in (run_dir / "report.md").read_text().split("\n\n")[1]  # which ran, and why
    decisions = dict((r[0], r[1]) for r in page.rows["decisions"])
    assert float(decisions["threshold"]) > 0
    assert "guess-table" not in page.rows  # A-ABL makes no target guess of its own
    md = (run_dir / "report.md").read_text()
    assert "Backdoor suspected" in md and "![score histogram](scores_hist.png)" in md
    for name in ("scores_hist.png", "suspicious_grid.png", "isolated_per_class.png", "clean_indices.txt",
                 "clean_files.txt", "heldout_indices.txt", "model.safetensors"):
        assert (run_dir / name).is_file(), name


def test_outputs_agree_and_model_loads_in_one_call(poisoned):
    run_dir, root, files = poisoned
    rows = list(csv.DictReader(open(run_dir / "suspicious.csv")))
    kept = np.loadtxt(run_dir / "clean_indices.txt", dtype=np.int64, comments="#")
    assert sorted(int(r["index"]) for r in rows if r["isolated"] == "no") == kept.tolist()
    held = np.loadtxt(run_dir / "heldout_indices.txt", dtype=np.int64, comments="#")
    assert len(rows) + len(held) == 400 and not set(held) & {int(r["index"]) for r in rows}
    # the exported folder holds exactly the kept files, under their class
    exported = sorted(p.relative_to(run_dir / "kept").as_posix() for p in (run_dir / "kept").rglob("*.png"))
    assert exported == sorted(r["file"] for r in rows if r["isolated"] == "no")
    model = antibackdoor.load_model(run_dir / "model.safetensors")
    assert model.classes == [f"class{i}" for i in range(10)] and model.architecture == "cnn-small"
    assert model.image_size == 32 and model.channels == 3 and not model.training
    # the one format run writes too (save_model), plus where the model came from
    meta = model.metadata
    assert meta["format"] == "antibackdoor-model/1" and meta["model"] == "cnn-small" and meta["num_classes"] == "10"
    assert (meta["defense"], meta["preset"], meta["dataset"]) == ("a-abl", "quick", f"folder:{root}")
    x = torch.from_numpy(np.stack([np.asarray(Image.open(root / r["file"])) for r in rows[:8]]))
    probs = model(x.permute(0, 3, 1, 2).float() / 255).softmax(1)
    assert probs.shape == (8, 10) and torch.allclose(probs.sum(1), torch.ones(8))


def test_load_model_refuses_what_it_cannot_trust(tmp_path, poisoned):
    import pickle

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(DataError, match="not a readable .safetensors"):
        antibackdoor.load_model(bad)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(bad), metadata={"model": "cnn-small"})
    with pytest.raises(DataError, match="metadata lacks"):
        antibackdoor.load_model(bad)


def test_same_data_reuses_the_run_and_changed_data_does_not(poisoned, capsys):
    run_dir, root, files = poisoned
    out = run_dir.parent
    mask = run_dir.parent.parent / "poison.txt"
    args = ["defend", f"folder:{root}", *tiny_args(out, 1), "--poison-mask", str(mask)]
    assert main(args) == 0
    assert "reusing finished run" in capsys.readouterr().err
    assert len([p for p in out.iterdir() if p.is_dir()]) == 1
    # the run id holds the precision auto resolved to (fp32 in the tests), as run's does: asking for fp32
    # by name is the same run, asking for bf16 is another (checked before anything is trained)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["precision"] == "fp32" and json.loads((run_dir / "metrics.json").read_text())["precision"] == "fp32"
    assert main([*args, "--precision", "fp32"]) == 0
    assert "reusing finished run" in capsys.readouterr().err
    from antibackdoor.defend import DefendConfig, Defender

    fields = {"data": f"folder:{root}", "model": "cnn-small", "out": str(out)}
    ids = {}
    for prec in ("auto", "fp32", "bf16"):
        job = Defender(DefendConfig(**fields, precision=prec))
        job.prepare()
        ids[prec] = job.run_dir(job.resolved()).name
    assert ids["auto"] == ids["fp32"] != ids["bf16"]


# -- clean data, bad files, flags ------------------------------------------------------------------------------
def test_clean_folder_does_not_cry_wolf(tmp_path, monkeypatch):
    root, _ = write_folder(tmp_path / "clean", per_class=40, rate=0.0)
    out = tmp_path / "runs"
    monkeypatch.setattr(AABL, "split_scores", round_robin_scores)
    assert main(["defend", f"folder:{root}", *tiny_args(out, 1), "--holdout", "0"]) == 0
    run_dir = run_dir_of(out)
    page = parse(run_dir / "report.html")
    verdict = page.of("verdict")
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["surplus"]["target"] is None and m["isolated"] == 200  # the lower half: 20 of each class
    assert "No class has a surplus" in verdict and "isolated 200 of 400 samples" in verdict
    assert "not evidence of a backdoor" in verdict and "suspected" not in verdict.lower()
    assert m["acc"] is None and "no evaluation set" in (run_dir / "report.md").read_text()


def test_skipped_files_are_listed_in_the_report(tmp_path):
    root, _ = write_folder(tmp_path / "d", per_class=12, rate=0.0)
    first = sorted((root / "class1").iterdir())[0]
    first.write_bytes(first.read_bytes()[:40])  # truncated
    (root / "class2" / "README.txt").write_text("scraped 2024")
    out = tmp_path / "runs"
    args = ["defend", f"folder:{root}", *tiny_args(out, 1), "--holdout", "0"]
    assert main(args) == 2  # without the flag: an error naming the first bad file
    assert main([*args, "--skip-bad-files", "--export-kept", "npz"]) == 0
    run_dir = run_dir_of(out)
    page = parse(run_dir / "report.html")
    listed = {r[0]: r[2] for r in page.rows["bad-files"][1:]}
    assert set(listed) == {f"class1/{first.name}", "class2/README.txt"}
    assert "not an image file" in listed["class2/README.txt"]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["bad_files"] == 2 and m["train_size"] == 119
    model = antibackdoor.load_model(run_dir / "model.safetensors")
    assert model.classes[:2] == ["class0", "class1"] and len(model.classes) == 10  # class list unchanged
    with np.load(run_dir / "kept.npz") as f:
        assert f["x_train"].shape[1:] == (32, 32, 3) and len(f["x_train"]) == len(f["index"]) == m["kept"]


def test_detector_flag_runs_isolate_then_train(tmp_path, capsys):
    from antibackdoor.defend.job import DefendConfig, Defender

    root, _ = write_folder(tmp_path / "d", per_class=3, rate=0.0)
    code = main(["defend", f"folder:{root}", "--detector", "spectral", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "--detector spectral: unknown detector" in err and "spectral-signature" in err
    code = main(["defend", f"folder:{root}", "--detector", "spectral-signature", "--defense", "aibd",
                 "--out", str(tmp_path / "r")])
    assert code == 2 and "not both" in capsys.readouterr().err
    job = Defender(DefendConfig(str(root), detector="spectral-signature",
                                 defense_params={"treatment": "relabel"}))
    assert job.config.defense == "isolate-then-train"
    assert job.config.defense_params == {"detector": "spectral-signature", "treatment": "relabel"}
    assert not (tmp_path / "r").exists()  # bad input never leaves a run directory


def test_poison_mask_must_fit_the_data(tmp_path, capsys):
    root, _ = write_folder(tmp_path / "d", per_class=3, rate=0.0)
    short = tmp_path / "m.npy"
    np.save(short, np.zeros(7, bool))
    code = main(["defend", f"folder:{root}", "--poison-mask", str(short), "--out", str(tmp_path / "r")])
    assert code == 2 and "a mask of 7 entries, but DATA has 30 indices" in capsys.readouterr().err
    names = tmp_path / "m.txt"
    names.write_text("class0/nope.png\n")
    assert main(["defend", f"folder:{root}", "--poison-mask", str(names), "--out", str(tmp_path / "r")]) == 2
    assert f"{names}: line 1 names no sample of folder:{root}" in capsys.readouterr().err  # never quoted


def test_aibd_suggests_labels_and_the_surplus_test_reads_its_score_ranking(tmp_path, monkeypatch):
    from antibackdoor.defenses.aibd import AIBD

    root, files = write_folder(tmp_path / "d", per_class=40, rate=0.1, seed=1)
    mask = tmp_path / "poison.txt"
    mask.write_text("\n".join(files) + "\n")
    out = tmp_path / "runs"
    monkeypatch.setattr(AIBD, "flip_statistics", sticker_flips)
    args = ["defend", f"folder:{root}", "--defense", "aibd", "--model", "cnn-small", "--out", str(out),
            "--holdout", "0", "--poison-mask", str(mask), "--ra-samples", "1",
            "--defense-param", "infected.epochs=1", "--defense-param", "retrain.epochs=1",
            "--defense-param", "qs=[0.1]", "--defense-param", "pgd_cap=64"]
    assert main(args) == 0
    run_dir = run_dir_of(out)
    rows = list(csv.DictReader(open(run_dir / "suspicious.csv")))
    isolated = [r for r in rows if r["isolated"] == "yes"]
    assert len(isolated) == 40 and rows[:40] == isolated  # isolated first
    # the target filter isolates within the guessed class only: the 40 stickered files
    assert {r["class"] for r in isolated} == {"class3"} and {r["file"] for r in isolated} == set(files)
    # ... so the surplus test reads the ranking by score alone, not the isolation: its counts are those of the
    # top of that ranking (here the class table's depth), whatever the filter kept
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["defense_info"]["target"] == TARGET
    depth = m["surplus"]["flagged"]
    assert depth in m["surplus"]["depths"] and depth >= 30
    by_score = sorted(rows, key=lambda r: (-float(r["aibd_k_amplified"]), int(r["index"])))[:depth]
    assert [sum(r["class"] == row["name"] for r in by_score) for row in m["surplus"]["rows"]] == \
        [row["flagged"] for row in m["surplus"]["rows"]]
    # isolated samples that flipped carry the label AIBD trained them with
    assert all(r["suggested_class"] == "class4" for r in isolated)
    assert m["mask"]["auc"] == 1.0 and m["mask"]["tpr"] == 1.0
    # the report shows AIBD's own target guess: the class, its p-value, what the filter did, the surplus bars
    from antibackdoor.surplus import fmt_p

    info = m["defense_info"]
    p_text = fmt_p(info["target_p"])
    page = parse(run_dir / "report.html")
    guess = page.of("guess-verdict")
    assert "Target: class3 (3)" in guess and f"adjusted p = {p_text}" in guess and "filter applied" in guess
    assert "restricted the isolated set to this class" in guess
    table = page.rows["guess-table"]
    assert len(table) == 1 + 10 and table[0][:2] == ["class", f"in top {info['target_surplus']['flagged']}"]
    assert [int(r[1]) for r in table[1:]] == [row["flagged"] for row in info["target_surplus"]["rows"]]
    assert next(r for r in table if r[0] == "class3")[3] == p_text
    bars = [src for src in page.imgs if src.startswith("data:image/png;base64,")]
    assert 'alt="per-class surplus behind the target guess"' in (run_dir / "report.html").read_text()
    assert len(bars) == len(page.imgs) and (run_dir / "target_surplus.png").is_file()
    md = (run_dir / "report.md").read_text()
    assert f"**Target: class3 (3)** (adjusted p = {p_text}; threshold 0.01; target filter applied)" in md
    assert "![per-class surplus behind the target guess](target_surplus.png)" in md
    assert "| **class3** |" in md.split("## The defense's own target guess")[1]


def test_npz_with_its_own_test_split_and_a_defense_that_isolates_nothing(tmp_path, tiny_npz):
    out = tmp_path / "runs"
    args = ["defend", f"npz:{tiny_npz}", "--defense", "none", "--model", "cnn-small", "--out", str(out),
            "--ra-samples", "4", "--defense-param", "train.epochs=1"]
    assert main(args) == 0
    run_dir = run_dir_of(out)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["eval_kind"] == "own-test" and m["eval_size"] == 60 and 0 <= m["acc"] <= 1
    # no score, no ranking: no surplus test and no verdict (docs/defend.md, "The report")
    assert m["isolated"] == 0 and m["surplus"] is None and m["verdict"]["kind"] == "unranked"
    page = parse(run_dir / "report.html")
    assert "No verdict" in page.of("verdict") and "DATA's own test split" in page.of("eval-table")
    rows = list(csv.DictReader(open(run_dir / "suspicious.csv")))
    assert len(rows) == 240 and all(r["isolated"] == "no" for r in rows) and rows[0]["file"] == ""
    assert len(np.loadtxt(run_dir / "clean_indices.txt", comments="#")) == 240


def test_test_and_trusted_data_are_matched_by_class_name(tmp_path):
    root, _ = write_folder(tmp_path / "d", per_class=6, rate=0.0)
    test = tmp_path / "test"
    for c in ("class2", "class7"):  # a test folder with two of the classes: labels follow the names
        (test / c).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((32, 32, 3), 40 * k, np.uint8)).save(test / c / f"{k}.png")
    base = ["defend", f"folder:{root}", "--defense", "none", "--model", "cnn-small", "--ra-samples", "2",
            "--defense-param", "train.epochs=1"]
    assert main([*base, "--test", f"folder:{test}", "--out", str(tmp_path / "a")]) == 0
    m = json.loads((run_dir_of(tmp_path / "a") / "metrics.json").read_text())
    assert m["eval_kind"] == "test" and m["eval_size"] == 6 and m["heldout"] == 0 and m["train_size"] == 60
    assert main([*base, "--trusted", f"folder:{test}", "--out", str(tmp_path / "b")]) == 0
    run_dir = run_dir_of(tmp_path / "b")
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["eval_kind"] == "trusted" and m["eval_size"] == 6
    assert "none does not use trusted data (they serve as the evaluation set)" in (run_dir / "report.md").read_text()
    (test / "yak").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(test / "yak" / "0.png")
    assert main([*base, "--test", f"folder:{test}", "--out", str(tmp_path / "c")]) == 2


def test_a_split_only_defense_claims_no_model_and_measures_none(tmp_path):
    """With no stage training the returned model (final.epochs=0), defend does what run does on the shared
    path: no model.safetensors, no ACC/RA of random weights, the report says why; the ranking still comes."""
    root, files = write_folder(tmp_path / "d", per_class=12, rate=0.1)
    mask = tmp_path / "poison.txt"
    mask.write_text("\n".join(files) + "\n")
    out = tmp_path / "runs"
    args = ["defend", f"folder:{root}", "--defense", "a-abl", "--model", "cnn-small", "--out", str(out),
            "--poison-mask", str(mask), "--defense-param", "naive.epochs=1", "--defense-param", "final.epochs=0"]
    assert main(args) == 0
    run_dir = run_dir_of(out)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["eval_kind"] == "holdout" and m["heldout"] > 0
    assert m["acc"] is None and m["ra"] is None and "eval_size" not in m
    assert not (run_dir / "model.safetensors").exists()
    rows = list(csv.DictReader(open(run_dir / "suspicious.csv")))
    # the truth is still read against the ranking; the held-out backdoor check needs a trained model
    assert m["mask"]["poisoned"] == sum(r["file"] in set(files) for r in rows) and "heldout_clean_acc" not in m["mask"]
    assert len(rows) == m["train_size"] == 120 - m["heldout"]
    kept = np.loadtxt(run_dir / "clean_indices.txt", dtype=np.int64, comments="#", ndmin=1)
    assert len(kept) == m["kept"]
    md = (run_dir / "report.md").read_text()
    assert "no stage trained the returned model" in md and "load_model" not in md and md.endswith("\n")
    page = parse(run_dir / "report.html")
    assert "eval-table" not in page.rows and "model.safetensors" not in page.of("files")
