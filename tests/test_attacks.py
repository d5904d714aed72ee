from __future__ import annotations

import pytest
import torch

from antibackdoor.attacks import get_attack
from antibackdoor.errors import ConfigError


def test_badnets_patch_and_labels(small_train):
    att = get_attack("badnets")
    ps = att.poison(small_train, 0.1, 2, torch.Generator().manual_seed(0))
    m = ps.poison_mask
    assert int(m.sum()) == 30
    x = ps.data.x
    assert torch.all(x[m][:, :, -3:, -3:] == 255)
    # only the corner changed in poisoned images; clean images untouched
    rest = x[m].clone()
    rest[:, :, -3:, -3:] = small_train.x[m][:, :, -3:, -3:]
    assert torch.equal(rest, small_train.x[m])
    assert torch.equal(x[~m], small_train.x[~m])
    assert torch.all(ps.data.y[m] == 2) and torch.equal(ps.data.y[~m], small_train.y[~m])
    assert torch.equal(ps.true_labels, small_train.y)
    # seeded: the same generator seed selects the same samples
    again = get_attack("badnets").poison(small_train, 0.1, 2, torch.Generator().manual_seed(0))
    assert torch.equal(again.poison_mask, m)


def test_blend_opacity(small_train):
    att = get_attack("blend", alpha=0.2)
    ps = att.poison(small_train, 0.2, 0, torch.Generator().manual_seed(1))
    m = ps.poison_mask
    pattern = att.pattern(3, 32, torch.device("cpu"))
    expected = ((0.8 * small_train.x[m].float() / 255 + 0.2 * pattern) * 255).round().to(torch.uint8)
    assert torch.equal(ps.data.x[m], expected)
    assert torch.equal(ps.data.x[~m], small_train.x[~m])


def test_triggered_test_excludes_target(mini):
    att = get_attack("badnets")
    trig = att.triggered_test(mini.test, 0)
    assert len(trig) == int((mini.test.y != 0).sum())
    assert torch.all(trig.y == 0) and torch.all(trig.x[:, :, -3:, -3:] == 255)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5])
def test_bad_rate(small_train, rate):
    with pytest.raises(ConfigError, match="poison-rate"):
        get_attack("badnets").poison(small_train, rate, 0, torch.Generator())


def test_bad_target_and_params(small_train):
    with pytest.raises(ConfigError, match="--target 10"):
        get_attack("badnets").poison(small_train, 0.1, 10, torch.Generator())
    with pytest.raises(ConfigError, match="unknown parameter"):
        get_attack("blend", opacity=0.3)
    with pytest.raises(ConfigError, match="unknown attack"):
        get_attack("nope")
