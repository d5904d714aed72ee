"""A-ABL-PDB: the adversary of its final training never touches the defensive trigger and moves everything else
within its budget, the trigger's place is tracked through the augmentation, the pool is each class's most trusted
samples among those both models agree with, the trust is the loss difference it names, and the defense runs end to
end through ``run``, ``defend`` and ``bench`` on tiny data (one epoch: nothing here depends on how well anything
trained)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_set, write_npz
from torch import nn

import antibackdoor as ab
from antibackdoor.adversarial.pgd import PGDConfig
from antibackdoor.cli import main
from antibackdoor.models.wrappers import StampAndRelabel
from antibackdoor.precision import PLAIN, resolve_precision
from antibackdoor.stages import DefenseContext
from antibackdoor.stages.defensive import DefensiveAugment, DefensiveTrigger, defensive_set, pdb_loss
from antibackdoor.training import Batch

pytestmark = pytest.mark.usefixtures("one_thread")

NO_AUG = DefensiveAugment(scale_p=0.0, noise_p=0.0, rotate_p=0.0, crop=0, flip=False)
EPS = 8 / 255
#: one epoch of every training stage (tiny data: 240 training images of 16 x 16, 4 classes)
FAST = ["--model", "cnn-small", "--ra-samples", "4", "--defense-param", "naive.epochs=1",
        "--defense-param", "final.epochs=1", "--defense-param", "final.batch_size=64"]


class Recorder(nn.Module):
    """A linear classifier that keeps every batch it is fed (the adversary's and the loss's)."""

    def __init__(self, pixels: int, classes: int = 4):
        super().__init__()
        self.lin = nn.Linear(pixels, classes)
        torch.nn.init.normal_(self.lin.weight, generator=torch.Generator().manual_seed(0))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.lin(x.flatten(1))


# -- the pieces --------------------------------------------------------------------------------------------------------
def test_the_adversary_moves_every_pixel_but_the_defensive_trigger():
    data, pool = tiny_set(n=12, size=8), tiny_set(n=4, size=8, seed=1)
    trigger = DefensiveTrigger(size=3)
    ds = defensive_set(data, pool, frequency=2, shift=1, trigger=trigger)
    index = torch.tensor([0, 5, 12, 15, 17, 19])  # two data rows, then copies of pool rows 0, 3, 1, 3
    x = ds.data.x[index].float() / 255
    batch = Batch(x, ds.data.y[index], index, None, 0, torch.Generator().manual_seed(0), PLAIN)
    adversary = PGDConfig(eps=EPS, step=EPS / 2, steps=2)
    model = Recorder(3 * 8 * 8)
    out = pdb_loss(ds, NO_AUG, adversary)(model, batch)
    final = model.seen[-1]
    stamped = ds.stamped(torch.tensor([0, 3, 1, 3]))
    clean = torch.cat([x[:2], stamped])
    mask = trigger.mask(8, 8).bool().expand(4, 3, 8, 8)
    # the trigger's pixels hold the stamped value 2.0 in every batch the model saw (the adversary's too)
    for seen in model.seen:
        assert torch.equal(seen[2:][mask], stamped[mask])
    assert bool((final[2:][mask] == 2.0).all())
    # every other pixel lies within the budget of the clean view, in [0, 1], and the adversary moved them
    off = torch.cat([torch.ones(2, 3, 8, 8, dtype=torch.bool), ~mask])
    assert float((final - clean)[off].abs().max()) <= EPS + 1e-6
    assert bool(((final[off] >= 0) & (final[off] <= 1)).all())
    assert float((final - clean)[off].abs().mean()) > EPS / 4
    assert len(model.seen) == adversary.steps + 1  # the attack's steps, then the loss's forward pass
    ce = F.cross_entropy(model.lin(final.flatten(1)), batch.y, reduction="none")
    assert torch.allclose(out.loss, ce.mean())


def test_without_an_adversary_the_loss_is_pdbs():
    data, pool = tiny_set(n=12, size=8), tiny_set(n=4, size=8, seed=1)
    ds = defensive_set(data, pool, frequency=2, shift=1, trigger=DefensiveTrigger(size=3))
    index = torch.tensor([1, 13, 16])
    x = ds.data.x[index].float() / 255
    batch = Batch(x, ds.data.y[index], index, None, 0, torch.Generator().manual_seed(0), PLAIN)
    model = Recorder(3 * 8 * 8)
    pdb_loss(ds, NO_AUG)(model, batch)
    (seen,) = model.seen
    assert torch.equal(seen[0], x[0]) and torch.equal(seen[1:], ds.stamped(torch.tensor([1, 0])))


def test_the_trigger_is_tracked_through_scaling_rotation_crop_and_flip():
    g = torch.Generator().manual_seed(3)
    trigger = DefensiveTrigger(size=4)
    images = torch.rand(32, 3, 16, 16, generator=g)  # in [0, 1): only the trigger is above 1
    mask = trigger.mask(16, 16)
    stamped = images * (1 - mask) + trigger.pattern(3, 16, 16) * mask
    aug = DefensiveAugment(scale_p=1.0, scale_min=0.6, rotate=30, rotate_p=1.0, crop=4, flip=True)
    views, marks = aug.with_trigger(stamped, mask, torch.Generator().manual_seed(1))
    assert views.shape == stamped.shape and marks.shape == (32, 1, 16, 16) and marks.dtype == torch.bool
    assert torch.equal(marks.expand_as(views), views > 1.0)  # the trigger, scaled by >= 0.6, is all that exceeds 1
    moved = marks[:, 0].flatten(1).float().argmax(1)
    assert len(set(moved.tolist())) > 1  # the draws moved the trigger around
    # the images themselves are the draws the augmentation makes without the mask channel's company
    plain = aug(stamped, torch.Generator().manual_seed(1))
    assert torch.equal(plain > 1.0, views > 1.0)


def test_trust_is_the_loss_the_ranking_names():
    data = tiny_set(n=16, size=8)
    naive, robust = Recorder(3 * 8 * 8), Recorder(3 * 8 * 8)
    torch.nn.init.normal_(robust.lin.weight, generator=torch.Generator().manual_seed(1))
    ctx = DefenseContext(lambda: naive, precision=PLAIN)
    x = data.x.float() / 255
    with torch.no_grad():
        ln = F.cross_entropy(naive.lin(x.flatten(1)), data.y, reduction="none").double()
        lr = F.cross_entropy(robust.lin(x.flatten(1)), data.y, reduction="none").double()
    expected = {"loss-gain": ln - lr, "robust-loss": -lr, "naive-loss": ln}
    for rank, want in expected.items():
        d = ab.get_defense("a-abl-pdb", "quick", {"pool_rank": rank})
        assert torch.allclose(d.trust(naive, robust, data, ctx), want, atol=1e-5), rank


# -- end to end --------------------------------------------------------------------------------------------------------
def test_run_pools_each_class_most_trusted_agreeing_samples_and_deploys_the_wrapper(tmp_path, train_calls):
    path = write_npz(tmp_path / "tiny.npz")
    out = tmp_path / "runs"
    assert main(["run", "--dataset", f"npz:{path}", "--attack", "badnets", "--defense", "a-abl-pdb",
                 "--out", str(out), *FAST]) == 0
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    m = json.loads((d / "metrics.json").read_text())
    info = m["defense_info"]
    rows = list(csv.DictReader(open(d / "isolation.csv")))
    kept = np.array([r["kept"] == "1" for r in rows])
    pooled = np.array([r["defensive"] == "1" for r in rows])
    purged = np.array([r.get("purged") == "1" for r in rows])
    assert pooled.sum() == info["pool"] and not (pooled & ~kept).any() and not (pooled & purged).any()
    assert info["pool"] <= info["eligible"] and info["trained_on"] == int((kept & ~purged).sum())
    # the stages: naive on everything, the robust model on the kept samples, then the defended training on what is
    # left plus two copies of the pool (the default), labelled h(y) = y + 1 mod 4, with the adversary in the loss
    stages = [c.stage for c in train_calls]
    assert stages[:2] == ["naive", "adv_train"] and stages[-1] == "defended"
    (call,) = [c for c in train_calls if c.stage == "defended"]
    left, k = info["trained_on"], int(pooled.sum())
    assert info["frequency"] == 2 and len(call.data) == left + 2 * k
    at = torch.searchsorted(torch.from_numpy(np.flatnonzero(kept & ~purged)), torch.from_numpy(np.flatnonzero(pooled)))
    assert torch.equal(call.data.x[left:left + k], call.data.x[:left][at])  # the pool's images as the data hold them
    assert torch.equal(call.data.y[left:left + k], (call.data.y[:left][at] + 1) % 4)
    assert call.cfg.adversary is None  # the loop's own adversary is off: the loss attacks, around the trigger
    model = ab.load_model(d / "model.safetensors")
    assert isinstance(model, StampAndRelabel) and model.label_map.tolist() == [1, 2, 3, 0]
    assert ab.accuracy(model, ab.load_dataset(f"npz:{path}").test, precision=resolve_precision("fp32", "cpu")) == \
        m["acc"]


def test_the_pool_is_each_class_top_of_the_trust_among_the_eligible(tmp_path, monkeypatch):
    """With a known trust (the sample index), every class's pool is its highest-indexed eligible samples."""
    from antibackdoor.defenses.a_abl_pdb import AABLPDB

    monkeypatch.setattr(AABLPDB, "trust", lambda self, naive, robust, data, ctx:
                        torch.arange(len(data), dtype=torch.float64))
    path = write_npz(tmp_path / "tiny.npz")
    out = tmp_path / "runs"
    assert main(["run", "--dataset", f"npz:{path}", "--attack", "none", "--defense", "a-abl-pdb", "--out", str(out),
                 *FAST, "--defense-param", "ratio=0.05"]) == 0
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    rows = list(csv.DictReader(open(d / "isolation.csv")))
    pooled = np.array([r["defensive"] == "1" for r in rows])
    eligible = np.array([r["pool_eligible"] == "1" for r in rows])
    info = json.loads((d / "metrics.json").read_text())["defense_info"]
    assert not (pooled & ~eligible).any() and info["eligible"] == eligible.sum()
    y = np.arange(240) % 4
    for c in range(4):
        chosen, others = np.flatnonzero(pooled & (y == c)), np.flatnonzero(eligible & ~pooled & (y == c))
        assert len(chosen) == min(3, int((eligible & (y == c)).sum()))  # int(240 * 0.05 / 4) a class
        assert len(others) == 0 or chosen.min() > others.max()


@pytest.mark.parametrize("extra, message", [
    (["ratio=0"], "--defense-param ratio: 0.0 must be in (0, 1]"),
    (["frequency=0"], "--defense-param frequency: 0 must be >= 1"),
    (["pool_rank=random"], "pool_rank"),
    (["final.adversary=null"], "--defense-param final.adversary: the final training must be adversarial"),
    (["shift=4"], "--defense-param shift: 4 is a multiple of the 4 classes"),
    (["trigger.size=16"], "--defense-param trigger.size: a square of 16 pixels covers the whole 16x16 image"),
])
def test_bad_settings_exit_2_before_a_run_directory_exists(tmp_path, tiny_npz, capsys, extra, message):
    out = tmp_path / "runs"
    args = ["run", "--dataset", f"npz:{tiny_npz}", "--defense", "a-abl-pdb", "--out", str(out), *FAST,
            *(a for e in extra for a in ("--defense-param", e))]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("[antibackdoor]")]
    assert len(lines) == 1 and lines[0].startswith("antibackdoor: error: ") and message in lines[0], err
    assert not out.exists() or not any(out.iterdir())


def test_a_tiny_pool_share_still_pools_one_sample_a_class(tmp_path, monkeypatch):
    import antibackdoor.defenses.a_abl_pdb as mod

    monkeypatch.setattr(mod, "agrees_with_label", lambda model, data, ctx: torch.ones(len(data), dtype=torch.bool))
    path = write_npz(tmp_path / "tiny.npz")
    out = tmp_path / "runs"
    assert main(["run", "--dataset", f"npz:{path}", "--attack", "none", "--defense", "a-abl-pdb", "--out", str(out),
                 *FAST, "--defense-param", "ratio=0.001"]) == 0  # 240 x 0.001 / 4 rounds to 0: one a class
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    info = json.loads((d / "metrics.json").read_text())["defense_info"]
    assert info["pool_per_class"] == [1, 1, 1, 1] and info["defensive_backdoor"] is True


def test_without_an_eligible_sample_the_robust_model_is_returned(tmp_path, monkeypatch, train_calls):
    """Neither model agreeing with any label leaves no pool: the deployed model would answer at random, so the
    robust model comes back, unwrapped, and the run says so."""
    import antibackdoor.defenses.a_abl_pdb as mod

    monkeypatch.setattr(mod, "agrees_with_label", lambda model, data, ctx: torch.zeros(len(data), dtype=torch.bool))
    path = write_npz(tmp_path / "tiny.npz")
    out = tmp_path / "runs"
    assert main(["run", "--dataset", f"npz:{path}", "--attack", "none", "--defense", "a-abl-pdb", "--out", str(out),
                 *FAST]) == 0
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    info = json.loads((d / "metrics.json").read_text())["defense_info"]
    assert info["defensive_backdoor"] is False and info["eligible"] == 0
    assert "defended" not in [c.stage for c in train_calls]
    assert not isinstance(ab.load_model(d / "model.safetensors"), StampAndRelabel)


def test_defend_runs_it_and_the_report_says_it_was_named(tmp_path, monkeypatch):
    from test_pdb import grey_folder

    import antibackdoor.defenses.a_abl_pdb as mod

    # one epoch of training agrees with few labels; the pool needs some
    monkeypatch.setattr(mod, "agrees_with_label", lambda model, data, ctx: torch.ones(len(data), dtype=torch.bool))
    root = grey_folder(tmp_path / "data", per_class=15)
    out = tmp_path / "runs"
    assert main(["defend", f"folder:{root}", "--defense", "a-abl-pdb", "--out", str(out), *FAST,
                 "--holdout", "0.2"]) == 0
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    m = json.loads((d / "metrics.json").read_text())
    assert m["defense_info"]["defensive_backdoor"] is True and (d / "suspicious.csv").is_file()
    assert isinstance(ab.load_model(d / "model.safetensors"), StampAndRelabel)
    head = (d / "report.md").read_text().split("\n\n")[1]
    assert head.startswith("defense **a-abl-pdb** (quick preset; named with --defense)")
    assert ab.load_model(d / "model.safetensors").image_size == 12


def test_defends_default_says_it_is_the_default(tmp_path):
    from test_pdb import grey_folder

    root = grey_folder(tmp_path / "data", per_class=15)
    out = tmp_path / "runs"
    assert main(["defend", f"folder:{root}", "--out", str(out), "--model", "cnn-small", "--ra-samples", "4",
                 "--defense-param", "naive.epochs=1", "--defense-param", "final.epochs=1", "--holdout", "0.2"]) == 0
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    head = (d / "report.md").read_text().split("\n\n")[1]
    assert head.startswith("defense **a-abl** (quick preset; defend's default:")
