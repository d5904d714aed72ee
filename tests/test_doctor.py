"""``antibackdoor doctor``: the report's facts and its measurements (tiny budget; no speed is asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from antibackdoor.cli import main
from antibackdoor.doctor import forward_flops, train_flops
from antibackdoor.models import build_model


def test_flop_count_of_the_quick_cnn():
    m = build_model("cnn", 10)
    fwd, first = forward_flops(m, (3, 32, 32))
    # 3x3 convs 3->32 @32x32, 32->64 @16x16, 64->128 @8x8, 128->256 @4x4, then a 256->10 linear layer
    macs = 32 * 32 * 32 * 27 + 16 * 16 * 64 * 32 * 9 + 8 * 8 * 128 * 64 * 9 + 4 * 4 * 256 * 128 * 9 + 2560
    assert (fwd, first) == (2 * macs, 2 * 32 * 32 * 32 * 27)
    assert train_flops(m, (3, 32, 32)) == 3 * fwd - first


@pytest.mark.slow
def test_doctor_json_quick(capsys):
    assert main(["doctor", "--quick", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["torch"] == torch.__version__
    assert r["precision"]["auto"] == "fp32"  # the test suite's ANTIBACKDOOR_PRECISION
    assert r["precision"]["hardware_choice"] in ("fp32", "bf16") and r["precision"]["hardware_reason"]
    assert r["threads"]["torch_threads"] >= 1
    kinds = ["fp32", "bf16"] if r["cpu"]["bf16_native"] else ["fp32"]
    assert list(r["peak_gflops"]) == kinds and list(r["cnn_train"]) == kinds
    for kind in kinds:
        assert r["peak_gflops"][kind]["conv"]["gflops"] > 0 and r["peak_gflops"][kind]["matmul"]["gflops"] > 0
        for part in ("cnn_train", "cnn_attack_step"):
            entry = r[part][kind]
            assert entry["img_s"] > 0 and 0 < entry["share_of_conv_peak"]
            assert abs(entry["gflops"] - entry["img_s"] * entry["flops_per_img"] / 1e9) <= 0.01 * entry["gflops"] + 0.1
    assert r["preact_resnet18_train"]["img_s"] > 0


def test_doctor_text_without_measuring(capsys):
    assert main(["doctor", "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "precision auto -> fp32" in out and "CPU:" in out and "threads:" in out
    assert "GFLOP/s" not in out
