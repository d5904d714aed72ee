"""ASD and VaB wherever a user runs a defense: through ``defend`` on a folder of grey images (one channel, another
size, the data as a practitioner hands them in), through ``bench``, and on every registered model (the pieces
that read the model's layout: ASD's trailing stages, VaB's attention maps). One tiny epoch each: nothing here
depends on how well anything trained."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import write_npz
from test_pdb import grey_folder

import antibackdoor as ab
from antibackdoor.cli import main
from antibackdoor.defenses.asd import trailing_parameters
from antibackdoor.models import MODELS, build_model
from antibackdoor.models.features import classifier_head
from antibackdoor.precision import PLAIN
from antibackdoor.seeding import seeded_rng
from antibackdoor.stages.mixing import feature_attention

pytestmark = pytest.mark.usefixtures("one_thread")

#: one epoch of each stage: ASD's three phases, VaB's warm-up then one semi-supervised beneficiary epoch
ASD_TINY = {"train": {"epochs": 3, "batch_size": 16}, "iterations": 2, "class_aware_until": 1, "agnostic_until": 2,
            "grow_every": 1, "grow_by": 2, "rampup": 3, "meta": {"batch_size": 32}}
VAB_TINY = {"victim": {"batch_size": 32}, "warmup_thresholds": [0.6], "beneficiary": {"epochs": 2, "batch_size": 16},
            "semi_from": 1, "victim_every": 1, "late_from": 1}


def flat(params: dict, prefix: str = "") -> list[str]:
    out: list[str] = []
    for k, v in params.items():
        if isinstance(v, dict):
            out += flat(v, f"{prefix}{k}.")
        else:
            out += ["--defense-param", f"{prefix}{k}={json.dumps(v)}"]
    return out


@pytest.mark.parametrize("defense, params, trusted", [("asd", ASD_TINY, True), ("vab", VAB_TINY, False)])
def test_defend_runs_on_a_grey_folder(tmp_path, capsys, defense, params, trusted):
    root = grey_folder(tmp_path / "data")
    extra = []
    if trusted:  # ASD's clean seed comes from --trusted in defend (a few known-clean images of every class)
        seed = write_npz(tmp_path / "trusted.npz", n_train=8, n_test=4, size=12, seed=5,
                         x_train=np.random.default_rng(5).integers(0, 256, (8, 12, 12), dtype=np.uint8),
                         x_test=np.zeros((4, 12, 12), np.uint8))
        extra = ["--trusted", f"npz:{seed}"]
    out = tmp_path / "runs"
    code = main(["defend", f"folder:{root}", "--defense", defense, "--out", str(out), "--model", "cnn-small",
                 "--ra-samples", "4", "--holdout", "0.2", *extra, *flat(params)])
    err = capsys.readouterr().err
    assert code == 0, err
    (run_dir,) = [d for d in out.iterdir() if d.is_dir()]
    m = json.loads((run_dir / "metrics.json").read_text())
    rows = list(csv.DictReader(open(run_dir / "suspicious.csv")))
    assert len(rows) == 48  # 80 % of the 60 files inspected, 20 % held out for the evaluation
    assert m["isolated"] == sum(r["isolated"] == "yes" for r in rows)
    assert (run_dir / "report.md").is_file()
    model = ab.load_model(run_dir / "model.safetensors")
    with torch.no_grad():  # the deployed model answers on grey 12 x 12 images, one of 4 classes each
        assert model(torch.rand(3, 1, 12, 12)).shape == (3, 4)


@pytest.mark.slow
def test_bench_runs_asd_and_vab(tmp_path, capsys):
    import yaml

    npz = write_npz(tmp_path / "tiny.npz")
    grid = {"name": "semisup", "datasets": [f"npz:{npz}"], "attacks": ["badnets"], "models": ["cnn-small"],
            "defenses": [{"name": "asd", "params": {**ASD_TINY, "trusted_fraction": 0.05}},
                         {"name": "vab", "params": VAB_TINY}],
            "targets": [1], "eval": {"ra_steps": 1, "ra_samples": 4}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    code = main(["bench", str(path), "--out", str(out), "--no-stage-cache"])
    assert code == 0, capsys.readouterr().err
    runs = {m.parent.name.split("-")[2]: m.parent for m in (out / "runs").glob("*/metrics.json")}
    assert set(runs) == {"asd", "vab"}
    for d in runs.values():
        m = json.loads((d / "metrics.json").read_text())
        assert m["acc"] is not None and m["tpr"] is not None and (d / "isolation.csv").is_file()


MODEL_NAMES = list(MODELS)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_has_trailing_stages_and_attention(name):
    """ASD's virtual update moves the model's last stage and head (a strict, non-empty part of the parameters);
    VaB's attention is one map per image of the image's size, scaled to [0, 1]."""
    with seeded_rng(0, "test"):
        model = build_model(name, 10)
    x = torch.rand(2, 3, 32, 32)
    moved = {id(p) for p in trailing_parameters(model, 1, x)}
    head = {id(p) for p in classifier_head(model).parameters()}
    assert head < moved < {id(p) for p in model.parameters()}
    att = feature_attention(model.eval(), x, PLAIN)
    assert att.shape == (2, 1, 32, 32) and float(att.min()) >= 0.0 and float(att.max()) <= 1.0
    assert torch.allclose(att.amax(dim=(2, 3)), torch.ones(2, 1))
