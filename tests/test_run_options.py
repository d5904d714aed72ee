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
