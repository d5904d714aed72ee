"""Grid files and suites: expansion, exclusions, adjustments, labels, published data, method lookup; strict
JSON everywhere the tool writes (no torch training here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from antibackdoor.bench.grid import Grid
from antibackdoor.bench.runner import check_methods, find_registered, load_grid, restrict
from antibackdoor.bench.suites import SUITES, TARGETS
from antibackdoor.errors import ConfigError
from antibackdoor.report import published


def _strict(text: str):
    def bad(token):
        raise ValueError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=bad)


def test_write_json_writes_null_for_undefined_metrics(tmp_path):
    from antibackdoor.experiment import write_json

    path = tmp_path / "m.json"
    write_json(path, {"tpr": float("nan"), "list": [1.0, float("inf"), -float("inf")],
                      "t": torch.tensor([float("nan"), 0.5]), "nested": {"x": float("nan")}, "p": tmp_path})
    data = _strict(path.read_text())
    assert data["tpr"] is None and data["list"] == [1.0, None, None] and data["t"] == [None, 0.5]
    assert data["nested"]["x"] is None and data["p"] == str(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))


def test_grid_expansion_exclusions_adjustments_and_clean_collapse():
    g = Grid.from_dict({
        "datasets": ["cifar10-mini"], "attacks": ["none", "badnets", {"name": "clb", "label": "CLB"}],
        "defenses": ["none", {"a-abl": {"naive": {"epochs": 3}}}], "targets": [0, 3, 7], "seeds": [0, 1],
        "exclude": [{"attack": "none", "defense": "a-abl"}],
        "adjust": [{"match": {"attack": "CLB"}, "set": {"poison_rate": 0.5, "attack_params": {"eps": 0.1}}}],
    })
    cells = g.cells()
    by = {}
    for c in cells:
        by.setdefault((c.config["attack"], c.config["defense"]), []).append(c)
    # clean data does not depend on the target: one cell per seed, excluded for a-abl
    assert len(by[("none", "none")]) == 2 and ("none", "a-abl") not in by
    assert {c.config["target"] for c in by[("none", "none")]} == {0}
    assert len(by[("badnets", "a-abl")]) == 6
    assert all(c.config["poison_rate"] == 0.5 and c.config["attack_params"] == {"eps": 0.1}
               for c in by[("clb", "none")])
    assert by[("badnets", "a-abl")][0].config["defense_params"] == {"naive": {"epochs": 3}}
    assert by[("badnets", "none")][0].axes["attack"] == "BadNets"  # the papers' spelling
    assert by[("badnets", "a-abl")][0].axes["defense"] == "A-ABL (naive.epochs=3)"
    assert len(cells) == len({c.key() for c in cells}) == 2 + 2 * 3 * 2 * 2


def test_grid_rejects_bad_files(tmp_path):
    for bad, word in [({"attackz": ["badnets"]}, "attackz"), ({"targets": "0"}, "targets"),
                      ({"exclude": [{"colour": 1}]}, "colour"), ({"adjust": [{"match": {}}]}, "adjust"),
                      ({"seeds": [0.5]}, "seeds"), ({"attacks": [{"name": "blend", "parms": {}}]}, "parms")]:
        with pytest.raises(ConfigError, match=word):
            Grid.from_dict(bad)
    path = tmp_path / "g.yaml"
    path.write_text("attacks: [badnets\n")
    with pytest.raises(ConfigError, match="g.yaml"):
        load_grid(str(path), None)
    with pytest.raises(ConfigError, match="neither a suite"):
        load_grid("no-such-suite", None)


def test_duplicate_labels_are_made_unique():
    g = Grid.from_dict({"defenses": [{"name": "none", "label": "X"}, {"name": "a-abl", "label": "X"}]})
    assert sorted({c.axes["defense"] for c in g.cells()}) == ["X #1", "X #2"]


def test_restrict_filters_by_name_or_label():
    g, _ = load_grid("aabl-t3", "quick")
    g = restrict(g, seeds=[1, 2], targets=[5], only={"attacks": ["BadNets", "blend", "none"], "defenses": ["a-abl"]})
    cells = g.cells()
    assert {c.config["attack"] for c in cells} == {"badnets", "blend", "none"}
    assert {c.config["seed"] for c in cells} == {1, 2}
    assert {c.config["target"] for c in cells if c.config["attack"] != "none"} == {5}
    with pytest.raises(ConfigError, match="--attacks"):
        restrict(load_grid("aabl-t3", "quick")[0], only={"attacks": ["nope"]})


@pytest.mark.parametrize("name", sorted(SUITES))
def test_every_suite_has_both_sizes_and_several_targets(name):
    suite = SUITES[name]
    assert set(suite.grids) == {"quick", "paper"}
    for preset in ("quick", "paper"):
        grid, _ = load_grid(name, preset)
        assert grid.preset == preset and grid.targets == TARGETS and 0 in grid.targets and len(grid.targets) >= 3
        cells = grid.cells()
        assert cells
        if preset == "quick":
            assert {c.config["dataset"] for c in cells} == {"cifar10-mini"}
    for spec in suite.tables:
        if spec.published:
            source, values = published.load(spec.published)
            number = spec.published.split("_t")[1]
            assert values and f"Table {number}:" in source, (spec.published, source)


@pytest.mark.parametrize("name", [n for n, s in SUITES.items() if any(t.published for t in s.tables)])
def test_published_labels_match_the_suite(name):
    """Every row / column the published file names is one the suite's grid produces (else the numbers could
    never be shown beside ours)."""
    from antibackdoor.report.tables import join_key

    suite = SUITES[name]
    cells = Grid.from_dict(suite.grid_dict("paper")).cells()
    for spec in suite.tables:
        if not spec.published:
            continue
        _, values = published.load(spec.published)
        rows = {join_key(spec.rows, c.axes[spec.rows]) for c in cells} | {"Average", "Worst case"}
        cols = {join_key(spec.cols, c.axes[spec.cols]) for c in cells} | {"Average"}
        if spec.cols == "model":
            cols = {join_key("model", m) for m in suite.grids["paper"]["models"]}
        for ds, row, col, metric in values:
            assert row in rows, (spec.published, row)
            assert col in cols or col == "Average", (spec.published, col)
            assert metric in spec.metrics, (spec.published, metric)
            assert math.isfinite(values[(ds, row, col, metric)])


def test_missing_methods_are_named_and_their_cells_skipped():
    from antibackdoor.defenses import DEFENSES

    grid, _ = load_grid("aabl-t3", "quick")
    cells = grid.cells()
    kept, missing = check_methods(cells, "quick")
    wanted = {c.config["defense"] for c in cells}
    assert {c.config["defense"] for c in kept} == {d for d in wanted if find_registered(d, DEFENSES)}
    assert {"none", "adv-train", "a-abl"} <= {c.config["defense"] for c in kept}
    absent = sorted(d for d in wanted if not find_registered(d, DEFENSES))
    assert missing.get("defenses not available yet", []) == absent


def test_find_registered_ignores_case_and_punctuation():
    reg = {"d-st": 1, "abl": 2}
    assert find_registered("D_ST", reg) == "d-st" and find_registered("dst", reg) == "d-st"
    assert find_registered("ABL", reg) == "abl" and find_registered("cbd", reg) is None


def test_outside_data_sets_are_cells_labelled_by_their_trigger():
    outside = ["outside:own-patch?target=7", "outside:own-blend?target=3,rate=0.05"]
    g = Grid.from_dict({"datasets": ["cifar10-mini", *outside],
                        "attacks": ["badnets", "none"], "defenses": ["none"], "targets": [0, 3],
                        "precision": "fp32", "exclude": [{"dataset": "outside:*", "attack": "badnets"}],
                        "columns": ["acc", {"path": "defense_info.q", "label": "q"}]})
    cells = g.cells()
    by = {(c.config["dataset"], c.config["attack"], c.config["target"]): c for c in cells}
    assert set(by) == {("cifar10-mini", "badnets", 0), ("cifar10-mini", "badnets", 3), ("cifar10-mini", "none", 0),
                       ("outside:own-patch?target=7", "none", 0), ("outside:own-blend?target=3,rate=0.05", "none", 0)}
    assert all(c.config["precision"] == "fp32" for c in cells)
    patch = by[("outside:own-patch?target=7", "none", 0)].axes
    assert (patch["dataset"], patch["attack"], patch["attack_name"], patch["target"], patch["poison_rate"]) == \
        ("cifar10-mini", "own-patch", "own-patch", 7, 0.1)
    assert by[("outside:own-blend?target=3,rate=0.05", "none", 0)].axes["poison_rate"] == 0.05
    assert by[("cifar10-mini", "none", 0)].axes["attack_name"] == "none"  # ordinary clean data stays clean
    assert g.columns == ["acc", {"path": "defense_info.q", "label": "q"}]
    for bad in (["acc", 3], [{"path": "acc", "colour": 1}], "acc"):
        with pytest.raises(ConfigError, match="columns"):
            Grid.from_dict({"columns": bad})


def test_a_label_picks_its_variant_alone_a_name_every_variant():
    spec = {"defenses": ["abl", {"name": "abl", "label": "abl-sample", "params": {"per_sample": True}},
                         {"name": "a-abl", "label": "split_log", "params": {"split_log": True}},
                         {"name": "a-abl", "label": "purge", "params": {"purge": True}}]}

    def pick(*wanted: str) -> list[str]:
        return [d.label or d.name for d in restrict(Grid.from_dict(spec), only={"defenses": list(wanted)}).defenses]

    assert pick("abl") == ["abl"] and pick("abl-sample") == ["abl-sample"] and pick("ABL-Sample") == ["abl-sample"]
    assert pick("a-abl") == ["split_log", "purge"] and pick("abl", "purge") == ["abl", "purge"]


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "grids").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_the_benchmark_grids_expand_into_valid_runs(path):
    """Every grid under benchmarks/grids/ loads, its methods exist and accept its parameters, every cell is a
    valid run config, and its report columns parse."""
    from antibackdoor.experiment import make_config
    from antibackdoor.report.columns import parse_columns

    grid, _ = load_grid(str(path), None)
    cells = grid.cells()
    kept, missing = check_methods(cells, grid.preset)
    assert cells and len(kept) == len(cells) and not missing
    for c in kept:
        make_config(c.config)
    parse_columns(grid.columns, path.name)
    # every attack and defense can be picked on the command line, whose lists are comma-separated
    assert not [c.label for c in grid.attacks + grid.defenses if c.label and "," in c.label]
