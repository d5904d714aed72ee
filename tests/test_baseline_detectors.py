"""ABL's loss isolation and D-ST/D-BR's FCT split as detectors: on the same data, context and seed they give the
defenses' own scores and isolation, bit for bit; their parameter errors are one line naming the key; the suites
that use them find them. Tiny random images, fp32, a few epochs: nothing here must converge."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_set

import antibackdoor as ab
from antibackdoor.bench.runner import check_methods, load_grid
from antibackdoor.detectors import DETECTORS, get_detector
from antibackdoor.errors import ConfigError
from antibackdoor.models import build_model
from antibackdoor.precision import resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")




def ctx_for(seed=0, classes=4, size=16):
    return ab.DefenseContext(lambda: build_model("cnn-small", classes, 3, size), seed=seed,
                             precision=resolve_precision("fp32"))


ABL_TINY = {"isolation": {"epochs": 2, "batch_size": 16}, "isolation_ratio": 0.1}


@pytest.mark.parametrize("seed", [0, 5])
def test_abl_loss_is_the_abl_defenses_isolation(seed):
    data = tiny_set(48)
    ref = ab.get_defense("abl", "quick", {**ABL_TINY, "finetune": {"epochs": 0}, "unlearn": {"epochs": 1}}
                         ).run(data, ctx_for(seed))
    r = get_detector("abl-loss", overrides={"abl": ABL_TINY}).score(data, ctx_for(seed))
    assert torch.equal(r.scores, ref.scores.double()) and torch.equal(r.isolated, ~ref.kept)
    assert r.higher_is_suspicious == ref.higher_is_suspicious and r.score_name == ref.score_name
    # the one top-fraction rule: round(0.1 * 48) = 5
    assert int(r.isolated.sum()) == 5 and r.model is None and r.info["rule"] == "native"
    # another rule on the same scores: the lowest losses (low = suspicious)
    top = get_detector("abl-loss", overrides={"abl": ABL_TINY, "rule": {"kind": "top", "value": 0.25}}
                       ).score(data, ctx_for(seed))
    assert torch.equal(top.scores, r.scores) and int(top.isolated.sum()) == 12
    assert top.scores[top.isolated].max() <= top.scores[~top.isolated].min()


SEP_TINY = {"warmup": {"epochs": 1, "batch_size": 16}, "intra": {"epochs": 1, "batch_size": 16},
            "clean_ratio": 0.25, "poison_ratio": 0.125}


@pytest.mark.parametrize("seed", [0, 5])
def test_dst_fct_is_the_d_st_and_d_br_split(seed):
    from antibackdoor.stages.separation import PARTS

    data = tiny_set(48)
    ref = ab.get_defense("d-st", "quick", {"separation": SEP_TINY, "contrastive": {"epochs": 1, "batch_size": 16},
                                           "head": {"epochs": 1, "batch_size": 16}}).run(data, ctx_for(seed))
    part = ref.sample_stats["sd_part"]
    r = get_detector("dst-fct", overrides={"separation": SEP_TINY}).score(data, ctx_for(seed))
    assert torch.equal(r.scores, ref.scores.double()) and torch.equal(r.isolated, ~ref.kept)
    assert torch.equal(r.isolated, part == PARTS["poisoned"]) and int(r.isolated.sum()) == 6
    assert r.higher_is_suspicious and r.score_name == ref.score_name == "fct"
    assert r.info["gamma_poison"] == ref.info["gamma_poison"] and r.info["keep"] == "clean+suspicious"
    # A-ABL Table 4's "Clean": only D_c stays
    clean = get_detector("dst-fct", overrides={"separation": SEP_TINY, "keep": "clean"}).score(data, ctx_for(seed))
    assert torch.equal(clean.scores, r.scores) and torch.equal(clean.kept, part == PARTS["clean"])
    assert int(clean.kept.sum()) == 12
    # D-BR runs the same SD module
    dbr = ab.get_defense("d-br", "quick", {"separation": SEP_TINY, "backdoored": {"epochs": 1, "batch_size": 16},
                                           "rounds": {"epochs": 1, "batch_size": 16}}).run(data, ctx_for(seed))
    assert torch.equal(dbr.scores.double(), r.scores) and torch.equal(dbr.kept, r.kept)


@pytest.mark.parametrize("name, overrides, key", [
    ("abl-loss", {"abl": {"isolation_ratio": 1.5}}, "--defense-param detector_params.abl.isolation_ratio"),
    ("abl-loss", {"abl": {"bound": "hinge"}}, "--defense-param detector_params.abl.bound"),
    ("abl-loss", {"abl": {"isolation": {"optimizer": "rmsprop"}}},
     "--defense-param detector_params.abl.isolation.optimizer"),
    ("abl-loss", {"abl": {"gama": 0.4}}, "gama"),
    ("dst-fct", {"separation": {"clean_ratio": 0.9, "poison_ratio": 0.2}},
     "--defense-param detector_params.separation"),
    ("dst-fct", {"separation": {"rotate": 400}}, "--defense-param detector_params.separation.rotate"),
    ("dst-fct", {"separation": {"intra": {"schedule": "linear"}}},
     "--defense-param detector_params.separation.intra.schedule"),
    ("dst-fct", {"keep": "poisoned"}, "keep"),
    ("dst-fct", {"rule": {"kind": "top", "value": 2}}, "rule.value"),
])
def test_bad_parameters_are_one_line_naming_the_key(name, overrides, key):
    with pytest.raises(ConfigError) as err:
        get_detector(name, "quick", overrides)
    assert key in str(err.value) and "\n" not in str(err.value)
    # the same check runs when isolate-then-train is built (before any run directory exists)
    with pytest.raises(ConfigError) as err:
        ab.get_defense("isolate-then-train", "quick", {"detector": name, "detector_params": overrides})
    assert key in str(err.value) and "\n" not in str(err.value)


def test_presets_are_the_defenses_presets():
    for preset in ("quick", "paper"):
        assert get_detector("abl-loss", preset).params.abl == ab.get_defense("abl", preset).params
        sep = get_detector("dst-fct", preset).params.separation
        assert sep == ab.get_defense("d-st", preset).params.separation
        assert sep == ab.get_defense("d-br", preset).params.separation
    assert get_detector("abl-loss", "quick").params != get_detector("abl-loss", "paper").params


@pytest.mark.parametrize("suite, detector", [("aabl-t4", "dst-fct"), ("aibd-t2", "abl-loss")])
def test_suites_find_the_detectors(suite, detector):
    assert detector in DETECTORS
    for preset in ("quick", "paper"):
        grid, _ = load_grid(suite, preset)
        cells = grid.cells()
        kept, missing = check_methods(cells, preset)
        assert not missing and len(kept) == len(cells), missing
        assert any(c.config["defense_params"].get("detector") == detector for c in kept)
