"""PDB and PDB-iso: the defensive samples are built as specified (trigger, mask, label map, from which pool), the
loss sees them stamped and the data as given, the pool of PDB-iso is each class's least suspicious agreeing
samples, the returned model is the wrapped (deployed) one, and both run end to end through ``run`` and ``defend``
on tiny data (one epoch: nothing here depends on how well anything trained)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_set, write_npz
from torch import nn

import antibackdoor as ab
from antibackdoor.cli import main
from antibackdoor.defenses.pdb import (
    DefensiveAugment,
    DefensiveTrigger,
    defensive_set,
    label_map,
    least_suspicious,
    pdb_loss,
    rotate,
)
from antibackdoor.errors import ConfigError
from antibackdoor.experiment import run_experiment
from antibackdoor.models.wrappers import StampAndRelabel
from antibackdoor.precision import PLAIN, resolve_precision
from antibackdoor.training import Batch

pytestmark = pytest.mark.usefixtures("one_thread")

#: every augmentation of the defensive copies off: what the model sees is the stamped pool image itself
NO_AUG = DefensiveAugment(scale_p=0.0, noise_p=0.0, rotate_p=0.0, crop=0, flip=False)
#: one epoch of everything (tiny data: 240 training images of 16 x 16, 4 classes)
FAST = ["--model", "cnn-small", "--ra-samples", "4", "--defense-param", "train.epochs=1",
        "--defense-param", "train.batch_size=64"]


# -- the pieces --------------------------------------------------------------------------------------------------------
def test_label_map_is_the_shift_modulo_the_classes():
    assert label_map(4, 1) == [1, 2, 3, 0]
    assert label_map(4, 3) == [3, 0, 1, 2]
    assert label_map(10, 1)[9] == 0


def test_trigger_masks_are_the_authors_three_shapes():
    square = DefensiveTrigger(shape="square", size=2).mask(5, 5)[0, 0]
    assert square.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0] * 5, [0] * 5, [0] * 5]
    frame = DefensiveTrigger(shape="frame", size=1).mask(4, 4)[0, 0]
    assert frame.tolist() == [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]
    # every second pixel of each side (rows/columns 0, 2, 4 of a 6-pixel side), as the authors' type 2
    dotted = DefensiveTrigger(shape="dotted-frame", size=1).mask(6, 6)[0, 0].int().tolist()
    assert dotted == [[1, 0, 1, 0, 1, 1], [0] * 6, [1, 0, 0, 0, 0, 1], [0] * 6, [1, 0, 0, 0, 0, 1],
                      [1, 0, 1, 0, 1, 0]]
    pattern = DefensiveTrigger(value=2.0).pattern(3, 5, 5)
    assert pattern.shape == (1, 3, 5, 5) and bool((pattern == 2.0).all())
    with pytest.raises(ConfigError, match="trigger.size: a square of 8 pixels covers the whole 8x8 image"):
        DefensiveTrigger(size=8).check_fits(8, 8, "--defense-param trigger")
    with pytest.raises(ConfigError, match="frame of 4 pixels"):
        DefensiveTrigger(shape="frame", size=4).check_fits(8, 8, "--defense-param trigger")
    DefensiveTrigger(size=7).check_fits(8, 8, "--defense-param trigger")


def test_defensive_set_is_the_data_then_frequency_copies_of_the_pool_relabelled_by_h():
    data, pool = tiny_set(n=12, size=8), tiny_set(n=4, size=8, seed=1)
    ds = defensive_set(data, pool, frequency=3, shift=1, trigger=DefensiveTrigger(size=2, value=2.0))
    assert len(ds.data) == 12 + 3 * 4 and ds.plain == 12
    assert torch.equal(ds.data.x[:12], data.x) and torch.equal(ds.data.y[:12], data.y)
    for copy in range(3):
        rows = slice(12 + 4 * copy, 12 + 4 * (copy + 1))
        assert torch.equal(ds.data.x[rows], pool.x)  # unstamped: the loss stamps them
        assert torch.equal(ds.data.y[rows], (pool.y + 1) % 4)
    stamped = ds.stamped(torch.arange(4))
    assert bool((stamped[:, :, :2, :2] == 2.0).all())
    outside = ds.mask[0, 0] == 0
    assert torch.equal(stamped[:, :, outside], pool.x.float()[:, :, outside] / 255)


class Spy(nn.Module):
    """Keeps what it was fed; answers with fixed logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.detach().clone()
        return torch.arange(4, dtype=torch.float32).repeat(x.shape[0], 1) * x.mean((1, 2, 3), keepdim=False)[:, None]


def test_the_loss_feeds_data_rows_as_given_and_defensive_rows_stamped():
    data, pool = tiny_set(n=12, size=8), tiny_set(n=4, size=8, seed=1)
    ds = defensive_set(data, pool, frequency=2, shift=1, trigger=DefensiveTrigger(size=3))
    index = torch.tensor([0, 5, 12, 15, 17, 19])  # two data rows, then copies 0 and 1 of pool rows 0, 3, 1, 3
    x = ds.data.x[index].float() / 255  # the loop's view of the batch (its crop/flip off)
    batch = Batch(x, ds.data.y[index], index, None, 0, torch.Generator().manual_seed(0), PLAIN)
    spy = Spy()
    out = pdb_loss(ds, NO_AUG)(spy, batch)
    seen = spy.seen
    assert torch.equal(seen[:2], x[:2])
    assert torch.equal(seen[2:], ds.stamped(torch.tensor([0, 3, 1, 3])))
    assert torch.equal(batch.y[2:], (pool.y[torch.tensor([0, 3, 1, 3])] + 1) % 4)
    ce = F.cross_entropy(out.logits, batch.y, reduction="none")
    assert torch.allclose(out.loss, ce.mean())
    assert torch.allclose(out.parts["loss_plain"], ce[:2].sum() / 6)
    assert torch.allclose(out.parts["loss_plain"] + out.parts["loss_defensive"], out.loss)


def test_defensive_augmentation_scales_and_rotates_the_stamped_image():
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    scaled = DefensiveAugment(scale_p=1.0, scale_min=0.5, noise_p=0.0, rotate_p=0.0, crop=0, flip=False)(
        x, torch.Generator().manual_seed(1))
    ratio = scaled / x  # one factor per image, in [0.5, 1]
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio))
    assert bool(((ratio >= 0.5 - 1e-6) & (ratio <= 1 + 1e-6)).all())
    noisy = DefensiveAugment(scale_p=0.0, noise_p=1.0, noise_std=0.1, rotate_p=0.0, crop=0, flip=False)(
        x, torch.Generator().manual_seed(1))
    assert not torch.equal(noisy, x)
    assert torch.equal(NO_AUG(x, torch.Generator().manual_seed(1)), x)
    # a quarter turn is a quarter turn (nearest pixel), no turn leaves the image as it is
    img = torch.arange(25.0).view(1, 1, 5, 5)
    assert torch.equal(rotate(img, torch.tensor([math.pi / 2])), torch.rot90(img, 1, (2, 3)))
    assert torch.equal(rotate(img, torch.tensor([0.0])), img)


def test_least_suspicious_takes_each_class_lowest_eligible_samples():
    suspicion = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.3, 0.0, 0.8, 0.4, 0.7, 0.6])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 2])
    eligible = torch.tensor([1, 1, 1, 0, 1, 0, 1, 1, 1, 1]).bool()
    chosen = least_suspicious(suspicion, labels, eligible, per_class=2, num_classes=3)
    # class 0: 0.1 and 0.5 (0.2 is not eligible); class 1: 0.3 and 0.4 (0.0 is not eligible); class 2: its one
    assert chosen.nonzero().squeeze(1).tolist() == [1, 2, 4, 7, 9]
    ties = least_suspicious(torch.zeros(6), torch.tensor([0, 1, 0, 1, 0, 1]), torch.ones(6).bool(), 2, 2)
    assert ties.nonzero().squeeze(1).tolist() == [0, 1, 2, 3]  # ties in index order


# -- the defenses ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pdb", "pdb-iso"])
def test_both_presets_resolve_a_run_and_the_paper_one_is_the_authors_recipe(tmp_path, tiny_npz, name):
    from antibackdoor.experiment import Experiment, make_config

    resolved = {}
    for preset in ("quick", "paper"):
        cfg = make_config({"dataset": f"npz:{tiny_npz}", "defense": name, "preset": preset,
                           "out": str(tmp_path / "runs")})
        resolved[preset] = Experiment(cfg).resolve()
    quick, paper = (resolved[p].defense.params for p in ("quick", "paper"))
    assert (paper.train.optimizer, paper.train.lr, paper.train.epochs, paper.train.batch_size) == \
        ("sgd", 0.01, 100, 256)
    assert quick.train != paper.train and quick.frequency == paper.frequency == 5
    assert resolved["quick"].model == "cnn" and resolved["quick"].run_id() != resolved["paper"].run_id()
    assert ab.DEFENSES[name].label == {"pdb": "PDB (trusted)", "pdb-iso": "PDB-iso (no clean data)"}[name]
    assert not (tmp_path / "runs").exists()  # resolving writes nothing


def test_pdb_without_a_trusted_slice_fails_clearly():
    pdb = ab.get_defense("pdb", "quick", {"train": {"epochs": 0}})
    with pytest.raises(ConfigError, match="needs a trusted slice"):
        pdb.run(tiny_set(), ab.DefenseContext(ab.model_factory("cnn-small", tiny_set())))
    assert pdb.needs_trusted and pdb.trusted_fraction() == 0.1
    assert not ab.get_defense("pdb-iso").needs_trusted


def test_pdb_trains_on_the_data_the_trusted_slice_and_its_defensive_copies(tmp_path, train_calls):
    path = write_npz(tmp_path / "tiny.npz")
    params = {"train": {"epochs": 1, "batch_size": 64}}
    r = run_experiment({"dataset": f"npz:{path}", "attack": "badnets", "defense": "pdb", "model": "cnn-small",
                        "out": str(tmp_path / "runs"), "defense_params": params, "eval": {"ra_samples": 4}})
    m, d = r.metrics, r.run_dir
    trusted = json.loads((d / "trusted.json").read_text())
    index = np.array(trusted["index"])
    assert len(index) == m["trusted_size"] == 24  # 10 % of 60 per class
    (call,) = [c for c in train_calls if c.stage == "pdb"]
    n = m["train_size"]
    assert n == 216 and len(call.data) == n + 24 + 5 * 24
    # the trusted images (clean, true labels) join the data, then five copies of them labelled h(y) = y + 1
    raw = np.load(path)
    clean = torch.from_numpy(raw["x_train"][index]).permute(0, 3, 1, 2)
    truth = torch.from_numpy(raw["y_train"][index])
    assert torch.equal(call.data.x[n:n + 24], clean) and torch.equal(call.data.y[n:n + 24], truth)
    for copy in range(5):
        rows = slice(n + 24 * (copy + 1), n + 24 * (copy + 2))
        assert torch.equal(call.data.x[rows], clean) and torch.equal(call.data.y[rows], (truth + 1) % 4)
    assert m["defense_info"]["pool"] == 24 and m["defense_info"]["label_map"] == [1, 2, 3, 0]
    # the run's model is the wrapped one: what it measured is what load_model gives back
    model = ab.load_model(d / "model.safetensors")
    assert isinstance(model, StampAndRelabel) and model.label_map.tolist() == [1, 2, 3, 0]
    assert bool((model.pattern == 2.0).all()) and int(model.mask.sum()) == 49  # 7 x 7, top-left
    assert model.mask[0, 0, :7, :7].sum() == 49
    test = ab.load_dataset(f"npz:{path}").test
    assert ab.accuracy(model, test, precision=resolve_precision("fp32", "cpu")) == m["acc"]


def test_pdb_iso_pools_the_least_suspicious_agreeing_samples_of_each_class(tmp_path, train_calls, capsys):
    path = write_npz(tmp_path / "tiny.npz")
    out = tmp_path / "runs"
    args = ["run", "--dataset", f"npz:{path}", "--defense", "pdb-iso", "--out", str(out), *FAST,
            "--defense-param", "detector_params.model.epochs=1"]
    assert main(args) == 0
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    for name in ("config.yaml", "metrics.json", "model.safetensors", "isolation.csv", "history.json",
                 "scores_hist.png"):
        assert (d / name).is_file(), name
    m = json.loads((d / "metrics.json").read_text())
    rows = list(csv.DictReader(open(d / "isolation.csv")))
    score = [float(r["aibd_k_amplified"]) for r in rows]  # aibd-flip: a low (amplified) flip count is the least
    # suspicious
    pooled = np.array([r["defensive"] == "1" for r in rows])
    agrees = np.array([r["agrees"] == "1" for r in rows])
    (call,) = [c for c in train_calls if c.stage == "pdb"]
    plain = call.data.y[:240]
    assert pooled.sum() == m["defense_info"]["pool"] == m["sample_flags"]["defensive"]["samples"]
    assert not (pooled & ~agrees).any() and m["defense_info"]["eligible"] == agrees.sum()
    for c in range(4):
        in_class = (plain.numpy() == c) & agrees
        assert pooled[plain.numpy() == c].sum() == min(6, in_class.sum())  # int(240 * 0.1 / 4) a class
        chosen = [s for s, p, a in zip(score, pooled, in_class, strict=True) if p and a]
        others = [s for s, p, a in zip(score, pooled, in_class, strict=True) if a and not p]
        assert not others or max(chosen) <= min(others)
    # the defensive copies are the pooled samples of the data as given, labelled h(observed label)
    k = int(pooled.sum())
    assert len(call.data) == 240 + 5 * k
    idx = torch.from_numpy(np.flatnonzero(pooled))
    assert torch.equal(call.data.x[240:240 + k], call.data.x[idx])
    assert torch.equal(call.data.y[240:240 + k], (plain[idx] + 1) % 4)
    model = ab.load_model(d / "model.safetensors")
    assert isinstance(model, StampAndRelabel) and model.wrapper == "stamp-relabel"
    assert ab.accuracy(model, ab.load_dataset(f"npz:{path}").test, precision=resolve_precision("fp32", "cpu")) == \
        m["acc"]


def test_defend_pdb_needs_trusted_data_and_uses_it(tmp_path, capsys):
    path = write_npz(tmp_path / "tiny.npz")
    clean = write_npz(tmp_path / "clean.npz", n_train=40, seed=3)
    out = tmp_path / "runs"
    args = ["defend", f"npz:{path}", "--defense", "pdb", "--out", str(out), *FAST]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[antibackdoor]")]
    assert err == ["antibackdoor: error: --defense pdb: needs trusted clean data; pass --trusted DATA"]
    assert main([*args, "--trusted", f"npz:{clean}"]) == 0
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    m = json.loads((d / "metrics.json").read_text())
    assert m["defense_info"]["pool"] == 40 and m["defense_info"]["pool_per_class"] == [10, 10, 10, 10]
    model = ab.load_model(d / "model.safetensors")
    assert isinstance(model, StampAndRelabel) and model.metadata["defense"] == "pdb"


@pytest.mark.parametrize("defense, extra, message", [
    ("pdb", ["shift=0"], "--defense-param shift: 0 must be >= 1"),
    ("pdb", ["frequency=0"], "--defense-param frequency: 0 must be >= 1"),
    ("pdb", ["trusted_fraction=1.5"], "--defense-param trusted_fraction: 1.5 must be in (0, 1)"),
    ("pdb", ["trigger.shape=circle"], "--defense-param trigger.shape: 'circle' is not one of square, frame"),
    ("pdb", ["trigger.size=0"], "--defense-param trigger.size: 0 must be >= 1"),
    ("pdb", ["augment.scale_p=2"], "--defense-param augment.scale_p: 2.0 must be a probability in [0, 1]"),
    ("pdb", ["augment.rotate=-5"], "--defense-param augment.rotate: -5.0 must be >= 0"),
    ("pdb", ["nonsense=1"], "--defense-param nonsense: unknown parameter of defense pdb"),
    ("pdb", ["trigger.colour=1"], "--defense-param trigger: unknown key(s) colour"),
    ("pdb-iso", ["ratio=0"], "--defense-param ratio: 0.0 must be in (0, 1]"),
    ("pdb-iso", ["ratio=1.5"], "--defense-param ratio: 1.5 must be in (0, 1]"),
    ("pdb-iso", ["detector=nope"], "nope"),
    ("pdb-iso", ["detector_params.rule.kind=bogus"], "detector_params.rule.kind: 'bogus' is not one of"),
])
def test_bad_parameters_exit_2_before_a_run_directory_exists(tmp_path, tiny_npz, capsys, defense, extra, message):
    out = tmp_path / "runs"
    args = ["run", "--dataset", f"npz:{tiny_npz}", "--defense", defense, "--out", str(out), *FAST,
            *(a for e in extra for a in ("--defense-param", e))]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("[antibackdoor]")]
    assert len(lines) == 1 and lines[0].startswith("antibackdoor: error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("command, defense, extra, message", [
    ("run", "pdb", ["trigger.size=16"],
     "--defense-param trigger.size: a square of 16 pixels covers the whole 16x16 image"),
    ("run", "pdb", ["trigger.shape=frame", "trigger.size=8"], "--defense-param trigger.size: a frame of 8 pixels"),
    ("run", "pdb", ["shift=4"], "--defense-param shift: 4 is a multiple of the 4 classes"),
    ("run", "pdb-iso", ["shift=8"], "--defense-param shift: 8 is a multiple of the 4 classes"),
    ("run", "pdb-iso", ["ratio=0.01"], "--defense-param ratio: 0.01 of 240 samples leaves no defensive sample"),
    ("defend", "pdb-iso", ["trigger.size=20"], "--defense-param trigger.size: a square of 20 pixels covers"),
    ("defend", "pdb", ["shift=12"], "--defense-param shift: 12 is a multiple of the 4 classes"),
])
def test_settings_that_do_not_fit_the_data_exit_2_before_a_run_directory_exists(tmp_path, tiny_npz, capsys,
                                                                                 command, defense, extra, message):
    out = tmp_path / "runs"
    data = ["--dataset", f"npz:{tiny_npz}"] if command == "run" else [f"npz:{tiny_npz}", "--trusted",
                                                                       f"npz:{tiny_npz}"]
    args = [command, *data, "--defense", defense, "--out", str(out), *FAST,
            *(a for e in extra for a in ("--defense-param", e))]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("[antibackdoor]")]
    assert len(lines) == 1 and lines[0].startswith("antibackdoor: error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


# -- every kind of data: grey folders, 43 classes, the bench -------------------------------------------------------
def grey_folder(root, per_class: int = 15, classes: int = 4, size: int = 12):
    """Class folders of grey PNGs (a 1-channel data set given as files, as a user's own data arrive)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(img, mode="L").save(root / f"c{c}" / f"{i:03d}.png")
    return root


def test_defend_runs_both_forms_on_a_grey_folder(tmp_path, capsys):
    root = grey_folder(tmp_path / "data")
    trusted = write_npz(tmp_path / "trusted.npz", n_train=8, n_test=4, size=12, seed=5,
                        x_train=np.random.default_rng(5).integers(0, 256, (8, 12, 12), dtype=np.uint8),
                        x_test=np.zeros((4, 12, 12), np.uint8))
    out = tmp_path / "runs"
    fast = [*FAST, "--holdout", "0.2"]
    assert main(["defend", f"folder:{root}", "--defense", "pdb", "--trusted", f"npz:{trusted}", "--out", str(out),
                 *fast]) == 0
    assert main(["defend", f"folder:{root}", "--defense", "pdb-iso", "--out", str(out), *fast,
                 "--defense-param", "detector_params.model.epochs=1", "--defense-param", "ratio=1"]) == 0
    runs = {json.loads((d / "metrics.json").read_text())["defense_info"].get("detector", "trusted"): d
            for d in out.iterdir() if d.is_dir()}
    assert set(runs) == {"trusted", "aibd-flip"}
    for d in runs.values():
        model = ab.load_model(d / "model.safetensors")
        assert isinstance(model, StampAndRelabel) and tuple(model.pattern.shape) == (1, 1, 12, 12)
        assert model.label_map.tolist() == [1, 2, 3, 0]
        rows = list(csv.DictReader(open(d / "suspicious.csv")))
        assert len(rows) == 48  # 80 % of 60 files inspected, 20 % held out for the evaluation
        assert (d / "report.md").is_file()
        with torch.no_grad():  # the deployed model answers on grey images in [0, 1], one class each
            assert model(torch.rand(3, 1, 12, 12)).shape == (3, 4)
    m = json.loads((runs["trusted"] / "metrics.json").read_text())
    assert m["defense_info"]["pool"] == 8 and m["defense_info"]["pool_per_class"] == [2, 2, 2, 2]
    iso = json.loads((runs["aibd-flip"] / "metrics.json").read_text())["defense_info"]
    # ratio 1: a class's share is int(48 / 4) = 12 samples, all its inspected ones: the pool is every sample the
    # suspect model agrees with
    assert iso["pool"] == iso["eligible"]
    rows = list(csv.DictReader(open(runs["aibd-flip"] / "suspicious.csv")))
    assert sum(r["defensive"] == "yes" for r in rows) == iso["pool"]
    assert not any(r["defensive"] == "yes" and r["agrees"] == "no" for r in rows)


def test_pdb_maps_43_classes(tmp_path, train_calls):
    """A GTSRB-sized label map: h(y) = (y + 1) mod 43 on the trusted copies, undone by the saved model."""
    k = 43
    path = write_npz(tmp_path / "k43.npz", n_train=20 * k, n_test=2 * k, classes=k)
    params = {"train": {"epochs": 1, "batch_size": 128}, "shift": 5}
    r = run_experiment({"dataset": f"npz:{path}", "attack": "badnets", "defense": "pdb", "model": "cnn-small",
                        "out": str(tmp_path / "runs"), "defense_params": params, "eval": {"ra_samples": 4}})
    (call,) = [c for c in train_calls if c.stage == "pdb"]
    n, t = r.metrics["train_size"], r.metrics["trusted_size"]
    truth = call.data.y[n:n + t]
    assert torch.equal(call.data.y[n + t:n + 2 * t], (truth + 5) % k)
    model = ab.load_model(r.run_dir / "model.safetensors")
    assert model.label_map.tolist() == [(c + 5) % k for c in range(k)]
    test = ab.load_dataset(f"npz:{path}").test
    assert ab.accuracy(model, test, precision=resolve_precision("fp32", "cpu")) == r.metrics["acc"]


@pytest.mark.slow
def test_bench_runs_both_forms(tmp_path, capsys):
    import yaml

    npz = write_npz(tmp_path / "tiny.npz")
    fast = {"train": {"epochs": 1, "batch_size": 64}}
    grid = {"name": "pdb", "datasets": [f"npz:{npz}"], "attacks": ["badnets"], "models": ["cnn-small"],
            "defenses": [{"name": "pdb", "params": fast},
                         {"name": "pdb-iso", "params": {**fast, "detector_params": {"model": {"epochs": 1}}}}],
            "targets": [1], "eval": {"ra_steps": 1, "ra_samples": 4}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    code = main(["bench", str(path), "--out", str(out), "--no-stage-cache"])
    err = capsys.readouterr().err
    assert code == 0, err
    runs = sorted((out / "runs").glob("*/metrics.json"))
    assert len(runs) == 2
    for m in runs:
        model = ab.load_model(m.parent / "model.safetensors")
        assert isinstance(model, StampAndRelabel) and json.loads(m.read_text())["acc"] is not None
