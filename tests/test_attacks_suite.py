"""Trojan, SIG, WaNet and CLB: triggers as specified, poison masks and labels right, prepare's cache reused.
"""

from __future__ import annotations

import math

import pytest
import torch

from antibackdoor.attacks import ATTACKS, get_attack
from antibackdoor.attacks import cache as attack_cache
from antibackdoor.attacks.clb import corner_trigger
from antibackdoor.attacks.wanet import warp_field
from antibackdoor.errors import ConfigError

TARGET = 0
#: tiny prepare settings: one epoch of a small model on the 300-image slice
TINY = {
    "trojan": {"optimize": True, "clean_model": "cnn-small", "clean_epochs": 1, "opt_steps": 20},
    "clb": {"robust_model": "cnn-small", "robust_epochs": 1, "steps": 5},
}


@pytest.fixture(autouse=True)
def _data_root(tmp_path, monkeypatch):
    """Every test gets its own (empty) data root, so caches never leak between tests or into ~/.cache."""
    monkeypatch.setenv("ANTIBACKDOOR_DATA", str(tmp_path / "data"))


def poison(name: str, data, rate: float = 0.1, seed: int = 0, **params):
    att = get_attack(name, **params)
    return att, att.poison(data, rate, TARGET, torch.Generator().manual_seed(seed))


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a != b).flatten(1).any(1)


@pytest.mark.parametrize("name, label_mode", [("trojan", "dirty"), ("sig", "clean"), ("wanet", "dirty"),
                                              ("clb", "clean")])
def test_contract(small_train, name, label_mode):
    """Shape/range of apply, which samples change, which labels change, the poison mask."""
    assert ATTACKS[name].label_mode == label_mode
    rate = 0.5 if label_mode == "clean" else 0.1
    att, ps = poison(name, small_train, rate, **TINY.get(name, {}))
    m = ps.poison_mask
    everyone = torch.ones(len(small_train), dtype=torch.bool)
    pool = (small_train.y == TARGET) if label_mode == "clean" else everyone
    assert int(m.sum()) == round(rate * int(pool.sum())) > 0
    assert not (m & ~pool).any()  # clean label: only target-class samples are poisoned
    diff = changed(ps.data.x, small_train.x)
    assert diff[m].all()  # every poisoned sample carries a visible change
    cover = ps.cover_mask
    assert bool(cover.any()) == (name == "wanet")  # only WaNet adds cover (noise-mode) samples
    assert not (cover & m).any()
    assert not (diff & ~m & ~cover).any()  # nothing else was touched
    assert torch.equal(ps.true_labels, small_train.y)
    if label_mode == "dirty":
        assert (ps.data.y[m] == TARGET).all() and (small_train.y[m] != TARGET).any()
        assert torch.equal(ps.data.y[~m], small_train.y[~m])
    else:
        assert torch.equal(ps.data.y, small_train.y)
    x = small_train.float_images(slice(0, 8))
    out = att.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
    trig = att.triggered_test(small_train, TARGET)
    assert len(trig) == int((small_train.y != TARGET).sum()) and (trig.y == TARGET).all()


# -- SIG ------------------------------------------------------------------------------------------
def test_sig_signal_is_horizontal_sinusoid():
    att = get_attack("sig", delta=30, freq=6)
    out = att.apply(torch.full((2, 3, 32, 32), 0.5))
    j = torch.arange(32, dtype=torch.float32)
    expected = 30 / 255 * torch.sin(2 * math.pi * j * 6 / 32)
    torch.testing.assert_close(out - 0.5, expected.expand_as(out), atol=1e-6, rtol=0)
    # six full periods along the width: 12 sign changes of the (non-zero) samples
    signs = torch.sign(expected[expected.abs() > 1e-4])
    assert int((signs[1:] != signs[:-1]).sum()) == 11
    assert att.apply(torch.ones(1, 3, 32, 32)).max() == 1  # clipped to [0, 1]


def test_sig_poison_adds_delta_and_test_delta(small_train):
    att, ps = poison("sig", small_train, 0.5, delta=20)
    d = ps.data.x[ps.poison_mask].int() - small_train.x[ps.poison_mask].int()
    assert d.abs().max() == 20
    strong = get_attack("sig", delta=20, test_delta=40).triggered_test(small_train, TARGET)
    weak = get_attack("sig", delta=20).triggered_test(small_train, TARGET)
    clean = small_train.x[small_train.y != TARGET].int()
    assert (weak.x.int() - clean).abs().max() == 20 and (strong.x.int() - clean).abs().max() == 40


# -- WaNet ----------------------------------------------------------------------------------------
def test_wanet_noise_mode(small_train):
    att, ps = poison("wanet", small_train, 0.1, cross_ratio=2)
    m = ps.poison_mask
    noise = ps.cover_mask
    assert int(noise.sum()) == 2 * int(m.sum()) == 2 * ps.num_poison == ps.num_cover  # cross ratio 2
    assert not (noise & m).any()  # noise-mode samples carry no backdoor: not in the mask
    assert torch.equal(ps.data.y[noise], small_train.y[noise])  # ... and keep their true labels
    assert changed(ps.data.x, small_train.x)[noise].all()
    # the noise moves them off the trigger warp: they differ from the triggered version of the same image
    triggered = att.apply_uint8(small_train.x[noise])
    assert changed(ps.data.x[noise], triggered).float().mean() > 0.9
    # too few samples for 40% poison + twice as many cover samples: one clear error, nothing poisoned
    with pytest.raises(ConfigError, match=r"^--attack-param cross_ratio: attack wanet at --poison-rate 0.4 needs "
                                          r"120 poisoned \+ 240 cover samples, more than the 300 there are"):
        poison("wanet", small_train, 0.4, cross_ratio=2)


def test_wanet_warp_follows_the_field():
    """On a horizontal ramp, bilinear sampling returns the x coordinate: out = (grid_x + 1) / 2."""
    ramp = torch.linspace(0, 1, 32).expand(1, 3, 32, 32).contiguous()
    att = get_attack("wanet")
    grid = warp_field(32, 32, 4, 0.5, 1.0, 0)
    torch.testing.assert_close(att.apply(ramp), ((grid[..., 0] + 1) / 2).expand(1, 3, 32, 32), atol=1e-5,
                               rtol=0)
    shift = (grid - warp_field(32, 32, 4, 0.0, 1.0, 0)).abs() * 31 / 2  # in pixels
    assert 0.05 < float(shift.mean()) and float(shift.max()) < 2  # smooth, sub-pixel-ish warp at s = 0.5
    assert torch.allclose(get_attack("wanet", s=0.0).apply(ramp), ramp, atol=1e-5)  # s = 0: identity
    assert not torch.equal(att.apply(ramp), get_attack("wanet", grid_seed=1).apply(ramp))
    assert torch.equal(att.apply(ramp), att.apply(ramp))  # a fixed trigger


# -- Trojan ---------------------------------------------------------------------------------------
def test_trojan_fixed_patch(small_train):
    att, ps = poison("trojan", small_train, 0.1)
    m = ps.poison_mask
    x, x0 = ps.data.x[m], small_train.x[m]
    patch = x[:, :, -5:, -5:]
    assert (patch == patch[:1]).all()  # the same trigger on every poisoned image
    assert set(patch.unique().tolist()) <= {0, 255}
    rest = x.clone()
    rest[:, :, -5:, -5:] = x0[:, :, -5:, -5:]
    assert torch.equal(rest, x0)  # only the patch changed
    ringed = get_attack("trojan", shape="ring", corner="top-left", margin=1)
    ring = ringed.apply(torch.full((1, 3, 32, 32), 0.5))
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[1:6, 1:6] = True
    inside[2:5, 2:5] = False
    assert (ring[0][:, ~inside] == 0.5).all()  # the frame's interior and the image elsewhere are kept
    assert (ring[0][:, inside] != 0.5).all()
    with pytest.raises(ConfigError, match="corner"):
        get_attack("trojan", corner="middle").apply(torch.zeros(1, 3, 32, 32))


def test_trojan_optimized_trigger_is_made_against_the_cached_clean_model(small_train):
    att = get_attack("trojan", **TINY["trojan"])
    with pytest.raises(RuntimeError, match="prepare"):
        att.apply(torch.zeros(1, 3, 32, 32))
    att.prepare(small_train, TARGET, torch.Generator())
    assert att.cache_hit is False
    model = att.clean_model_for(small_train)  # from the cache now
    assert att.cache_hit is True
    assert torch.equal(att.pattern(3), att.optimize_pattern(model, 3, 32, 32))
    assert not torch.equal(att.pattern(3), att.seeded_pattern(3))


class PatchMeans(torch.nn.Module):
    """Features: the mean of each channel over the bottom-right 5x5 patch, and their negatives; a head that
    weighs feature 0 (channel 0's mean) and feature 4 (minus channel 1's mean) most."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(6, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[3.0, 0.1, 0.1, 0.1, 2.0, 0.1], [0.0, 0.2, 0.2, 0.2, 0.5, 0.2]]))

    def forward(self, x):
        m = x[:, :, -5:, -5:].mean((2, 3))
        return self.head(torch.cat([m, -m], 1))


def test_trojan_optimisation_drives_the_chosen_neurons_towards_their_target():
    """On a model whose neurons are known the optimum is known: the two neurons with the largest head weights
    (channel 0's patch mean, minus channel 1's) are pushed up towards target_value, so channel 0 of the patch
    turns white, channel 1 black, and channel 2, which no chosen neuron sees, keeps its seeded colours."""
    att = get_attack("trojan", optimize=True, opt_steps=2, opt_step=0.5)
    pattern = att.optimize_pattern(PatchMeans(), 3, 32, 32)
    assert torch.equal(pattern[0], torch.ones(5, 5)) and torch.equal(pattern[1], torch.zeros(5, 5))
    assert torch.equal(pattern[2], att.seeded_pattern(3)[2])
    assert float(att.seeded_pattern(3)[:2].mean()) not in (0.0, 1.0)  # so the first two did change


# -- CLB ------------------------------------------------------------------------------------------
def test_clb_trigger_pattern():
    t = corner_trigger(32, 32, "all")
    assert int((t != 0).sum()) == 4 * 9
    assert torch.equal(t, t.flip(-1)) and torch.equal(t, t.flip(-2))  # survives a horizontal flip
    assert int((corner_trigger(32, 32, "bottom-right") != 0).sum()) == 9
    out = get_attack("clb").apply(torch.full((1, 3, 32, 32), 0.5))
    assert set(out[0, :, -3:, -3:].unique().tolist()) == {0.0, 1.0}
    assert (out[0, :, 3:-3, :] == 0.5).all() and (out[0, :, :, 3:-3] == 0.5).all()


def test_clb_perturbation_and_cache_reuse(small_train, monkeypatch):
    att, ps = poison("clb", small_train, 0.5, **TINY["clb"])
    assert att.cache_hit is False
    files = list(attack_cache.cache_dir().glob("antibackdoor-cache-clb-*.safetensors"))
    assert len(files) == 1
    m = ps.poison_mask
    d = ps.data.x[m].int() - small_train.x[m].int()
    corners = corner_trigger(32, 32, "all") != 0
    assert (d[:, :, ~corners].abs() <= 16 + 1).all()  # PGD stays within eps 16/255 (+ rounding)
    assert set(ps.data.x[m][:, :, corners].unique().tolist()) == {0, 255}
    # test images get the trigger only, no perturbation
    trig = att.triggered_test(small_train, TARGET)
    clean = small_train.x[small_train.y != TARGET]
    assert torch.equal(trig.x[:, :, ~corners], clean[:, :, ~corners])

    # a second run with the same config and data loads the robust model instead of training it
    def no_training(*args, **kwargs):
        raise AssertionError("the robust model should come from the cache")

    monkeypatch.setattr("antibackdoor.training.train", no_training)
    again, ps2 = poison("clb", small_train, 0.5, **TINY["clb"])
    assert again.cache_hit is True
    assert torch.equal(ps2.data.x, ps.data.x) and torch.equal(ps2.poison_mask, m)
    # another config (or other data) does not reuse it
    with pytest.raises(AssertionError, match="cache"):
        poison("clb", small_train, 0.5, **{**TINY["clb"], "robust_epochs": 2})
    with pytest.raises(AssertionError, match="cache"):
        poison("clb", small_train.subset(torch.arange(200)), 0.5, **TINY["clb"])


def test_clb_perturbation_is_pgd_against_the_robust_model():
    """Against KnownMargins (only its margin pixel carries gradient) CLB's 5 PGD steps of 2/255 lower that pixel
    by 10 grey levels, not below 0, and change nothing else."""
    from conftest import KnownMargins, known_margin_set

    margins = torch.arange(1, 16)
    known = known_margin_set(margins, torch.zeros(15), 10, size=32)
    att = get_attack("clb", **TINY["clb"])
    att.model = KnownMargins(10)
    adv = att.perturb(known.x, known.y)
    expected = known.x.float()
    expected[:, 0, 0, 0] = (margins - 10).clamp(min=0).float()
    torch.testing.assert_close(adv * 255, expected, atol=1e-3, rtol=0)


# -- the cache helper -----------------------------------------------------------------------------
def test_cache_keys_and_corrupt_entry(small_train):
    calls = []

    def build():
        calls.append(1)
        return {"w": torch.arange(4.0)}

    t1, hit1 = attack_cache.cached_tensors("demo", {"a": 1}, small_train, build)
    t2, hit2 = attack_cache.cached_tensors("demo", {"a": 1}, small_train, build)
    assert (hit1, hit2) == (False, True) and torch.equal(t1["w"], t2["w"]) and len(calls) == 1
    other = small_train.with_labels(small_train.y.roll(1))
    path = attack_cache.cache_path("demo", {"a": 1}, small_train)
    assert attack_cache.cache_path("demo", {"a": 1}, other) != path
    assert attack_cache.cache_path("demo", {"a": 2}, small_train) != path
    path.write_bytes(b"not a safetensors file")
    t3, hit3 = attack_cache.cached_tensors("demo", {"a": 1}, small_train, build)
    assert hit3 is False and len(calls) == 2 and torch.equal(t3["w"], t1["w"])
    assert not list(path.parent.glob(".*.tmp"))  # no temporary file left behind
