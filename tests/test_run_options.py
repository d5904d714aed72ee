"""The options ``run`` and ``defend`` share live once, in RunOptions; the run ids, run directory names and
config.yaml keys of both commands are what they were before (pinned values, computed with the code before
RunOptions existed, so existing run directories and bench caches keep matching)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from antibackdoor.defend import DefendConfig, Defender, make_defend_config
from antibackdoor.errors import ConfigError
from antibackdoor.experiment import Experiment, ExperimentConfig, Resolved, RunOptions, make_config
from antibackdoor.metrics import EvalConfig
from antibackdoor.precision import resolve_precision

SHARED = ("preset", "seed", "eval", "out", "data_root", "device", "precision")


class FixedDefense:
    """Stands in for a built defense: its describe() is fixed, so the pin below does not move when a defense's
    preset changes (which rightly changes run ids); what it pins is the config's part of the id."""

    def describe(self) -> dict:
        return {"name": "a-abl", "epochs": 3}


def fixed_resolved() -> Resolved:
    cfg = ExperimentConfig(dataset="cifar10-mini", attack="none", poison_rate=0.05, target=3, defense="a-abl",
                           defense_params={"epochs": 3}, model="cnn", preset="quick", seed=7,
                           eval=EvalConfig(ra_samples=64), out="/tmp/x", device="cpu", precision="fp32")
    return Resolved(cfg, "cnn", None, FixedDefense(), torch.device("cpu"), resolve_precision("fp32", "cpu"))


def test_run_id_and_directory_of_a_fixed_experiment_are_pinned():
    r = fixed_resolved()
    assert r.run_id() == "2ca33d5758"
    assert str(Experiment(r.config).run_dir(r)) == "/tmp/x/cifar10-mini-none-a-abl-2ca33d5758"


def test_config_yaml_keys_keep_their_order():
    assert list(fixed_resolved().as_dict()) == [
        "dataset", "attack", "attack_params", "poison_rate", "target", "defense", "defense_params", "model",
        "preset", "seed", "eval", "out", "data_root", "device", "precision", "precision_reason",
        "attack_resolved", "defense_resolved"]


def test_defend_run_directory_is_pinned():
    c = DefendConfig("folder:/tmp/data", seed=3, holdout=0.2, device="cpu", precision="fp32")
    d = c.as_dict()
    # defend's own fields first, then the shared ones (preset and seed moved behind export_kept: the run id
    # hashes sorted keys, so only config.yaml's order changed)
    assert list(d) == ["data", "defense", "detector", "defense_params", "model", "trusted", "test", "holdout",
                       "skip_bad_files", "poison_mask", "export_kept", *SHARED]
    assert str(Defender(c).run_dir(d)) == "runs/data-defend-a-abl-87ab0e9c37"


def test_shared_fields_are_declared_once():
    own = {f.name for f in dataclasses.fields(RunOptions)}
    assert tuple(sorted(own)) == tuple(sorted(SHARED))
    for cls in (ExperimentConfig, DefendConfig):
        assert not own & set(cls.__annotations__), cls  # inherited, not declared again
        assert {f.name for f in dataclasses.fields(cls)} >= own


@pytest.mark.parametrize("build", [lambda d: make_config(d), lambda d: make_defend_config({"data": "x", **d})])
@pytest.mark.parametrize("key,value,message", [
    ("preset", "slow", "--preset: 'slow' is not one of quick, paper"),
    ("precision", "fp8", "--precision: 'fp8' is not one of auto, fp32, bf16, fp16"),
])
def test_both_commands_check_the_shared_options_alike(build, key, value, message):
    with pytest.raises(ConfigError) as exc:
        build({key: value})
    assert str(exc.value) == message


# -- one run id, one path ---------------------------------------------------------------------------------------
def test_one_run_id_function_serves_both_commands():
    """runpath.run_id is the one hash: the keys that never change results are left out for every command,
    and a command's own extra keys (defend's export_kept) only for that command."""
    from antibackdoor import runpath

    resolved = fixed_resolved()
    assert runpath.run_id(resolved.as_dict()) == resolved.run_id() == "2ca33d5758"
    base = {"data": "x", "seed": 1}
    rid = runpath.run_id(base)
    assert rid == "a0519849dd"
    noise = {"out": "/elsewhere", "device": "cuda", "data_root": "/d", "precision_reason": "asked"}
    assert runpath.run_id({**base, **noise}) == rid
    assert runpath.run_id({**base, "export_kept": "npz"}) != rid
    assert runpath.run_id({**base, "export_kept": "npz"}, ("export_kept",)) == rid
    assert runpath.run_id({**base, "seed": 2}) != rid


def _imports(module: str) -> set[str]:
    """The modules ``module``'s source imports (relative ones resolved), wherever in the file."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    tree = ast.parse(open(spec.origin).read())
    package = module.rsplit(".", 1)[0] if not spec.origin.endswith("__init__.py") else module
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def test_the_shared_path_sits_below_the_commands_and_the_report_below_the_job():
    """runpath (the shared path) imports no command; defend's report reads the typed setup and findings, not
    the job, so report.py imports nothing of job.py (not even for type checking)."""
    below = _imports("antibackdoor.runpath")
    for higher in ("antibackdoor.experiment", "antibackdoor.defend", "antibackdoor.bench", "antibackdoor.cli",
                   "antibackdoor.report"):
        assert not {m for m in below if m == higher or m.startswith(higher + ".")}, higher
    report = _imports("antibackdoor.defend.report")
    assert not {m for m in report if m.startswith("antibackdoor.defend.job")}, report
    assert {"antibackdoor.defend.prepare.DefendSetup", "antibackdoor.defend.analysis.Findings"} <= report


def test_run_and_defend_go_through_the_one_path(tmp_path, tiny_npz, monkeypatch, capsys):
    """Both commands train, measure and record through runpath.train_and_record; what each writes besides is
    its own. The metrics.json keys (and their order) of both, and defend's config.yaml keys, are pinned."""
    import json

    import yaml

    from antibackdoor import runpath
    from antibackdoor.cli import main

    real = runpath.train_and_record
    seen = []

    def spy(job, run_dir, resume, device, precision):
        inputs = job.inputs

        def recorded():
            inp = inputs()
            seen.append((type(job).__name__, inp))
            return inp

        job.inputs = recorded
        return real(job, run_dir, resume, device, precision)

    monkeypatch.setattr(runpath, "train_and_record", spy)
    tiny = ["--defense", "none", "--model", "cnn-small", "--defense-param", "train.epochs=1", "--ra-samples", "4"]
    assert main(["run", "--dataset", f"npz:{tiny_npz}", "--target", "1", "--out", str(tmp_path / "r"), *tiny]) == 0
    assert main(["defend", f"npz:{tiny_npz}", "--out", str(tmp_path / "d"), *tiny]) == 0
    capsys.readouterr()
    assert [name for name, _ in seen] == ["PoisonedRun", "DefendJob"]
    run_in, defend_in = seen[0][1], seen[1][1]
    # run: the attack's truth as plain inputs (24 poisoned of 240; ASR on the non-target test images with the
    # trigger, labelled with the target); defend: no trigger known, no truth without --poison-mask
    assert int(run_in.poison_mask.sum()) == 24 and len(run_in.triggered) == 45
    assert set(run_in.triggered.y.tolist()) == {1}
    assert defend_in.triggered is None and defend_in.poison_mask is None and len(defend_in.test) == 60
    (run_dir,) = (tmp_path / "r").iterdir()
    (defend_dir,) = (tmp_path / "d").iterdir()
    run_m = json.loads((run_dir / "metrics.json").read_text())
    defend_m = json.loads((defend_dir / "metrics.json").read_text())
    assert list(run_m) == ["model_trained", "acc", "asr", "ra", "ra_attack", "gamma", "rho_vul", "isolated",
                           "isolated_poison", "tpr", "fpr", "poisoned", "train_size", "precision", "defense_info",
                           "time_defense_s", "time_total_s"]
    assert list(defend_m) == ["eval_set", "eval_kind", "acc", "ra", "eval_size", "ra_attack", "train_size",
                              "data_size", "heldout", "isolated", "kept", "bad_files", "bad", "surplus",
                              "verdict", "warnings", "defense_info", "model", "precision", "time_defense_s",
                              "time_total_s"]
    assert run_m["asr"] is not None and run_m["ra_attack"] == defend_m["ra_attack"] == "PGD-10 8/255"
    assert list(yaml.safe_load((defend_dir / "config.yaml").read_text())) == [
        "data", "defense", "detector", "defense_params", "model", "trusted", "test", "holdout", "skip_bad_files",
        "poison_mask", "export_kept", *SHARED, "precision_reason", "defense_resolved", "data_sha", "eval_sha",
        "trusted_sha", "poison_mask_sha", "eval_kind"]
    # the shared files in both, each command's own files in its own directory only
    shared = {"model.safetensors", "history.json", "metrics.json", "status.json", "config.yaml", "log.txt"}
    run_files = {p.name for p in run_dir.iterdir()}
    defend_files = {p.name for p in defend_dir.iterdir()}
    assert shared <= run_files and shared <= defend_files
    assert "isolation.csv" in run_files - defend_files
    assert {"suspicious.csv", "clean_indices.txt", "report.md", "report.html"} <= defend_files - run_files
