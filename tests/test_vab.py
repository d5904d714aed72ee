"""VaB: the victim's entropy and its split on given entropies, the suppression of targets by the victim's
prediction on given predictions, and tiny end-to-end runs through the CLI (the run directory, the phases,
exact resume, bad parameters). Nothing here depends on how well a short training converges."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import KnownMargins, known_margin_set

from antibackdoor.cli import main
from antibackdoor.defenses import get_defense
from antibackdoor.defenses.vab import flag_suspects, prediction_entropy, suppress, victim_probabilities
from antibackdoor.precision import PLAIN

pytestmark = pytest.mark.usefixtures("one_thread")

#: 3 beneficiary epochs (the last two semi-supervised), a victim round after each
TINY = {"victim": {"batch_size": 64}, "warmup_thresholds": [0.6], "beneficiary": {"epochs": 3, "batch_size": 32},
        "semi_from": 1, "victim_every": 1, "late_from": 2}


def params(**over) -> list[str]:
    flat = []
    for k, v in {**TINY, **over}.items():
        if isinstance(v, dict):
            flat += [x for kk, vv in v.items() for x in ("--defense-param", f"{k}.{kk}={vv}")]
        else:
            flat += ["--defense-param", f"{k}={json.dumps(v)}"]
    return flat


def test_entropy_of_known_predictions():
    # KnownMargins gives logit m - 0.5 to the written class and 0 to the 3 others
    margins = [1, 3, 5]
    data = known_margin_set(margins, [0, 1, 2], classes=4)
    h = prediction_entropy(KnownMargins(4), data, "cpu", PLAIN)
    for value, m in zip(h.tolist(), margins, strict=True):
        a = m - 0.5
        p = [math.exp(a) / (math.exp(a) + 3)] + [1 / (math.exp(a) + 3)] * 3
        assert value == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-4)
    assert h[0] > h[1] > h[2] > 0  # the more confident, the lower


def test_the_split_reads_a_running_scaled_entropy():
    e = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64)
    suspects, running, scaled = flag_suspects(e, None, 0.75, 0.2)
    assert torch.equal(running, e) and torch.allclose(scaled, torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=torch.float64))
    assert suspects.tolist() == [True, False, False, False]
    # the newest measurement weighs 0.75: sample 3 drops to the bottom, sample 0 rises
    new = torch.tensor([0.9, 0.5, 0.9, 0.0], dtype=torch.float64)
    suspects, running, scaled = flag_suspects(new, running, 0.75, 0.2)
    assert torch.allclose(running, 0.75 * new + 0.25 * e)
    assert suspects.tolist() == [False, False, False, True] and scaled.min() == 0 and scaled.max() == 1
    # no spread: every sample is as suspicious as the least entropic one
    assert flag_suspects(torch.ones(3, dtype=torch.float64), None, 0.75, 0.2)[0].all()


def test_suppression_removes_what_the_victim_predicts():
    target = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    victim = torch.tensor([[0.05, 0.05, 0.85, 0.05], [0.05, 0.05, 0.85, 0.05]])
    out = suppress(target, victim)
    # the pseudo-label toward the suspected target keeps 0.15; a label the victim does not predict keeps 0.95
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 0.15, 0.0], [0.95, 0.0, 0.0, 0.0]]))
    # the victim's prediction is softened by its temperature before it is subtracted
    data = known_margin_set([10, 3], [2, 1], classes=4)
    logits = KnownMargins(4)(data.x.float() / 255)
    probs = victim_probabilities(KnownMargins(4), data.x, 3.0, PLAIN)
    assert torch.allclose(probs, torch.softmax(logits / 3.0, 1)) and probs[0, 2] < torch.softmax(logits, 1)[0, 2]


def _rows(run_dir):
    return list(csv.DictReader(open(run_dir / "isolation.csv")))


def test_vab_end_to_end_through_the_cli(tmp_path, tiny_npz, capsys):
    out = tmp_path / "runs"
    code = main(["run", "--dataset", f"npz:{tiny_npz}", "--model", "cnn-small", "--defense", "vab", "--out", str(out),
                 "--ra-samples", "8", *params()])
    err = capsys.readouterr().err
    assert code == 0, err
    run_dir = next(out.iterdir())
    assert run_dir.name.startswith("tiny.npz-badnets-vab-")
    for name in ("config.yaml", "metrics.json", "model.safetensors", "isolation.csv", "history.json",
                 "scores_hist.png"):
        assert (run_dir / name).is_file(), name
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["train_size"] == 240 and "trusted_size" not in m  # no clean data needed
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["semi"] for e in history["beneficiary"]] == [False, True, True]
    # the victim: warm-up, one warm-up round, then one round after each beneficiary epoch
    splits = history["splits"]
    assert [s["threshold"] for s in splits] == [0.6, 0.2, 0.2, 0.2, 0.2] and splits[0]["trained_on"] == 240
    assert all(s["trained_on"] == prev["suspects"] for prev, s in zip(splits[:-1], splits[1:], strict=True))
    info, rows = m["defense_info"], _rows(run_dir)
    assert len(rows) == 240 and info["suspects"] == splits[-1]["suspects"] == m["isolated"] >= 1
    assert sum(1 - int(r["kept"]) for r in rows) == info["suspects"]
    scores = [float(r["victim_entropy_scaled"]) for r in rows]
    assert min(scores) == 0.0 and max(scores) == 1.0
    assert sum(int(r["suspect_initial"]) for r in rows) == info["suspects_initial"] == splits[1]["suspects"]


def test_vab_resumes_exactly(tmp_path, tiny_npz, monkeypatch):
    from antibackdoor.defenses import vab
    from antibackdoor.experiment import make_config, run_experiment

    base = {"dataset": f"npz:{tiny_npz}", "model": "cnn-small", "defense": "vab", "eval": {"ra_samples": 8},
            "defense_params": TINY}
    ref = run_experiment(make_config({**base, "out": str(tmp_path / "ref")}))
    # isolated exactly where the scaled entropy is at most the threshold
    assert torch.equal(ref.result.kept, ref.result.scores > 0.2)
    real = vab.save_checkpoint
    calls = {"n": 0}

    def dying(path, payload):
        real(path, payload)
        calls["n"] += 1
        if calls["n"] == 3:  # the victim's warm-up and two beneficiary epochs done; the third is redone
            raise KeyboardInterrupt

    monkeypatch.setattr(vab, "save_checkpoint", dying)
    cfg = make_config({**base, "out": str(tmp_path / "run")})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg)
    monkeypatch.setattr(vab, "save_checkpoint", real)
    resumed = run_experiment(cfg, resume=True)
    for key in ("acc", "asr", "tpr", "fpr", "isolated"):
        assert resumed.metrics[key] == ref.metrics[key], key
    assert torch.equal(resumed.result.kept, ref.result.kept) and torch.equal(resumed.result.scores, ref.result.scores)
    for a, b in zip(resumed.result.model.state_dict().values(), ref.result.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed.result.history == ref.result.history


@pytest.mark.parametrize("extra, message", [
    (["--defense-param", "threshold=1.2"], "--defense-param threshold: 1.2 must lie in [0, 1)"),
    (["--defense-param", "mix=patches"], "--defense-param mix: 'patches' is not one of attention, mixup, cutmix, none"),
    (["--defense-param", "semi_from=10", "--defense-param", "late_from=5"],
     "--defense-param late_from: 5 must be >= semi_from (10) >= 0"),
    (["--defense-param", "warmup_thresholds=[0.5,1.5]"], "--defense-param warmup_thresholds: 1.5 must lie in [0, 1)"),
    (["--defense-param", "ema=0"], "must lie in (0, 1]"),
])
def test_bad_parameters_are_one_line_exit_2(tmp_path, tiny_npz, capsys, extra, message):
    code = main(["run", "--dataset", f"npz:{tiny_npz}", "--model", "cnn-small", "--defense", "vab",
                 "--out", str(tmp_path / "runs"), *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("[antibackdoor]")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("antibackdoor: error: ") and message in lines[0], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_presets():
    quick, paper = get_defense("vab", "quick"), get_defense("vab", "paper")
    assert not quick.needs_trusted and quick.label == "VaB" and quick.assumptions
    assert paper.params.beneficiary.epochs == 200 and paper.params.semi_from == 100 and paper.params.mix == "attention"
    assert quick.params.semi_from < quick.params.late_from <= quick.params.beneficiary.epochs
