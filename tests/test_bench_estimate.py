"""The bench's time estimate: a defense's ``extra_passes`` (the work its loops do beyond its TrainConfigs) joins a
cell's count, ASD's and VaB's counts follow from their parameters, and finished cells calibrate each defense by
its own finished cells first. Constructed plans and parameters only: nothing trains."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import write_npz

from antibackdoor.bench import estimate as est
from antibackdoor.bench.grid import Cell, Grid
from antibackdoor.bench.runner import Plan, Planned, estimate_plan, make_plan
from antibackdoor.defenses import DEFENSES, get_defense
from antibackdoor.defenses.vab import SUSPECT_SHARE

N = 5170  # the mini CIFAR-10's training images
FWD = 1 / 3  # a forward pass alone, in sample passes


def test_a_defense_without_extra_work_adds_nothing():
    assert get_defense("none").extra_passes(N) == 0.0
    assert get_defense("a-abl").extra_passes(N) == 0.0


def test_the_plan_adds_what_the_defense_says_its_loops_add(tmp_path, monkeypatch):
    """The runner asks the resolved defense, with the number of training images, and adds the answer to the cell's
    passes; the shared stages stay as the TrainConfigs give them."""
    npz = write_npz(tmp_path / "tiny.npz")
    grid = Grid.from_dict({
        "name": "tiny", "datasets": [f"npz:{npz}"], "attacks": ["badnets"], "models": ["cnn-small"],
        "defenses": [{"name": "none", "params": {"train": {"epochs": 2}}}], "targets": [0],
        "eval": {"ra_steps": 1}})
    (plain,) = make_plan(grid, None, tmp_path / "out").cells
    monkeypatch.setattr(DEFENSES.lookup("none"), "extra_passes", lambda self, n_train: 7.0 * n_train)
    (more,) = make_plan(grid, None, tmp_path / "out").cells
    assert more.passes == pytest.approx(plain.passes + 7.0 * 240)  # write_npz: 240 training images
    assert more.shared == plain.shared


def test_asd_counts_its_mixmatch_steps_and_scoring_passes():
    """Quick ASD on 5,170 images: every epoch `iterations` steps of a labelled batch and K = 2 views of an
    unlabelled batch (trained), the K views guessed (forward), and the SCE of all samples (forward); every
    meta-split epoch also the virtual one-epoch update and a second scoring. Several times the generic count."""
    asd = get_defense("asd", "quick")
    p = asd.params
    assert p.train.epochs > p.agnostic_until  # the quick preset reaches the meta-split
    b, k = p.train.batch_size, 2
    work = p.train.epochs * (p.iterations * (b * (1 + k) + b * k * FWD) + N * FWD) \
        + (p.train.epochs - p.agnostic_until) * (p.meta.epochs * N + N * FWD)
    counted = (p.train.epochs + p.meta.epochs) * N  # the TrainConfigs train and meta, one pass per image
    assert asd.extra_passes(N) == pytest.approx(work - counted)
    generic, _ = est.cell_passes(asd.describe(), N, 1000, 10)
    assert generic + asd.extra_passes(N) > 2.5 * generic


def test_vab_counts_its_victim_rounds_views_and_forward_passes():
    vab = get_defense("vab", "quick")
    p, b = vab.params, vab.params.beneficiary.batch_size
    assert p.mix == "attention" and p.semi_from < p.beneficiary.epochs
    s = round(SUSPECT_SHARE * N)
    it = math.ceil((N - s) / b)
    lab, unl = it * b, it * (s // it)
    semi = p.beneficiary.epochs - p.semi_from
    epoch = 2 * lab * (1 + FWD)  # two views of the credible batches trained, and AttentionMix's attention pass
    semi_epoch = 2 * unl * (1 + FWD) + (lab + unl) * FWD  # suspects guessed, trained; victim probs
    rounds = len(p.warmup_thresholds) + p.semi_from // p.victim_every + semi
    victim = p.victim_warmup_epochs * N + rounds * p.victim.epochs * s + (1 + rounds) * N * FWD
    work = p.beneficiary.epochs * epoch + semi * semi_epoch + victim
    counted = (p.beneficiary.epochs + p.victim.epochs) * N
    assert vab.extra_passes(N) == pytest.approx(work - counted)
    generic, _ = est.cell_passes(vab.describe(), N, 1000, 10)
    assert generic + vab.extra_passes(N) > 2 * generic


def _cell(defense: str, state: str, estimated_s: float, measured_s: float | None = None) -> Planned:
    p = Planned(Cell({}, {"defense_name": defense}), f"{defense}-{state}", Path("nowhere"), state)
    p.passes, p.seconds_per_pass, p.measured_s = estimated_s * 10, 0.1, measured_s
    return p


def _plan(cells: list[Planned]) -> Plan:
    return Plan("g", "quick", None, Grid(), cells, {})


def test_finished_cells_calibrate_their_own_defense_first():
    """Each pending cell takes the median measured/estimated ratio of its own defense's finished cells (asd: 4
    and 6 -> 5); a defense with none finished takes the median over all finished cells (1, 2, 4, 6 -> 3)."""
    done = [_cell("none", "done", 100, 100), _cell("a-abl", "done", 100, 200), _cell("asd", "done", 100, 400),
            _cell("asd", "done", 50, 300)]
    todo = [_cell("asd", "pending", 50), _cell("vab", "pending", 20)]
    seconds, how = estimate_plan(_plan(done + todo), todo, workers=1)
    assert seconds == pytest.approx(50 * 5 + 20 * 3)
    assert how == "calibrated on 4 finished cell(s) here (per defense: asd; on all of them: vab)"
    seconds2, _ = estimate_plan(_plan(done + todo), todo, workers=2)
    assert seconds2 == pytest.approx(seconds / 2)


def test_without_finished_cells_the_count_stands():
    todo = [_cell("asd", "pending", 50), _cell("vab", "pending", 20)]
    failed = _cell("asd", "failed", 100, 900)  # only finished cells calibrate
    seconds, how = estimate_plan(_plan([failed, *todo]), todo, workers=1)
    assert seconds == pytest.approx(70)
    assert how.startswith("from the quick cnn's speed")


def test_only_the_stages_a_defense_trains_through_the_stage_cache_count_as_shared(tmp_path):
    """ASD's and PDB's "train" are their own loops (never loaded from the cache): counted in full in every cell;
    `none`'s "train", A-ABL's "naive", NAD's "backdoored" and a detector's suspect model are shared."""
    npz = write_npz(tmp_path / "tiny.npz")
    grid = Grid.from_dict({
        "name": "tiny", "datasets": [f"npz:{npz}"], "attacks": ["badnets"], "models": ["cnn-small"],
        "defenses": ["none", "asd", "pdb", "pdb-iso", "nad", "a-abl", "vab"], "targets": [0], "eval": {"ra_steps": 1}})
    cells = {str(p.cell.axes["defense_name"]): p for p in make_plan(grid, None, tmp_path / "out").cells}
    assert {name: len(p.shared) for name, p in cells.items()} == \
        {"none": 1, "asd": 0, "pdb": 0, "pdb-iso": 1, "nad": 1, "a-abl": 1, "vab": 0}
    assert cells["none"].shared[0][0].startswith("all{")
    # a stage is shared by the data it trains on and its recipe: the same recipe under another data name is not
    cfg = {"epochs": 2, "batch_size": 8, "optimizer": "sgd"}
    _, a = est.cell_passes({"train": cfg}, N, 10, 1, {"train": "all"})
    _, b = est.cell_passes({"infected": cfg}, N, 10, 1, {"infected": "subset"})
    _, none = est.cell_passes({"train": cfg}, N, 10, 1)
    assert a[0][1] == b[0][1] == 2 * N and a[0][0] != b[0][0] and none == []
