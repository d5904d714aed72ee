"""The shape every part shares: the seed rule, typed attack parameters and presets, how a run's values are
resolved per preset (dataset paper settings only under ``paper``), and a resolve() without side effects."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from antibackdoor.attacks import ATTACKS, get_attack
from antibackdoor.data.gtsrb import GTSRB_PAPER
from antibackdoor.data.imageset import DatasetSplits, PaperSettings
from antibackdoor.data.tiny_imagenet import TINY_PAPER
from antibackdoor.defenses import DefenseContext
from antibackdoor.errors import ConfigError
from antibackdoor.experiment import Experiment, make_config
from antibackdoor.models import build_model
from antibackdoor.seeding import derive_seed, generator, seeded_rng


# -- seeds ------------------------------------------------------------------------------------------------
def test_derive_seed_never_collides_where_the_old_formulas_did():
    # the old mixes: seed * 7 + offset (models), seed * 31 + offset (training), seed * 1_000_003 + i
    assert 0 * 7 + 7 == 1 * 7 + 0 and derive_seed(0, "model", 7) != derive_seed(1, "model", 0)
    seen = {derive_seed(s, "model", o) for s, o in itertools.product(range(100), range(100))}
    assert len(seen) == 100 * 100
    # tags are unambiguous (no concatenation collisions) and typed (1 is not "1")
    assert derive_seed(1, "ab", "c") != derive_seed(1, "a", "bc")
    assert derive_seed(1, 1) != derive_seed(1, "1")
    assert derive_seed(3, "epoch", 2) == derive_seed(3, "epoch", 2) < 2**63
    assert torch.equal(torch.rand(5, generator=generator(3, "x")), torch.rand(5, generator=generator(3, "x")))
    with pytest.raises(TypeError):
        derive_seed(1, 0.5)


def _ctx(seed: int) -> DefenseContext:
    return DefenseContext(lambda: build_model("cnn-small", 10), seed=seed)


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fresh_model_seeds_without_touching_the_global_rng():
    # same (seed, offset): same weights, whatever the global RNG did in between
    torch.manual_seed(123)
    a = _weights(_ctx(0).fresh_model(7))
    torch.rand(1000)
    assert torch.equal(a, _weights(_ctx(0).fresh_model(7)))
    # seed 0 offset 7 and seed 1 offset 0 were the same model before (0 * 7 + 7 == 1 * 7 + 0)
    assert not torch.equal(a, _weights(_ctx(1).fresh_model(0)))
    # the caller's random stream continues as if no model had been built
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _ctx(0).fresh_model(3)
    assert torch.equal(torch.rand(3), expected)
    with seeded_rng(0, "x"):
        inside = torch.rand(2)
    with seeded_rng(0, "x"):
        assert torch.equal(torch.rand(2), inside)


# -- attack parameters and presets ----------------------------------------------------------------------------
def test_every_attack_has_typed_params_and_both_presets():
    for name, cls in ATTACKS.items():
        assert set(cls.presets) >= {"quick", "paper"}, name
        for preset in ("quick", "paper"):
            att = get_attack(name, preset)
            assert att.params == cls.presets[preset] and isinstance(att.params, cls.Params)
            assert att.describe()["name"] == name


def test_paper_preset_is_reachable_and_overrides_win():
    assert get_attack("sig").params.delta == 40.0 and get_attack("sig", "paper").params.delta == 20.0
    assert get_attack("sig", "paper", {"delta": 30}).params.delta == 30.0
    assert get_attack("clb", "paper").params.robust_model == "resnet18"
    assert get_attack("iab", "paper").params.epochs == 600 and get_attack("iab").params.epochs == 15
    blend = get_attack("blend", alpha="0.25")  # strings from YAML 1.1 / the command line are converted once
    assert blend.params.alpha == 0.25 and isinstance(blend.params.alpha, float)
    with pytest.raises(ConfigError, match="--preset: 'fast' unknown for attack sig"):
        get_attack("sig", "fast")
    with pytest.raises(ConfigError, match=r"^--attack-param steps: expected an integer, got 2.5$"):
        get_attack("clb", steps=2.5)
    with pytest.raises(ConfigError, match=r"^--attack-param optimize: expected true or false, got 'yes'$"):
        get_attack("trojan", optimize="yes")


def test_experiment_uses_the_attack_preset():
    exp = Experiment(make_config({"attack": "sig", "preset": "paper", "defense": "none"}))
    exp.splits = _splits(PaperSettings())
    assert exp.resolve().attack.params.delta == 20.0
    exp = Experiment(make_config({"attack": "sig", "preset": "paper", "attack_params": {"delta": 25}}))
    exp.splits = _splits(PaperSettings())
    assert exp.resolve().as_dict()["attack_resolved"]["delta"] == 25.0


# -- how a run's values are resolved, per preset ---------------------------------------------------------------
def _splits(paper: PaperSettings) -> DatasetSplits:
    """A tiny stand-in for a dataset with the given paper settings (no files needed)."""
    from antibackdoor.data.imageset import ImageSet

    # 80 images: enough that a clean-label attack at rate 0.1 poisons some of the target class's 20
    x = torch.zeros(80, 3, 64, 64, dtype=torch.uint8)
    y = torch.arange(80) % 4
    data = ImageSet(x, y, ["a", "b", "c", "d"], (0.5,) * 3, (0.25,) * 3, "stand-in")
    return DatasetSplits(data, data, paper)


def _resolve(paper: PaperSettings, **config):
    exp = Experiment(make_config(config))
    exp.splits = _splits(paper)
    return exp.resolve()


@pytest.mark.parametrize("paper, defense, model", [(TINY_PAPER, "a-abl", "resnet34"), (GTSRB_PAPER, "aibd", "wrn16-1"),
                                                   (GTSRB_PAPER, "a-abl", "resnet18")])
def test_dataset_paper_settings_apply_under_paper_only(paper, defense, model):
    quick = _resolve(paper, defense=defense)
    assert quick.model == "cnn"
    paper_run = _resolve(paper, defense=defense, preset="paper")
    assert paper_run.model == model
    if defense == "a-abl":
        eps = paper.defense_params.get("a-abl", {}).get("split_eps", 2 / 255)
        assert paper_run.defense.params.split_eps == pytest.approx(eps)
        assert quick.defense.params.split_eps == pytest.approx(2 / 255)  # quick: the preset on every dataset


def test_user_values_win_over_the_dataset_and_reach_only_their_defense():
    r = _resolve(TINY_PAPER, preset="paper", model="cnn-small", defense_params={"split_eps": 0.5 / 255})
    assert r.model == "cnn-small" and r.defense.params.split_eps == pytest.approx(0.5 / 255)
    # the a-abl setting does not leak into another defense that might have a field of that name
    r = _resolve(TINY_PAPER, preset="paper", defense="adv-train")
    assert r.model == "resnet34" and "split_eps" not in r.as_dict()["defense_resolved"]


def test_paper_settings_reach_the_detector_inside_isolate_then_train():
    """The dataset's A-ABL settings (split eps 1/255 on Tiny-ImageNet) reach ifgsm-sce inside isolate-then-train
    as they reach A-ABL's own split, under ``paper`` only; the user's detector_params still win."""
    aabl = _resolve(TINY_PAPER, defense="a-abl", preset="paper")
    iso = _resolve(TINY_PAPER, defense="isolate-then-train", preset="paper")
    a, det = aabl.defense.params, iso.defense.detector.params
    assert (det.eps, det.steps, det.step, det.loss, det.model) == (a.split_eps, a.split_steps, a.split_step,
                                                                   a.split_loss, a.naive)
    assert det.eps == pytest.approx(1 / 255) and iso.model == aabl.model == "resnet34"
    assert iso.as_dict()["defense_resolved"]["detector_resolved"]["eps"] == pytest.approx(1 / 255)  # run id too
    quick = _resolve(TINY_PAPER, defense="isolate-then-train")
    assert quick.defense.detector.params.eps == pytest.approx(2 / 255) and quick.model == "cnn"
    mine = _resolve(TINY_PAPER, defense="isolate-then-train", preset="paper",
                    defense_params={"detector_params": {"eps": 0.5 / 255}})
    assert mine.defense.detector.params.eps == pytest.approx(0.5 / 255)


def test_paper_settings_reach_aibd_flip_as_they_reach_aibd():
    """A dataset's AIBD settings reach aibd-flip's flip counting and surplus test, not AIBD's training recipes
    (the detector's suspect model is A-ABL's naive stage); the run trains AIBD's paper model (GTSRB: WRN-16-1)."""
    from antibackdoor.detectors import DETECTORS
    from antibackdoor.detectors.base import PAPER_SUSPECT

    paper = replace(GTSRB_PAPER, defense_params={"aibd": {"pgd_step": 2 / 255, "pgd_cap": 60, "alpha": 0.01,
                                                          "target_fractions": [0.05], "infected": {"epochs": 3}}})
    aibd = _resolve(paper, defense="aibd", preset="paper")
    flip = _resolve(paper, defense="isolate-then-train", preset="paper", defense_params={"detector": "aibd-flip"})
    det = flip.defense.detector.params
    for name in DETECTORS["aibd-flip"].paper_param_names:
        assert getattr(det, name) == getattr(aibd.defense.params, name), name
    assert det.pgd_cap == 60 and det.target_fractions == (0.05,) and det.model == PAPER_SUSPECT
    assert flip.model == aibd.model == "wrn16-1"
    # quick: the presets and the CPU model on every dataset
    quick = _resolve(paper, defense="isolate-then-train", defense_params={"detector": "aibd-flip"})
    assert quick.defense.detector.params.pgd_cap == 255 and quick.model == "cnn"
    # detectors of other defenses take nothing of AIBD's
    ac = _resolve(paper, defense="isolate-then-train", preset="paper",
                  defense_params={"detector": "spectral-signature"})
    assert ac.model == "resnet18"


def test_resolve_decides_everything_and_changes_nothing(tmp_path):
    exp = Experiment(make_config({"attack": "blend", "out": str(tmp_path / "runs")}))
    exp.splits = _splits(PaperSettings())
    before = dict(vars(exp))
    a, b = exp.resolve(), exp.resolve()
    assert vars(exp) == before  # no attribute set as a side effect (the run used to read self.defense)
    assert a.run_id() == b.run_id() and a.attack is not b.attack
    assert a.as_dict()["attack_resolved"] == {"name": "blend", "label_mode": "dirty", "alpha": 0.1,
                                              "pattern_seed": 0, "pattern_file": None}
    assert not (tmp_path / "runs").exists()


def test_paper_settings_are_data_facts():
    assert replace(PaperSettings(), model="wrn16-1").model_for("any") == "wrn16-1"
    assert GTSRB_PAPER.model_for("aibd") == "wrn16-1" and GTSRB_PAPER.model_for("a-abl") == "resnet18"
