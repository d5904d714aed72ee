"""Each baseline end to end through run_experiment on tiny data (1-epoch stages, fp32): the run directory
holds what the defense decided; NAD gets a trusted slice reserved before poisoning."""

from __future__ import annotations

import csv
import json

import pytest

from antibackdoor.cli import main
from antibackdoor.experiment import run_experiment

FAST = {"epochs": 1, "batch_size": 64}
SEP = {"warmup": FAST, "intra": FAST}
PARAMS = {
    "abl": {"isolation": FAST, "finetune": FAST, "unlearn": {**FAST, "batch_size": 2}},
    "nad": {"backdoored": FAST, "teacher": FAST, "student": {**FAST, "batch_size": 4}},
    "cbd": {"backdoored": FAST, "clean": FAST},
    "d-br": {"separation": SEP, "backdoored": FAST, "rounds": {**FAST, "epochs": 2, "batch_size": 8}},
    "d-st": {"separation": SEP, "contrastive": {**FAST, "epochs": 2}, "head": FAST},
}


def run(tmp_path, tiny_npz, defense, **extra):
    cfg = {"dataset": f"npz:{tiny_npz}", "attack": "badnets", "defense": defense, "model": "cnn-small",
           "out": str(tmp_path / "runs"), "defense_params": PARAMS[defense], "eval": {"ra_samples": 8}, **extra}
    return run_experiment(cfg)


def rows(run_dir):
    return list(csv.DictReader(open(run_dir / "isolation.csv")))


@pytest.mark.parametrize("defense", ["abl", "d-br", "d-st"])
def test_isolating_baselines_record_scores_and_isolated_sets(tmp_path, tiny_npz, defense):
    r = run(tmp_path, tiny_npz, defense)
    m, d = r.metrics, r.run_dir
    expected = 2 if defense == "abl" else 12  # 1 % and 5 % of 240 samples
    assert m["isolated"] == expected and 0 <= m["tpr"] <= 1 and 0 <= m["fpr"] <= 1
    table = rows(d)
    assert len(table) == 240 and sum(1 - int(row["kept"]) for row in table) == expected
    score = "isolation_ce" if defense == "abl" else "fct"
    assert score in table[0] and all(row[score] for row in table)
    assert (d / "scores_hist.png").is_file() and (d / "model.safetensors").is_file()
    if defense != "abl":
        sep = json.loads((d / "separation.json").read_text())
        assert [sep[k]["samples"] for k in ("clean", "uncertain", "poisoned")] == [48, 180, 12]
        assert sum(sep[k]["true_poison"] for k in ("clean", "uncertain", "poisoned")) == m["poisoned"]
        assert (d / "fct_scores.png").is_file()
        assert m["defense_info"]["gamma_clean"] <= m["defense_info"]["gamma_poison"]
    history = json.loads((d / "history.json").read_text())
    stages = {"abl": {"isolation", "finetune", "unlearn"}, "d-br": {"sd_warmup", "sd_intra", "backdoored", "removal"},
              "d-st": {"sd_warmup", "sd_intra", "contrastive", "head"}}[defense]
    assert stages <= set(history)


def test_nad_gets_a_trusted_slice_and_logs_attention_losses(tmp_path, tiny_npz):
    r = run(tmp_path, tiny_npz, "nad")
    m, d = r.metrics, r.run_dir
    trusted = json.loads((d / "trusted.json").read_text())
    assert trusted["size"] == m["trusted_size"] == 12 == len(set(trusted["index"]))  # 5 % of 60 per class
    assert sorted(i % 4 for i in trusted["index"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # stratified (y = i % 4)
    assert m["train_size"] == 228 and len(rows(d)) == 228
    assert m["poisoned"] == round(0.1 * 228)
    student = json.loads((d / "history.json").read_text())["student"]
    assert {"at_features.7", "at_features.11", "at_features.14", "ce"} <= set(student[0])
    assert m["defense_info"]["trusted"] == 12
    # the fine-tuning-only ablation: betas 0, no teacher stage
    params = {**PARAMS["nad"], "betas": [0, 0, 0]}
    r0 = run_experiment({"dataset": f"npz:{tiny_npz}", "attack": "badnets", "defense": "nad", "model": "cnn-small",
                         "out": str(tmp_path / "runs"), "defense_params": params, "eval": {"ra_samples": 8}})
    assert r0.metrics["defense_info"]["fine_tuning_only"]
    assert "teacher" not in json.loads((r0.run_dir / "history.json").read_text())


def test_cbd_writes_its_weights_and_their_plot(tmp_path, tiny_npz):
    r = run(tmp_path, tiny_npz, "cbd")
    m, d = r.metrics, r.run_dir
    assert m["isolated"] == 0 and m["defense_info"]["mi"] is True
    table = rows(d)
    weights = [float(row["cbd_weight"]) for row in table]
    assert all(0 <= w <= 1 for w in weights)
    assert (d / "cbd_weights.png").is_file()
    clean = json.loads((d / "history.json").read_text())["clean"][0]
    assert {"weighted_ce", "mi", "disc_estimate"} <= set(clean)
    r2 = run_experiment({"dataset": f"npz:{tiny_npz}", "attack": "none", "defense": "cbd", "model": "cnn-small",
                         "out": str(tmp_path / "runs"), "defense_params": {**PARAMS["cbd"], "mi": False},
                         "eval": {"ra_samples": 8}})
    assert "mi" not in json.loads((r2.run_dir / "history.json").read_text())["clean"][0]


def test_a_trusted_fraction_that_empties_a_class_is_one_line_before_any_run_dir(tmp_path, tiny_npz, capsys):
    out = tmp_path / "runs"
    code = main(["run", "--dataset", f"npz:{tiny_npz}", "--defense", "nad", "--model", "cnn-small", "--out",
                 str(out), "--defense-param", "trusted_fraction=0.001"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "trusted_fraction" in err and "without a trusted sample" in err
    assert not out.exists() or not any(out.iterdir())
