"""Precision: what auto picks on either CPU kind (the hardware check is replaced, so both branches run on
any machine), the override variable, the active precision, autocast/scaler behaviour, training in each
precision, the single-step adversaries, and the precision in config.yaml and the run id."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from antibackdoor import precision as P
from antibackdoor.adversarial import PGDConfig, adversarial_examples, pgd
from antibackdoor.errors import ConfigError
from antibackdoor.models import build_model
from antibackdoor.training import TrainConfig, train


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.delenv(P.ENV, raising=False)
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: native)
    p = P.resolve_precision("auto", "cpu")
    assert p.name == expected and p.device_type == "cpu"
    assert ("natively" in p.reason) if native else ("no native bf16" in p.reason)
    assert P.resolve_precision("fp32", "cpu").name == "fp32"  # asking always wins
    assert P.resolve_precision("bf16", "cpu").name == "bf16"


def test_env_overrides_auto_and_bad_names_are_errors(monkeypatch):
    monkeypatch.setenv(P.ENV, "bf16")
    assert P.resolve_precision("auto").name == "bf16"
    assert P.resolve_precision("fp16").name == "fp16"  # an explicit choice is not overridden
    monkeypatch.setenv(P.ENV, "double")
    with pytest.raises(ConfigError, match=P.ENV):
        P.resolve_precision("auto")
    with pytest.raises(ConfigError, match="--precision"):
        P.resolve_precision("int8")


def test_active_precision_nests_and_falls_back_to_auto(monkeypatch):
    monkeypatch.setenv(P.ENV, "fp32")
    assert P.active_precision("cpu").name == "fp32"
    with P.use_precision(P.Precision("bf16", "cpu")):
        assert P.active_precision("cpu").name == "bf16"
        with P.use_precision(P.Precision("fp16", "cpu")):
            assert P.as_precision(None, "cpu").name == "fp16"
        assert P.active_precision("cpu").name == "bf16"
    assert P.active_precision("cpu").name == "fp32"
    assert P.as_precision("bf16", "cpu").name == "bf16"


def test_autocast_layout_and_scaler():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.rand(2, 3, 8, 8)
    fp32, bf16, fp16 = (P.Precision(n, "cpu") for n in ("fp32", "bf16", "fp16"))
    with fp32.autocast():
        assert conv(x).dtype == torch.float32
    with bf16.autocast():
        assert conv(x).dtype == torch.bfloat16
    assert fp32.batch(x).is_contiguous(memory_format=torch.channels_last)
    assert P.PLAIN.batch(x) is x and not P.PLAIN.amp
    fp32.prepare(conv)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not fp32.scaler().is_enabled() and not bf16.scaler().is_enabled() and fp16.scaler().is_enabled()


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_training_runs_in_each_precision(small_train, tmp_path, name):
    torch.manual_seed(0)
    m = build_model("cnn-small", 10, mean=small_train.mean, std=small_train.std)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=100, adversary=PGDConfig.fgsm_rs(8 / 255))
    hist = train(m, small_train, cfg, precision=name, checkpoint=tmp_path / "c.ckpt")
    assert math.isfinite(hist[0]["loss"])
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert bool(state["scaler"]) == (name == "fp16")  # the fp16 loss scale is checkpointed for resume


def _model(data):
    torch.manual_seed(0)
    return build_model("cnn-small", 10, mean=data.mean, std=data.std).eval()


@pytest.mark.parametrize("cfg", [PGDConfig(eps=8 / 255, step=4 / 255, steps=2), PGDConfig.fgsm_rs(8 / 255),
                                 PGDConfig.n_fgsm(8 / 255)])
def test_training_adversary_equals_the_engine(small_train, cfg):
    """adversarial_examples (training) takes exactly the iterates of pgd (which also records statistics)."""
    m = _model(small_train)
    x, y = small_train.float_images(torch.arange(32)), small_train.y[:32]
    a = adversarial_examples(m, x, y, cfg, generator=torch.Generator().manual_seed(3))
    b = pgd(m, x, y, cfg, generator=torch.Generator().manual_seed(3)).x_adv
    assert torch.equal(a, b)


def test_single_step_adversaries_stay_where_they_should(small_train):
    m = _model(small_train)
    x, y = small_train.float_images(torch.arange(64)), small_train.y[:64]
    eps = 8 / 255
    rs = adversarial_examples(m, x, y, PGDConfig.fgsm_rs(eps), generator=torch.Generator().manual_seed(0))
    assert (rs - x).abs().max() <= eps + 1e-6  # FGSM-RS: projected onto the eps-ball
    nf = adversarial_examples(m, x, y, PGDConfig.n_fgsm(eps), generator=torch.Generator().manual_seed(0))
    dist = (nf - x).abs().flatten(1).max(1).values
    assert (dist <= 3 * eps + 1e-6).all() and (dist > eps + 1e-6).any()  # N-FGSM: noise 2 eps + step eps
    assert nf.min() >= 0 and nf.max() <= 1


def test_precision_is_recorded_and_in_the_run_id(monkeypatch, tiny_npz, tmp_path):
    from antibackdoor.experiment import Experiment, make_config

    base = {"dataset": f"npz:{tiny_npz}", "out": str(tmp_path), "model": "cnn-small"}
    monkeypatch.setenv(P.ENV, "fp32")
    ids = {}
    for name in ("auto", "fp32", "bf16"):
        r = Experiment(make_config({**base, "precision": name})).resolve()
        ids[name] = r.run_id()
        d = r.as_dict()
        assert d["precision"] == ("fp32" if name == "auto" else name)
        assert yaml.safe_load(yaml.safe_dump(d))["precision_reason"]
    assert ids["auto"] == ids["fp32"] != ids["bf16"]  # auto is recorded as what it resolved to
    with pytest.raises(ConfigError, match="--precision"):
        make_config({**base, "precision": "fp64"})
