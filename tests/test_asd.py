"""ASD: the split rules on given losses (the class-aware loss-guided seed, the class-agnostic share, the meta-split
on known loss drops), which parameters the virtual update moves, and tiny end-to-end runs through the CLI
(the run directory, the pools per stage, exact resume, bad parameters). Nothing here depends on how well a
short training converges."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from antibackdoor.cli import main
from antibackdoor.defenses import get_defense
from antibackdoor.defenses.asd import (
    QUICK_ASD,
    ASDParams,
    class_aware_split,
    meta_split,
    stage1_count,
    trailing_parameters,
    virtual_update,
)
from antibackdoor.models import build_model
from antibackdoor.models.features import backbone, classifier_head
from antibackdoor.seeding import seeded_rng
from antibackdoor.stages import DefenseContext
from antibackdoor.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

#: 3 epochs, one per stage: seeds only, then the class-agnostic half, then the meta-split half
TINY = {"trusted_fraction": 0.05, "train": {"epochs": 3, "batch_size": 16}, "iterations": 2, "class_aware_until": 1,
        "agnostic_until": 2, "grow_every": 1, "grow_by": 2, "rampup": 3, "meta": {"batch_size": 64}}


def params(**over) -> list[str]:
    flat = []

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat.extend(["--defense-param", f"{prefix}{k}={v}"])
    walk("", {**TINY, **over})
    return flat


def test_class_aware_split_adds_the_lowest_losses_of_each_class_to_the_seed():
    loss = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2, 0.1, 0.8, 0.7, float("nan"), 0.3])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    seeds = torch.zeros(10, dtype=torch.bool)
    seeds[5] = True  # a seed of class 1 with the lowest loss: it is in the pool already and not counted
    assert class_aware_split(loss, labels, seeds, 0, 3).nonzero().squeeze(1).tolist() == [5]
    assert class_aware_split(loss, labels, seeds, 1, 3).nonzero().squeeze(1).tolist() == [1, 4, 5, 7]
    # two per class: class 0's 0.1 and 0.3 (index 9) before its 0.5; class 2's NaN ranks last
    assert class_aware_split(loss, labels, seeds, 2, 3).nonzero().squeeze(1).tolist() == [1, 3, 4, 5, 6, 7, 9]
    # more than a class holds: all of it
    assert class_aware_split(loss, labels, seeds, 9, 3).all()


def test_stage_one_grows_every_few_epochs_and_the_stages_follow_each_other():
    p = ASDParams()  # the paper: 10 more per class every 5 epochs, stages to 60 and 90 of 120
    assert [stage1_count(e, p) for e in (0, 4, 5, 9, 10, 59)] == [0, 0, 10, 10, 20, 110]
    assert [p.phase(e) for e in (0, 59, 60, 89, 90, 119)] == ["class_aware"] * 2 + ["agnostic"] * 2 + ["meta"] * 2
    assert QUICK_ASD.phase(QUICK_ASD.class_aware_until) == "agnostic"


def test_meta_split_keeps_the_samples_whose_loss_drops_least():
    loss = torch.tensor([2.0, 2.0, 1.0, 0.5, 3.0, 1.0])
    after = torch.tensor([0.1, 1.9, 1.0, 0.6, 1.0, 0.2])  # drops 1.9, 0.1, 0, -0.1, 2.0, 0.8
    clean, drop = meta_split(loss, after, 0.5)
    assert torch.allclose(drop, torch.tensor([1.9, 0.1, 0.0, -0.1, 2.0, 0.8], dtype=torch.float64))
    assert clean.nonzero().squeeze(1).tolist() == [1, 2, 3]  # a hard sample (loss 2) that barely moves is clean


def _ids(params) -> set[int]:
    return {id(q) for q in params}


def test_trailing_parameters_are_the_last_stages_and_the_head():
    with seeded_rng(0, "test"):
        cnn = build_model("cnn-small", 4, image_size=16)
        resnet = build_model("resnet18", 10)
    x16, x32 = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 32, 32)
    head = classifier_head(cnn)
    assert _ids(trailing_parameters(cnn, 0, x16)) == _ids(head.parameters())
    last_block = [cnn.backbone.features[12], cnn.backbone.features[13]]  # the 4th conv and its BatchNorm
    assert _ids(trailing_parameters(cnn, 1, x16)) == _ids([*head.parameters()] +
                                                          [q for m in last_block for q in m.parameters()])
    assert _ids(trailing_parameters(cnn, 9, x16)) == _ids(cnn.parameters())
    # the code's choice on a ResNet-18: layer3, layer4 and the linear head
    net = resnet.backbone
    expected = [*net.layers[2].parameters(), *net.layers[3].parameters(), *net.linear.parameters()]
    assert _ids(trailing_parameters(resnet, 2, x32)) == _ids(expected)


def test_the_virtual_update_moves_only_the_trailing_stages_of_a_copy(small_train):
    data = small_train.subset(torch.arange(64))
    ctx = DefenseContext(lambda: build_model("cnn-small", 10), seed=0)
    model = ctx.fresh_model("asd")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = ASDParams(meta=TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=0.015, weight_decay=0.0),
                  meta_stages=1)
    virtual = virtual_update(model, data, p, ctx, epoch=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the model itself is untouched
    old = dict(backbone(model).named_parameters())
    moved = {n for n, q in backbone(virtual).named_parameters() if not torch.equal(q, old[n])}
    assert moved == {"features.12.weight", "features.13.weight", "features.13.bias", "head.weight", "head.bias"}


def _rows(run_dir):
    return list(csv.DictReader(open(run_dir / "isolation.csv")))


def test_asd_end_to_end_through_the_cli(tmp_path, tiny_npz, capsys):
    out = tmp_path / "runs"
    code = main(["run", "--dataset", f"npz:{tiny_npz}", "--model", "cnn-small", "--defense", "asd", "--out", str(out),
                 "--ra-samples", "8", *params()])
    err = capsys.readouterr().err
    assert code == 0, err
    run_dir = next(out.iterdir())
    assert run_dir.name.startswith("tiny.npz-badnets-asd-")
    for name in ("config.yaml", "metrics.json", "model.safetensors", "isolation.csv", "history.json",
                 "scores_hist.png", "trusted.json"):
        assert (run_dir / name).is_file(), name
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["trusted_size"] == 12 and m["train_size"] == 228  # the seed: 3 per class, reserved before poisoning
    epochs = json.loads((run_dir / "history.json").read_text())["epochs"]
    assert [e["phase"] for e in epochs] == ["class_aware", "agnostic", "meta"]
    # epoch 1: the seed alone; then half of the 240 samples (data + seed), counted by the one top-count rule
    assert [e["clean"] for e in epochs] == [12, 120, 120] and epochs[0]["clean_seeds"] == 12
    info = m["defense_info"]
    rows = _rows(run_dir)
    assert len(rows) == 228 and sum(int(r["kept"]) for r in rows) == info["clean"] == 120 - info["clean_seeds_last"]
    assert m["isolated"] == 228 - info["clean"] and info["last_phase"] == "meta"
    # the clean pool at the end of each stage is a column; stage 1's holds no training sample (seed only)
    assert sum(int(r["clean_pool_class_aware"]) for r in rows) == 0
    assert sum(int(r["clean_pool_meta"]) for r in rows) == info["clean"]
    assert "sce_drop" in rows[0] and m["sample_flags"]["clean_pool_agnostic"]["samples"] == \
        sum(int(r["clean_pool_agnostic"]) for r in rows)


def test_asd_resumes_exactly(tmp_path, tiny_npz, monkeypatch):
    from antibackdoor.defenses import asd
    from antibackdoor.experiment import make_config, run_experiment

    base = {"dataset": f"npz:{tiny_npz}", "model": "cnn-small", "defense": "asd", "eval": {"ra_samples": 8},
            "defense_params": TINY}
    ref = run_experiment(make_config({**base, "out": str(tmp_path / "ref")}))
    real = asd.save_checkpoint
    calls = {"n": 0}

    def dying(path, payload):
        real(path, payload)
        calls["n"] += 1
        if calls["n"] == 2:  # after the class-agnostic epoch; the meta-split epoch is redone on resume
            raise KeyboardInterrupt

    monkeypatch.setattr(asd, "save_checkpoint", dying)
    cfg = make_config({**base, "out": str(tmp_path / "run")})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    monkeypatch.setattr(asd, "save_checkpoint", real)
    resumed = run_experiment(cfg, resume=True)
    assert calls["n"] == 2
    for key in ("acc", "asr", "tpr", "fpr", "isolated"):
        assert resumed.metrics[key] == ref.metrics[key], key
    assert torch.equal(resumed.result.kept, ref.result.kept) and torch.equal(resumed.result.scores, ref.result.scores)
    for a, b in zip(resumed.result.model.state_dict().values(), ref.result.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("extra, message", [
    (["--defense-param", "epsilon=1.5"], "--defense-param epsilon: 1.5 must lie in (0, 1)"),
    (["--defense-param", "class_aware_until=5", "--defense-param", "agnostic_until=3"],
     "--defense-param agnostic_until: 3 must be >= class_aware_until (5) >= 0"),
    (["--defense-param", "grow_every=0"], "--defense-param grow_every: 0 must be >= 1"),
    (["--defense-param", "trusted_fraction=0.001"], "leaves class"),
])
def test_bad_parameters_are_one_line_exit_2(tmp_path, tiny_npz, capsys, extra, message):
    code = main(["run", "--dataset", f"npz:{tiny_npz}", "--model", "cnn-small", "--defense", "asd",
                 "--out", str(tmp_path / "runs"), *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("[antibackdoor]")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("antibackdoor: error: ") and message in lines[0], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_presets_and_listing():
    quick, paper = get_defense("asd", "quick"), get_defense("asd", "paper")
    assert quick.needs_trusted and quick.label == "ASD" and quick.assumptions
    assert paper.params.train.epochs == 120 and paper.params.iterations == 1024 and paper.params.epsilon == 0.5
    assert quick.params.train.epochs * quick.params.iterations < paper.params.train.epochs * paper.params.iterations
