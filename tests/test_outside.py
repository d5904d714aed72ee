"""Data that arrives poisoned (``outside:``): the triggers' pixels pinned, the spec, the data it builds and its
ground truth, and a run with ``--attack none`` on it reporting what a run with an attack reports."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import write_npz

from antibackdoor.cli import main
from antibackdoor.data import load_dataset
from antibackdoor.data.outside import OutsideSpec, own_blend, own_patch, parse_outside
from antibackdoor.errors import ConfigError
from antibackdoor.experiment import outside_truth, run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")

#: sha256 prefixes of the triggers' output, computed with the benchmark code the documented tables used
PINNED = {((2, 32, 32, 3), "own_patch"): "7a24deb5c573659f", ((2, 32, 32, 3), "own_blend"): "3cc881e20db0d9fb",
          ((1, 28, 28, 1), "own_patch"): "8d85c1d906293d73", ((1, 28, 28, 1), "own_blend"): "3716bdb5d79b5a2d",
          ((1, 64, 48, 3), "own_patch"): "cbb40dae7a6edb65", ((1, 64, 48, 3), "own_blend"): "9f93bd7e6034d240"}


@pytest.mark.parametrize("shape,fn", sorted(PINNED))
def test_the_triggers_keep_the_pixels_of_the_documented_tables(shape, fn):
    x = (np.arange(np.prod(shape)) * 7 % 256).astype(np.uint8).reshape(shape)
    out = {"own_patch": own_patch, "own_blend": own_blend}[fn](x)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == PINNED[(shape, fn)]


def test_spec_defaults_options_and_a_base_that_holds_commas():
    assert parse_outside("own-blend") == OutsideSpec("own-blend", 0, 0.1, 0, "cifar10-mini")
    s = parse_outside("own-patch?target=3,rate=0.05,seed=2,base=folder:/d/x?size=32,test=0.2")
    assert s == OutsideSpec("own-patch", 3, 0.05, 2, "folder:/d/x?size=32,test=0.2")
    for bad, word in [("own-plaid", "unknown trigger"), ("own-patch?colour=1", "unknown option"),
                      ("own-patch?rate=0", "rate"), ("own-patch?rate=x", "not a number"),
                      ("own-patch?target=-1", "target"), ("own-patch?base=outside:own-blend", "base")]:
        with pytest.raises(ConfigError, match=word):
            parse_outside(bad)


def test_bad_spec_is_one_line_naming_the_option(tmp_path, capsys):
    code = main(["run", "--dataset", "outside:own-patch?colour=1", "--attack", "none", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("antibackdoor: error: --dataset outside:own-patch?colour=1")
    assert "Traceback" not in err


def test_the_data_holds_the_trigger_where_the_truth_says_and_nowhere_else(tmp_path):
    npz = write_npz(tmp_path / "base.npz")
    base = load_dataset(f"npz:{npz}")
    splits = load_dataset(f"outside:own-patch?target=1,rate=0.2,seed=3,base=npz:{npz}")
    truth = splits.truth
    poison = truth.poison_mask
    assert poison.dtype == torch.bool and int(poison.sum()) == round(0.2 * len(base.train))
    assert not (base.train.y[poison] == 1).any()  # drawn outside the target class
    assert (splits.train.y[poison] == 1).all() and torch.equal(splits.train.y[~poison], base.train.y[~poison])
    assert torch.equal(truth.true_labels, base.train.y)
    assert torch.equal(splits.train.x[~poison], base.train.x[~poison])
    nhwc = base.train.x[poison].permute(0, 2, 3, 1).numpy()
    assert torch.equal(splits.train.x[poison], torch.from_numpy(own_patch(nhwc)).permute(0, 3, 1, 2))
    assert torch.equal(splits.test.x, base.test.x) and torch.equal(splits.test.y, base.test.y)
    keep = base.test.y != 1
    assert len(truth.triggered_test) == int(keep.sum()) and (truth.triggered_test.y == 1).all()
    tx = truth.triggered_test.x.permute(0, 2, 3, 1).numpy()
    assert np.array_equal(tx, own_patch(base.test.x[keep].permute(0, 2, 3, 1).numpy()))
    # normalised like a user's npz holding the same arrays: from its own (poisoned) training images
    as_npz = tmp_path / "same.npz"
    np.savez(as_npz, x_train=splits.train.x.permute(0, 2, 3, 1).numpy(), y_train=splits.train.y.numpy(),
             x_test=splits.test.x.permute(0, 2, 3, 1).numpy(), y_test=splits.test.y.numpy())
    user = load_dataset(f"npz:{as_npz}")
    assert user.train.mean == splits.train.mean and user.train.std == splits.train.std
    assert user.test.mean == splits.test.mean
    # seeded: the same spec draws the same samples, another seed others
    assert torch.equal(load_dataset(f"outside:own-patch?target=1,rate=0.2,seed=3,base=npz:{npz}").truth.poison_mask,
                       poison)
    assert not torch.equal(load_dataset(f"outside:own-patch?target=1,rate=0.2,seed=4,base=npz:{npz}")
                           .truth.poison_mask, poison)


def test_a_target_beyond_the_base_classes_is_refused(tmp_path):
    npz = write_npz(tmp_path / "base.npz")
    with pytest.raises(ConfigError, match="4 classes"):
        load_dataset(f"outside:own-blend?target=4,base=npz:{npz}")


def test_the_truth_leaves_out_a_trusted_slice_and_counts_its_poison(tmp_path):
    npz = write_npz(tmp_path / "base.npz")
    splits = load_dataset(f"outside:own-blend?target=2,base=npz:{npz}")
    poison = splits.truth.poison_mask
    trusted = torch.zeros(len(poison), dtype=torch.bool)
    first = int(poison.nonzero()[0])
    trusted[[first, first + 1 if not poison[first + 1] else first + 2]] = True  # one poisoned, one clean
    train = splits.train.subset(~trusted)
    out = outside_truth(splits.truth, train, trusted)
    assert out.summary == {"trigger": "own-blend", "target": 2, "trusted_poison": 1}
    assert torch.equal(out.poisoned.poison_mask, poison[~trusted]) and out.poisoned.data is train
    assert out.triggered is splits.truth.triggered_test
    assert outside_truth(None, train, trusted) is None
    assert "trusted_poison" not in outside_truth(splits.truth, splits.train, None).summary


def test_a_run_with_attack_none_on_it_reports_what_an_attacked_run_does(tmp_path):
    """TPR/FPR, the flagged poison, AUC and ASR come from the data set's ground truth; the defense never sees it."""
    from antibackdoor.metrics import attack_success_rate
    from antibackdoor.models.io import load_model

    npz = write_npz(tmp_path / "base.npz")
    dataset = f"outside:own-patch?target=1,rate=0.2,base=npz:{npz}"
    cfg = {"dataset": dataset, "attack": "none", "defense": "a-abl", "model": "cnn-small", "precision": "fp32",
           "defense_params": {"naive": {"epochs": 1}, "final": {"epochs": 1, "adversary": {"steps": 1}},
                              "takeback_epochs": 1},
           "eval": {"ra_steps": 1, "ra_samples": 8}, "out": str(tmp_path / "runs")}
    r = run_experiment(cfg)
    m, truth = r.metrics, load_dataset(dataset).truth
    assert m["poisoned"] == int(truth.poison_mask.sum()) == 48
    assert m["truth"] == {"trigger": "own-patch", "target": 1}
    with open(r.run_dir / "isolation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    is_poison = torch.tensor([r_["is_poison"] == "1" for r_ in rows])
    kept = torch.tensor([r_["kept"] == "1" for r_ in rows])
    back = torch.tensor([r_["taken_back"] == "1" for r_ in rows])
    assert torch.equal(is_poison, truth.poison_mask)
    assert m["tpr"] == pytest.approx(float((~kept & is_poison).sum() / is_poison.sum()))
    assert m["isolated_poison"] == int((~kept & is_poison).sum())
    assert m["sample_flags"]["taken_back"] == {"samples": int(back.sum()), "poison": int((back & is_poison).sum())}
    assert 0.0 <= m["auc"] <= 1.0
    model = load_model(r.run_dir / "model.safetensors")
    assert m["asr"] == pytest.approx(attack_success_rate(model, truth.triggered_test))
    json.dumps(m, allow_nan=False)
    # the same data without ground truth (a user's npz of it) is an ordinary clean-attack run: no ASR, no poison
    plain = run_experiment({**cfg, "dataset": f"npz:{npz}"}).metrics
    assert plain["asr"] is None and plain["poisoned"] == 0 and "truth" not in plain
