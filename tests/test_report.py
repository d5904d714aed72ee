"""`antibackdoor report` on synthetic run directories (no training): the papers' layouts, Average / Worst-case
rows, bold best, failure marks, mean ± std, published numbers, figures, strict files; the HTML page checked
with an HTML parser and, where Debian's chromium is installed, in a headless browser."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from antibackdoor.bench.grid import Grid
from antibackdoor.bench.runner import restrict
from antibackdoor.bench.suites import SUITES
from antibackdoor.cli import main
from antibackdoor.jsonutil import write_json
from antibackdoor.report.collect import default_axes

# synthetic results: (ACC, ASR) per (attack, defense); ASR None on clean data
RESULTS = {("none", "none"): (0.70, None), ("badnets", "none"): (0.61, 0.95), ("blend", "none"): (0.66, 0.98),
           ("none", "adv-train"): (0.48, None), ("badnets", "adv-train"): (0.47, 0.30),
           ("blend", "adv-train"): (0.48, 0.22), ("none", "a-abl"): (0.46, None), ("badnets", "a-abl"): (0.46, 0.04),
           ("blend", "a-abl"): (0.45, 0.21)}


def fake_run(root: Path, config: dict, axes: dict | None = None, rate_shift: float = 0.0) -> Path:
    """A finished run directory as `antibackdoor run` writes it (config.yaml, metrics.json, isolation.csv)."""
    cid = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    d = root / "runs" / f"{config['dataset']}-{config['attack']}-{config['defense']}-{cid}"
    d.mkdir(parents=True)
    acc, asr = RESULTS.get((config["attack"], config["defense"]), (0.5, 0.5))
    t = config["target"]
    acc, asr = acc + 0.01 * t, (None if asr is None else min(1.0, asr + 0.01 * t + rate_shift))
    rng = np.random.default_rng(t)
    n, poison = 200, np.zeros(200, dtype=bool)
    if config["attack"] != "none":
        poison[:20] = True
    scores = rng.normal(1.0, 0.2, n) - 0.8 * poison  # low = suspicious, as A-ABL's SCE score
    isolating = config["defense"] == "a-abl"
    kept = scores > 0.5 if isolating else np.ones(n, dtype=bool)
    metrics = {"acc": acc, "asr": asr, "ra": acc / 2, "gamma": float(kept.mean()),
               "rho_vul": float((kept & poison).sum() / max(kept.sum(), 1)),
               "tpr": float((~kept & poison).sum() / poison.sum()) if poison.any() else float("nan"),
               "fpr": float((~kept & ~poison).sum() / (~poison).sum()), "isolated": int((~kept).sum()),
               "poisoned": int(poison.sum()), "train_size": n, "defense_info": {"threshold": 0.5},
               "time_total_s": 60.0, "stage_cache": [{"stage": "naive", "hit": True, "seconds": 30.0}]}
    write_json(d / "metrics.json", metrics)
    write_json(d / "status.json", {"state": "done"})
    (d / "config.yaml").write_text(yaml.safe_dump({**config, "defense_resolved": {"name": config["defense"]}}))
    if isolating:
        with open(d / "isolation.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "sce_adv", "kept", "is_poison"])
            for i in range(n):
                w.writerow([i, f"{scores[i]:.5f}", int(kept[i]), int(poison[i])])
    return d


def make_suite_dir(root: Path) -> Path:
    """An aabl-t3 bench folder restricted to three attacks, three defenses and targets 0 and 3."""
    suite = SUITES["aabl-t3"]
    grid = restrict(Grid.from_dict(suite.grid_dict("quick")), targets=[0, 3],
                    only={"attacks": ["none", "badnets", "blend"], "defenses": ["none", "adv-train", "a-abl"]})
    cells = []
    for c in grid.cells():
        config = {**c.config, "model": "cnn"}
        d = fake_run(root, config)
        axes = {**c.axes, "model": "cnn"}
        cells.append({"run": str(d.relative_to(root)), "axes": axes, "config": c.config, "state": "done"})
    manifest = {"name": "aabl-t3", "suite": "aabl-t3", "preset": "quick",
                "skipped": {"defenses not available yet": ["abl", "cbd"]}, "cells": cells}
    (root / "bench").mkdir(parents=True, exist_ok=True)
    write_json(root / "bench" / "aabl-t3-quick.json", manifest)
    return root


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self.links, self.rows, self.text = 0, [], [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables += 1
        elif tag == "tr":
            self.rows += 1
        elif tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag in ("link", "script") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src"))

    def handle_data(self, data):
        self.text.append(data)


def test_report_in_the_papers_layout(tmp_path, capsys):
    root = make_suite_dir(tmp_path)
    assert main(["report", str(root)]) == 0
    md = (root / "report.md").read_text()
    assert "Mirrors **A-ABL Table 3**" in md
    assert "Skipped, defenses not available yet: abl, cbd" in md
    table = md.split("### ACC / ASR / RA (%)")[1].split("###")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| attack | No defense ACC | No defense ASR | No defense RA | Adv. Train ACC")
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[2:]}
    assert list(rows) == ["clean", "BadNets", "Blend", "*Average*", "*Worst case*"]
    # mean ± std over targets 0 and 3; the published CIFAR-10 value beside ours; best competitor in bold
    # ("No defense" is a reference, not a competitor); a failure (ASR > 90 %) marked
    badnets = rows["BadNets"]
    assert badnets[0].startswith("62.5 ± 2.1")  # No defense ACC: 61 and 64
    assert badnets[1].startswith("96.5 ± 2.1 ✗")  # No defense ASR: 95 and 98, a failure
    assert badnets[7] == "**5.5 ± 2.1** [1.26]"  # A-ABL ASR, best, paper 1.26
    assert badnets[6].endswith("[83.59]") and not badnets[6].startswith("**")  # A-ABL ACC 47.5 < Adv. Train 48.5
    assert badnets[3].startswith("**48.5")
    average = rows["*Average*"]  # over BadNets and Blend only (the clean row is not an attack)
    assert average[7] == "**14.0** [3.00]" and average[4] == "27.5 [59.19]"
    worst = rows["*Worst case*"]
    assert worst[6] == "46.5 [80.34]" and worst[7] == "**22.5** [6.88]"  # min ACC, max ASR
    assert "ROC AUC" in md and "Spread over targets" in md and "report_files/aabl-t3-quick-score_hists.png" in md
    # results.csv: every run, strict numbers
    rows_csv = list(csv.DictReader(open(root / "results.csv")))
    assert len(rows_csv) == 15 and {r["state"] for r in rows_csv} == {"done"}
    clean = [r for r in rows_csv if r["attack"] == "none"]
    assert clean and all(r["tpr"] == "" and r["asr"] == "" for r in clean)
    assert all(r["stage_cache_saved_s"] == "30.0" for r in rows_csv)
    # the page: tables and inline figures, nothing fetched from elsewhere
    html = (root / "report.html").read_text()
    page = _Page()
    page.feed(html)
    assert page.tables >= 4 and page.links == []
    assert len(page.imgs) >= 2 and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    assert not re.search(r"(src|href)=\"(https?:|//)", html)
    assert "#e67e00" in html and 'class="fail"' in html and 'class="best"' in html and 'class="paper"' in html


def test_report_of_plain_runs_with_rates(tmp_path):
    """Runs made without a bench (no manifest): a generic table per setting and the ASR-vs-rate figure."""
    for rate in (0.01, 0.05, 0.1):
        for target in (0, 3):
            config = {"dataset": "cifar10-mini", "attack": "badnets", "attack_params": {}, "poison_rate": rate,
                      "target": target, "defense": "a-abl", "defense_params": {}, "model": "cnn", "preset": "quick",
                      "seed": 0}
            fake_run(tmp_path, config, rate_shift=-rate)
    fake_run(tmp_path, {"dataset": "cifar10-mini", "attack": "none", "attack_params": {}, "poison_rate": 0.1,
                        "target": 0, "defense": "a-abl", "defense_params": {}, "model": "cnn", "preset": "quick",
                        "seed": 0})
    from antibackdoor.report import write_report

    paths = write_report(tmp_path)
    md = paths["markdown"].read_text()
    assert "ACC / ASR / RA (%) — rate 1%" in md and "ACC / ASR / RA (%) — rate 10%" in md
    assert md.count("| clean |") >= 3  # the clean run is shown in every rate's block
    assert "runs-rate_curves.png" in md and (tmp_path / "report_files" / "runs-rate_curves.png").is_file()


def aibd_run(root: Path, attack: str, target: int, crowded: int | None, seed: int = 0) -> Path:
    """A finished AIBD run whose defense_info holds its target guess, made by the real class-surplus test on a
    ranking where class ``crowded`` fills the top 60 places (None: a ranking in random order)."""
    from antibackdoor.defenses.aibd import TARGET_FRACTIONS
    from antibackdoor.surplus import class_surplus

    config = {"dataset": "cifar10-mini", "attack": attack, "attack_params": {}, "poison_rate": 0.1,
              "target": target, "defense": "aibd", "defense_params": {}, "model": "cnn", "preset": "quick",
              "seed": seed}
    d = fake_run(root, config)
    y = np.arange(1000) % 10
    order = np.random.default_rng(seed).permutation(1000)
    if crowded is not None:
        first = np.flatnonzero(y == crowded)[:60]
        order = np.concatenate([first, order[~np.isin(order, first)]])
    s = class_surplus(y, order, np.zeros(1000, bool), [f"c{i}" for i in range(10)], 0.01, TARGET_FRACTIONS)
    metrics = json.loads((d / "metrics.json").read_text())
    metrics["defense_info"] = {"target": s.target, "target_best": s.best, "target_p": s.p, "target_filter": True,
                               "target_filter_applied": s.target is not None, "target_surplus": s.as_dict()}
    write_json(d / "metrics.json", metrics)
    return d


def test_report_shows_aibd_target_guesses(tmp_path):
    """Each AIBD run's guessed target (or that the filter declined), its p-value and the per-class surplus bars,
    in report.md and, inline, in report.html."""
    aibd_run(tmp_path, "badnets", 3, crowded=3)  # right
    aibd_run(tmp_path, "blend", 3, crowded=5, seed=1)  # a clean class crowds the top: a wrong guess
    aibd_run(tmp_path, "none", 0, crowded=None, seed=2)  # clean data, no class called: the filter declines
    fake_run(tmp_path, {"dataset": "cifar10-mini", "attack": "badnets", "attack_params": {}, "poison_rate": 0.1,
                        "target": 3, "defense": "a-abl", "defense_params": {}, "model": "cnn", "preset": "quick",
                        "seed": 0})  # no guess of its own: no row
    from antibackdoor.report import write_report

    paths = write_report(tmp_path)
    md = paths["markdown"].read_text()
    part = md.split("### Target guesses")[1].split("###")[0]
    rows = {r[2]: r for r in ([c.strip() for c in ln.split("|")] for ln in part.splitlines()
                              if ln.startswith("| `"))}
    assert set(rows) == {"BadNets", "Blend", "clean"}
    for attack, truth, guess, filt, right in (("BadNets", "c3 (3)", "c3 (3)", "applied", "yes"),
                                              ("Blend", "c3 (3)", "c5 (5)", "applied", "**no**"),
                                              ("clean", "none (clean data)", "none", "declined", "yes")):
        assert rows[attack][5:7] == [truth, guess] and rows[attack][8:10] == [filt, right], rows[attack]
    metrics = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("runs/*aibd*/metrics.json")}
    from antibackdoor.surplus import fmt_p

    for row in rows.values():
        info = next(m["defense_info"] for name, m in metrics.items() if row[1].strip("`").endswith(name))
        assert row[7] == fmt_p(info["target_p"])
    assert float(rows["BadNets"][7]) < 0.01 <= float(rows["clean"][7])
    assert "true target in 1 of 2 runs (no class called in 0); on clean data no class was called in 1 of 1" in part
    # the bars: a PNG beside report.md, inline in report.html
    assert "(report_files/runs-target_surplus.png)" in md
    assert (tmp_path / "report_files" / "runs-target_surplus.png").is_file()
    html = paths["html"].read_text()
    page = _Page()
    page.feed(html)
    text = " ".join(page.text)
    assert "Target guesses" in text and "declined" in text and "none (clean data)" in text
    imgs = [m for m in re.finditer(r'<img alt="([^"]*)" src="([^"]*)"', html) if "class-surplus test" in m.group(1)]
    assert len(imgs) == 1 and imgs[0].group(2).startswith("data:image/png;base64,")
    assert not page.links


def test_report_of_an_empty_folder_is_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "antibackdoor: error:" in err and "no run directories" in err


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="Debian's chromium is not installed (the HTML-parser checks above still run)")
def test_report_page_in_a_headless_browser(tmp_path):
    """Open report.html as a person would (Chromium, file://, no network) and read back what the page shows:
    the tables, and the figures decoded to real images."""
    root = make_suite_dir(tmp_path / "r")
    main(["report", str(root)])
    html = (root / "report.html").read_text()
    probe = ("<script>window.addEventListener('load', () => { const ok = [...document.images].filter("
             "i => i.complete && i.naturalWidth > 100).length; document.body.setAttribute('data-images', "
             "ok + '/' + document.images.length); document.body.setAttribute('data-tables', "
             "document.querySelectorAll('table.results tbody tr').length); });</script>")
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", probe + "</body>"))
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    images = re.search(r'data-images="(\d+)/(\d+)"', dom)
    rows = re.search(r'data-tables="(\d+)"', dom)
    assert images and rows, dom[:500]
    assert int(images.group(1)) == int(images.group(2)) >= 2  # every figure decoded and laid out
    assert int(rows.group(1)) >= 10
    assert "A-ABL Table 3" in dom and "Worst case" in dom


def _flag_runs(root: Path) -> list[dict]:
    """Two finished A-ABL-like runs recording flags, defense_info and two rounds of a labelled mask."""
    cells = []
    for target, flags in ((0, {"taken_back": {"samples": 150, "poison": 5}}),
                          (3, {"purged": {"samples": 50, "poison": 8}})):
        config = {"dataset": "cifar10-mini", "attack": "badnets", "attack_params": {}, "poison_rate": 0.1,
                  "target": target, "defense": "a-abl", "defense_params": {}, "model": "cnn", "preset": "quick",
                  "seed": 0}
        d = fake_run(root, config)
        m = json.loads((d / "metrics.json").read_text())
        m.update(train_size=1000, isolated=200, isolated_poison=90, poisoned=100,
                 sample_flags={**flags, "labelled_round_2": {"samples": 40, "poison": 10},
                               "labelled_round_10": {"samples": 50, "poison": 0}},
                 defense_info={"threshold": 0.5, "purge_target": None if target == 0 else 3})
        write_json(d / "metrics.json", m)
        cells.append({"run": str(d.relative_to(root)), "axes": {**default_axes(config)}, "config": config,
                      "state": "done"})
    return cells


def _run_rows(md: str, title: str = "### Per run") -> list[dict[str, str]]:
    part = md.split(title)[1].split("###")[0]
    lines = [[c.strip() for c in ln.split("|")[1:-1]] for ln in part.splitlines() if ln.startswith("|")]
    return [dict(zip(lines[0], row, strict=True)) for row in lines[2:]]


def test_grid_columns_give_a_per_run_table_of_flags_and_defense_info(tmp_path, capsys):
    cells = _flag_runs(tmp_path)
    columns = ["acc", "sample_flags.taken_back.samples", {"path": "sample_flags.purged.poison", "label": "purged p"},
               "sample_flags.labelled_round_*.share", {"path": "defense_info.purge_target", "label": "purge target"},
               "final_poison_share", "time_alone_s", "defense_info.nothing"]
    (tmp_path / "bench").mkdir()
    write_json(tmp_path / "bench" / "g-quick.json", {"name": "g", "suite": None, "preset": "quick", "cells": cells,
                                                     "columns": columns})
    assert main(["report", str(tmp_path)]) == 0
    rows = _run_rows((tmp_path / "report.md").read_text())
    assert list(rows[0]) == ["attack", "target", "defense", "acc", "sample_flags.taken_back.samples", "purged p",
                             "sample_flags.labelled_round_2.share", "sample_flags.labelled_round_10.share",
                             "purge target", "final_poison_share", "time_alone_s", "defense_info.nothing"]
    t0, t3 = rows
    assert (t0["target"], t0["attack"], t0["defense"], t3["target"]) == ("0", "BadNets", "A-ABL", "3")
    assert t0["acc"] == "46.0" and t3["acc"] == "49.0"  # fractions in %
    assert (t0["sample_flags.taken_back.samples"], t0["purged p"]) == ("150", "–")
    assert (t3["sample_flags.taken_back.samples"], t3["purged p"]) == ("–", "8")
    assert t0["sample_flags.labelled_round_2.share"] == "25.0" and t0["sample_flags.labelled_round_10.share"] == "0.0"
    assert (t0["purge target"], t3["purge target"]) == ("none", "3")  # recorded null vs a class
    # the final model's training set: 800 kept (10 poisoned) + 150 taken back (5) = 15 / 950; 800 - 50 (8) = 2 / 750
    assert (t0["final_poison_share"], t3["final_poison_share"]) == ("1.6", "0.3")
    assert t0["time_alone_s"] == "90"  # 60 s of its own + 30 s its stage-cache hit saved
    assert t0["defense_info.nothing"] == "–"
    html = (tmp_path / "report.html").read_text()
    assert 'class="results per-run"' in html and "purge target" in html
    csv_rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert csv_rows[0]["sample_flags.labelled_round_2.share"] == "0.25" and csv_rows[0]["final_poison_share"] != ""
    assert csv_rows[1]["defense_info.purge_target"] == "3" and csv_rows[0]["defense_info.purge_target"] == ""
    # --columns replaces the grid's own
    assert main(["report", str(tmp_path), "--columns", "tpr,sample_flags.*.poison"]) == 0
    rows = _run_rows((tmp_path / "report.md").read_text())
    assert list(rows[0])[3:] == ["tpr", "sample_flags.labelled_round_2.poison", "sample_flags.labelled_round_10.poison",
                                 "sample_flags.purged.poison", "sample_flags.taken_back.poison"]
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--columns", "acc,sample_flags..poison"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "antibackdoor: error: --columns" in err


def test_runs_on_outside_data_are_labelled_by_their_trigger_and_target(tmp_path):
    """A run with --attack none on an outside: data set is shown as its trigger at its target, and an AIBD guess
    on it is judged against that target (not as clean data)."""
    d = aibd_run(tmp_path, "none", 0, crowded=7)
    config = yaml.safe_load((d / "config.yaml").read_text())
    config["dataset"] = "outside:own-patch?target=7"
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    m = json.loads((d / "metrics.json").read_text())
    m["truth"] = {"trigger": "own-patch", "target": 7}
    write_json(d / "metrics.json", m)
    from antibackdoor.report import write_report

    md = write_report(tmp_path, columns="asr,truth.target")["markdown"].read_text()
    (row,) = _run_rows(md)
    assert (row["attack"], row["truth.target"]) == ("own-patch", "7")
    part = md.split("### Target guesses")[1].split("###")[0]
    guess = [c.strip() for c in next(ln for ln in part.splitlines() if ln.startswith("| `")).split("|")]
    assert guess[2] == "own-patch" and guess[5:7] == ["c7 (7)", "c7 (7)"] and guess[9] == "yes"


def _plain(attack: str, defense: str, target: int = 0) -> dict:
    return {"dataset": "cifar10-mini", "attack": attack, "attack_params": {}, "poison_rate": 0.1, "target": target,
            "defense": defense, "defense_params": {}, "model": "cnn", "preset": "quick", "seed": 0}


def defend_run(root: Path, data: str, target: int | None, rid: str) -> Path:
    """A finished `antibackdoor defend` run as it writes it: config.yaml names its data and no attack; its
    metrics hold ACC, RA, the isolated count and the class-surplus verdict; it has a report of its own."""
    d = root / "runs" / f"{Path(data).name}-defend-a-abl-{rid}"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"data": data, "defense": "a-abl", "defense_params": {},
                                                   "model": "cnn", "preset": "quick", "seed": 0}))
    rows = [{"label": c, "name": f"class{c}"} for c in range(4)]
    write_json(d / "metrics.json", {"acc": 0.8, "ra": 0.3, "isolated": 50, "train_size": 1000,
                                    "surplus": {"target": target, "rows": rows}, "time_total_s": 20.0})
    write_json(d / "status.json", {"state": "done"})
    (d / "report.html").write_text("<html></html>")
    return d


def test_defend_runs_are_listed_one_per_row_not_averaged(tmp_path):
    """`report` on a folder holding `defend` runs once showed them with attack '?' and averaged runs on unrelated
    data in one cell. They get a section of their own: one row each, pointing at their own reports."""
    defend_run(tmp_path, "folder:/data/shop", 2, "aaaa000001")
    defend_run(tmp_path, "folder:/data/street", None, "aaaa000002")
    fake_run(tmp_path, _plain("badnets", "a-abl"))
    from antibackdoor.report import write_report

    md = write_report(tmp_path)["markdown"].read_text()
    assert "?" not in md
    tables = md.split("## defend runs")[0]
    assert "/data/shop" not in tables and "| 80.0" not in tables  # not in the attack x defense tables
    part = md.split("## defend runs")[1]
    assert "each has its own report (report.html in its run directory)" in part
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in part.splitlines() if ln.startswith("| runs/")]
    assert [(r[1], r[4], r[5], r[6], r[7], r[8]) for r in rows] == [
        ("folder:/data/shop", "done", "80.0", "30.0", "50 of 1000", "class2"),
        ("folder:/data/street", "done", "80.0", "30.0", "50 of 1000", "none")]
    assert all(r[9].endswith("/report.html") for r in rows)
    csv_rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert all(r["attack"] != "?" for r in csv_rows)


def test_compute_time_reads_in_seconds_when_it_is_seconds(tmp_path):
    """'0.0 h of run time' and 'saving 0 min' for runs of seconds: durations read in the unit that fits."""
    for target in (0, 3):
        d = fake_run(tmp_path, _plain("badnets", "a-abl", target))
        m = json.loads((d / "metrics.json").read_text())
        m["time_total_s"], m["stage_cache"] = 20.0, [{"stage": "naive", "hit": True, "seconds": 5.0}]
        write_json(d / "metrics.json", m)
    from antibackdoor.report import write_report

    paths = write_report(tmp_path)
    for text in (paths["markdown"].read_text(), paths["html"].read_text()):
        assert "Compute: 40 s of run time" in text and "saving 10 s" in text
        assert " h of run time" not in text and "0 min" not in text


def test_the_reference_is_recognised_by_name_not_label(tmp_path):
    """A grid that labels defense `none` "Baseline": it is still the reference, never bold as the best."""
    cells = []
    for defense, lab in (("none", "Baseline"), ("adv-train", "Adv. Train"), ("a-abl", "A-ABL")):
        config = _plain("badnets", defense)
        d = fake_run(tmp_path, config)  # ACC: none 61 (the highest), adv-train 47, a-abl 46
        axes = {**default_axes(config), "defense": lab}
        cells.append({"run": str(d.relative_to(tmp_path)), "axes": axes, "config": config, "state": "done"})
    (tmp_path / "bench").mkdir()
    write_json(tmp_path / "bench" / "g-quick.json", {"name": "g", "suite": None, "preset": "quick", "cells": cells})
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    table = md.split("### ACC / ASR / RA (%)")[1].split("###")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].split("|")[1:-1]]
    row = dict(zip(head, [c.strip() for c in lines[2].split("|")[1:-1]], strict=True))
    assert row["Baseline ACC"] == "61.0" and row["Adv. Train ACC"] == "**47.0**" and row["A-ABL ACC"] == "46.0"
