"""examples/a_abl_one_screen.py, A-ABL written out with the library's primitives, is the ``a-abl`` defense's quick
preset: the same settings, and on the same data, seed and precision the same scores, split and final model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import antibackdoor as ab
from antibackdoor.precision import resolve_precision

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "a_abl_one_screen.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def example():
    """The example loaded from its path (examples/ is no package)."""
    spec = importlib.util.spec_from_file_location("a_abl_one_screen", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_settings_are_the_quick_preset(example):
    p = ab.get_defense("a-abl", "quick").params
    assert example.stage_configs(1.0) == (p.naive, p.final)
    assert (example.SPLIT_EPS, example.SPLIT_STEPS, None, "sce") == (p.split_eps, p.split_steps, p.split_step,
                                                                       p.split_loss)
    # the options the example does not write out are off in the quick preset
    assert (p.min_isolated, p.split_log, p.purge, p.takeback_epochs) == (0.0, False, False, 0)
    assert [c.epochs for c in example.stage_configs(0.2)] == [5, 4]


def test_example_splits_and_trains_like_the_defense(example, mini):
    data = ab.get_attack("badnets").poison(mini.train.subset(torch.arange(300)), 0.1, 0, ab.seeded(0)).data
    defense = ab.get_defense("a-abl", "quick", {"naive": {"epochs": 1},
                                                "final": {"epochs": 1, "adversary": {"steps": 1}}})
    fp32, cpu, seed = resolve_precision("fp32"), torch.device("cpu"), 3
    result = defense.run(data, ab.DefenseContext(ab.model_factory("cnn-small", data), seed=seed, precision=fp32))
    model, kept, scores, threshold = example.a_abl(data, defense.params.naive, defense.params.final, "cnn-small",
                                                   seed, cpu, fp32)
    assert 0 < int(result.kept.sum()) < len(data)  # a real split, not the keep-all fallback
    assert torch.equal(kept, result.kept)
    assert torch.equal(scores, result.scores)
    assert threshold == result.info["threshold"]
    # stage 3 starts from the same weights and draws the same batches: the same final model, bit for bit
    ours, theirs = model.state_dict(), result.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_example_main_runs_and_writes_its_results(example, tmp_path, capsys):
    out = tmp_path / "result.json"
    example.main(["--epochs", "0.01", "--limit", "120", "--model", "cnn-small", "--target", "2", "--seed", "1",
                  "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["args"]["target"] == 2 and written["precision"] == "fp32"
    assert written["isolated"] + round(written["gamma"] * 120) == 120
    assert {"acc", "asr", "ra", "threshold", "tpr", "fpr", "rho_vul"} <= written.keys()
    assert "acc " in capsys.readouterr().out


def test_example_main_rejects_a_bad_target(example, capsys):
    with pytest.raises(SystemExit) as exc:
        example.main(["--target", "10", "--limit", "40"])
    assert exc.value.code == 2
    assert "--target 10" in capsys.readouterr().err
