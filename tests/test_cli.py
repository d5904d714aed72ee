"""End-to-end runs through the CLI on tiny data, and the handling of bad input."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys

import pytest
import torch
from conftest import write_npz

from antibackdoor.cli import main

TINY = ["--model", "cnn-small", "--defense-param", "naive.epochs=2", "--defense-param", "final.epochs=1",
        "--defense-param", "final.adversary.steps=1"]


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_a_abl_end_to_end(tmp_path, tiny_npz, capsys):
    args = ["run", "--dataset", f"npz:{tiny_npz}", "--out", str(tmp_path / "runs"), "--poison-rate", "0.1",
            "--target", "1", *TINY]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "attack success rate (ASR)" in out and "rho_vul" in out
    run_dir = next((tmp_path / "runs").iterdir())
    assert run_dir.name.startswith("tiny.npz-badnets-a-abl-")
    for name in ("config.yaml", "metrics.json", "model.safetensors", "isolation.csv", "log.txt",
                 "scores_hist.png", "history.json"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("acc", "asr", "ra", "gamma", "rho_vul", "tpr", "fpr"):
        assert key in metrics
    assert 0 <= metrics["acc"] <= 1 and 0 < metrics["gamma"] <= 1
    assert metrics["poisoned"] == 24
    rows = list(csv.DictReader(open(run_dir / "isolation.csv")))
    assert len(rows) == 240 and sum(int(r["is_poison"]) for r in rows) == 24
    kept = sum(int(r["kept"]) for r in rows)
    assert kept == round(metrics["gamma"] * 240)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    # same config again: reused, not retrained
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "reusing finished run" in err


@pytest.fixture(scope="module")
def default_model_run(tmp_path_factory):
    """One tiny run with the model left at its default (cnn), WaNet (cover samples) and RA set to PGD-1 4/255."""
    tmp = tmp_path_factory.mktemp("default_model")
    npz = write_npz(tmp / "tiny.npz")
    cfg = tmp / "exp.yaml"
    cfg.write_text("eval: {ra_eps: 0.0156862745, ra_step: 0.0156862745, ra_steps: 1}\n")
    args = ["run", "--config", str(cfg), "--dataset", f"npz:{npz}", "--out", str(tmp / "runs"), "--attack", "wanet",
            "--defense", "none", "--defense-param", "train.epochs=1", "--attack-param", "cross_ratio=1"]
    code = main(args)
    assert code == 0
    return next((tmp / "runs").iterdir())


def test_weights_describe_themselves(default_model_run):
    """model.safetensors records the resolved model name (it recorded '' for a default model) and what
    build_model needs, so the weights load into the right architecture from the file alone."""
    from safetensors import safe_open

    from antibackdoor.models import build_model

    with safe_open(str(default_model_run / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    assert meta["model"] == "cnn"
    assert (meta["num_classes"], meta["channels"], meta["image_size"]) == ("4", "3", "16")
    assert json.loads(meta["classes"]) == ["0", "1", "2", "3"]
    model = build_model(meta["model"], int(meta["num_classes"]), int(meta["channels"]), int(meta["image_size"]),
                        json.loads(meta["mean"]), json.loads(meta["std"]))
    model.load_state_dict(state, strict=True)
    assert torch.equal(model[0].mean.flatten(), torch.tensor(json.loads(meta["mean"]), dtype=torch.float32))


def test_run_model_loads_with_the_one_reader(default_model_run):
    """run writes its model with the same writer as defend, so load_model rebuilds it from the file alone."""
    import antibackdoor

    model = antibackdoor.load_model(default_model_run / "model.safetensors")
    assert model.architecture == "cnn" and model.classes == ["0", "1", "2", "3"] and not model.training
    assert (model.channels, model.image_size) == (3, 16) and model.metadata["format"] == "antibackdoor-model/1"
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 4)


def test_table_names_the_configured_ra_attack(default_model_run, capsys):
    """The RA row names the attack of the run's eval section (it always said PGD-10 8/255)."""
    from antibackdoor.cli import print_table

    metrics = json.loads((default_model_run / "metrics.json").read_text())
    assert metrics["ra_attack"] == "PGD-1 4/255"
    print_table(metrics, default_model_run)
    out = capsys.readouterr().out
    assert "robust accuracy (RA, PGD-1 4/255)" in out and "PGD-10" not in out


def test_isolation_csv_marks_cover_samples(default_model_run):
    """WaNet's noise-mode samples are ground truth on the poisoned set: a column of isolation.csv."""
    rows = list(csv.DictReader(open(default_model_run / "isolation.csv")))
    poison = [int(r["is_poison"]) for r in rows]
    cover = [int(r["is_cover"]) for r in rows]
    assert sum(poison) == 24 and sum(cover) == 24  # cross_ratio 1
    assert not any(p and c for p, c in zip(poison, cover, strict=True))


def test_config_file_and_flag_override(tmp_path, tiny_npz, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"dataset: npz:{tiny_npz}\nattack: blend\ndefense: none\nmodel: cnn-small\n"
                   "defense_params:\n  train:\n    epochs: 1\nattack_params:\n  alpha: 0.2\n")
    code, out, err = run_cli(["run", "--config", str(cfg), "--out", str(tmp_path / "r"), "--seed", "3", "--json"],
                             capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["gamma"] == 1.0 and metrics["isolated"] == 0
    run_dir = next((tmp_path / "r").iterdir())
    text = (run_dir / "config.yaml").read_text()
    assert "seed: 3" in text and "alpha: 0.2" in text and "name: blend" in text


def test_flags_merge_into_config_file_sections(tmp_path, capsys):
    from antibackdoor.cli import build_parser, config_from_args

    cfg = tmp_path / "exp.yaml"
    cfg.write_text("defense: aibd\ndefense_params:\n  retrain:\n    epochs: 2\n    lr: 0.01\n"
                   "eval: {ra_steps: 3}\n")
    args = build_parser().parse_args(["run", "--config", str(cfg), "--defense-param", "retrain.epochs=4",
                                      "--no-aibd-target-filter", "--ra-samples", "8"])
    data = config_from_args(args)
    # one dotted key replaces one value, not the file's whole section
    assert data["defense_params"] == {"retrain": {"epochs": 4, "lr": 0.01}, "target_filter": False}
    assert data["eval"] == {"ra_steps": 3, "ra_samples": 8}
    # the AIBD-only flag is a deprecated alias: one line names the --defense-param form it stands for
    assert capsys.readouterr().err.splitlines() == [
        "antibackdoor: --no-aibd-target-filter is deprecated; use --defense-param target_filter=false"]
    args = build_parser().parse_args(["run", "--defense", "aibd", "--aibd-target-filter"])
    assert config_from_args(args)["defense_params"] == {"target_filter": True}
    assert "--defense-param target_filter=true" in capsys.readouterr().err
    same = build_parser().parse_args(["run", "--defense", "aibd", "--defense-param", "target_filter=true"])
    assert config_from_args(same) == config_from_args(args)


def test_shared_options_are_declared_once_and_mean_the_same_in_run_and_defend(capsys):
    """run and defend declare the options they share with one helper (one group in --help) and map them to
    config values with one function: the same flags give the same config values in both."""
    from antibackdoor.cli import SHARED_FLAGS, build_parser, config_from_args, defend_config_from_args

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    def shared_group(name):
        (group,) = [g for g in subs[name]._action_groups if g.title == "options shared by run and defend"]
        return [a.option_strings for a in group._group_actions]

    assert shared_group("run") == shared_group("defend")
    assert {f"--{f.replace('_', '-')}" for f in SHARED_FLAGS} <= {o for opts in shared_group("run") for o in opts}
    given = ["--defense", "aibd", "--defense-param", "qs=[0.1]", "--model", "cnn-small", "--preset", "paper",
             "--seed", "4", "--ra-samples", "16", "--data-root", "/data", "--out", "/tmp/o", "--device", "cpu",
             "--precision", "bf16"]
    run = config_from_args(parser.parse_args(["run", *given]))
    defend = defend_config_from_args(parser.parse_args(["defend", "folder:x", *given]))
    assert defend.pop("data") == "folder:x"
    assert run == defend == {"defense": "aibd", "defense_params": {"qs": [0.1]}, "model": "cnn-small",
                             "preset": "paper", "seed": 4, "eval": {"ra_samples": 16}, "data_root": "/data",
                             "out": "/tmp/o", "device": "cpu", "precision": "bf16"}
    # the AIBD-only flag is gone from the help (its --defense-param form is the one documented)
    subs["run"].print_help()
    assert "aibd-target-filter" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--poison-rate", "1.5"], "--poison-rate 1.5: must lie in (0, 1)"),
        (["--target", "7"], "--target 7: must be a class index in [0, 4)"),
        (["--attack", "nope"], "unknown attack 'nope'"),
        (["--defense", "nope"], "unknown defense 'nope'"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--defense-param", "naive.epochz=3"], "unknown key(s) epochz"),
        (["--defense-param", "naive.epochs=three"], "expected an integer"),
        (["--aibd-target-filter"], "--aibd-target-filter: only for --defense aibd"),
        # typed attack parameters, checked before anything runs (a ValueError traceback from blend.py and a
        # 'failed' run directory before)
        (["--attack", "blend", "--attack-param", "alpha=abc"], "--attack-param alpha: expected a number, got 'abc'"),
        (["--attack", "blend", "--attack-param", "alpha=1.5"], "--attack-param alpha: 1.5 must lie in [0, 1]"),
        (["--attack-param", "sise=3"], "--attack-param sise: unknown parameter of attack badnets; known: margin, "),
        (["--attack", "trojan", "--attack-param", "corner=middle"],
         "--attack-param corner: 'middle' is not one of bottom-right, bottom-left, top-right, top-left"),
        (["--attack", "blend", "--attack-param", "pattern_file=/nonexistent.png"],
         "--attack-param pattern_file: /nonexistent.png: no such file"),
        (["--attack", "clb", "--attack-param", "robust_model=nope"], "--attack-param robust_model: unknown model"),
        (["--device", "nonsense"], "--device: 'nonsense' is not a device"),
        (["--poison-rate", "0.001"], "--poison-rate 0.001: selects no sample out of 240"),
        (["--attack", "wanet", "--poison-rate", "0.4"], "--attack-param cross_ratio: attack wanet at --poison-rate 0.4 "
                                                        "needs 96 poisoned + 192 cover samples"),
    ],
)
def test_bad_options_exit_2(tmp_path, tiny_npz, capsys, extra, message):
    args = ["run", "--dataset", f"npz:{tiny_npz}", "--out", str(tmp_path / "runs"), *TINY, *extra]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    # one line naming the option (log lines aside), no traceback
    lines = [line for line in err.splitlines() if not line.startswith("[antibackdoor]")]
    assert len(lines) == 1 and lines[0].startswith("antibackdoor: error: ") and message in lines[0], err
    assert "Traceback" not in err
    # checked before a run directory exists: nothing is left that looks like a run
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_bad_files_exit_2(tmp_path, capsys):
    code, _, err = run_cli(["run", "--dataset", f"npz:{tmp_path / 'missing.npz'}"], capsys)
    assert code == 2 and "missing.npz: no such file" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    code, _, err = run_cli(["run", "--config", str(bad)], capsys)
    assert code == 2 and "bad.yaml: not a readable YAML file" in err
    bad.write_text("datset: cifar10\n")
    code, _, err = run_cli(["run", "--config", str(bad)], capsys)
    assert code == 2 and "unknown key(s) datset" in err
    one_class = write_npz(tmp_path / "one.npz", y_train=__import__("numpy").zeros(240, int))
    code, _, err = run_cli(["run", "--dataset", f"npz:{one_class}", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "no sample of class" in err


def test_nan_training_fails_cleanly_and_is_not_finished(tmp_path, tiny_npz, capsys):
    args = ["run", "--dataset", f"npz:{tiny_npz}", "--out", str(tmp_path / "runs"), "--defense", "none",
            "--model", "cnn-small", "--defense-param", "train.epochs=1", "--defense-param", "train.lr=1e30",
            "--defense-param", "train.optimizer=sgd"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "the loss became" in err
    run_dir = next((tmp_path / "runs").iterdir())
    assert not (run_dir / "metrics.json").exists()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    # a second attempt does not silently mix with the failed run
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "unfinished run (failed)" in err and "--resume" in err


def test_resume_after_kill_gives_identical_metrics(tmp_path, tiny_npz, monkeypatch):
    """Interrupt a run after a few checkpoints, resume it, compare with an uninterrupted run."""
    from antibackdoor import training
    from antibackdoor.experiment import make_config, run_experiment

    base = {"dataset": f"npz:{tiny_npz}", "model": "cnn-small", "attack": "blend",
            "defense_params": {"naive": {"epochs": 3}, "final": {"epochs": 2, "adversary": {"steps": 1}}}}
    ref = run_experiment(make_config({**base, "out": str(tmp_path / "ref")}))

    real_save = training.save_checkpoint
    calls = {"n": 0}

    def dying_save(path, payload):
        real_save(path, payload)
        calls["n"] += 1
        if calls["n"] == 4:  # naive finished, first adversarial epoch checkpointed
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", dying_save)
    cfg = make_config({**base, "out": str(tmp_path / "run")})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    resumed = run_experiment(cfg, resume=True)
    for key in ("acc", "asr", "ra", "gamma", "rho_vul", "tpr", "fpr"):
        assert resumed.metrics[key] == ref.metrics[key], key


@pytest.mark.slow
def test_console_script_and_listing(tmp_path):
    exe = [sys.executable, "-m", "antibackdoor.cli"]
    out = subprocess.run([*exe, "datasets", "--data-root", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0 and "cifar10-mini" in out.stdout and "present" in out.stdout
    out = subprocess.run([*exe, "run", "--poison-rate", "2"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["antibackdoor: error: --poison-rate 2.0: must lie in (0, 1)"]


def _strict(text: str):
    """Parse JSON as a strict parser would: the bare words NaN / Infinity are errors."""
    def bad(token: str):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=bad)


def test_every_json_file_of_a_clean_run_is_strict(tmp_path, tiny_npz, capsys):
    """With --attack none the isolation TPR is undefined: metrics.json says null, not NaN (issue 17)."""
    args = ["run", "--dataset", f"npz:{tiny_npz}", "--out", str(tmp_path / "runs"), "--attack", "none",
            "--defense", "a-abl", "--model", "cnn-small", "--defense-param", "naive.epochs=1",
            "--defense-param", "final.epochs=1", "--json"]
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    run_dir = next((tmp_path / "runs").iterdir())
    files = sorted(run_dir.glob("*.json"))
    assert {p.name for p in files} >= {"metrics.json", "history.json", "status.json"}
    parsed = {p.name: _strict(p.read_text()) for p in files}
    assert parsed["metrics.json"]["tpr"] is None and parsed["metrics.json"]["acc"] is not None
    assert _strict(out[out.index("{"):])["tpr"] is None  # --json output too
