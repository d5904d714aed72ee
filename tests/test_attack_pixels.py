"""The few-pixel trigger family: which pixels change, to what, labels, rate, layouts, positions, bad params."""

from __future__ import annotations

import pytest
import torch

from antibackdoor.attacks import get_attack
from antibackdoor.errors import ConfigError

TARGET = 3


def changed_pixels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """H x W bool: pixels that differ in any channel of any image."""
    return (a != b).any(1).any(0)


def coords(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in mask.nonzero()}


@pytest.mark.parametrize("params, expected", [
    ({}, {(30, 30)}),  # one white pixel, one pixel in from the bottom-right corner
    ({"pixels": 4}, {(28, 28), (28, 30), (30, 28), (30, 30)}),  # four isolated pixels, spacing 2
    ({"pixels": 9, "spacing": 1, "row": 5, "col": 20}, {(r, c) for r in range(5, 8) for c in range(20, 23)}),
    ({"layout": "line", "pixels": 3, "corner": "top-left", "margin": 0}, {(0, 0), (0, 2), (0, 4)}),
    ({"layout": "ell", "row": 11, "col": 16}, {(11, 16), (12, 16), (11, 17)}),
    ({"layout": "x", "corner": "bottom-left", "margin": 2}, {(27, 2), (27, 4), (28, 3), (29, 2), (29, 4)}),
])
def test_layout_and_position(params, expected):
    att = get_attack("pixels", **params)
    assert coords(att.mask(32, 32)) == expected
    x = torch.rand(4, 3, 32, 32)
    out = att.apply(x)
    assert coords(changed_pixels(out, x)) == expected


def test_poison_contract(small_train):
    """Only the trigger's pixels change, to the colour; labels go to the target; the rate is respected."""
    color = (1.0, 0.0, 0.2)
    att = get_attack("pixels", pixels=4, color=list(color))
    ps = att.poison(small_train, 0.1, TARGET, torch.Generator().manual_seed(0))
    m = ps.poison_mask
    assert int(m.sum()) == 30
    trig = att.mask(32, 32)
    x = ps.data.x
    assert torch.equal(x[~m], small_train.x[~m])  # clean samples untouched
    # outside the trigger poisoned images are unchanged; inside they hold the colour exactly
    assert torch.equal(x[m][:, :, ~trig], small_train.x[m][:, :, ~trig])
    want = (torch.tensor(color) * 255).round().to(torch.uint8)
    assert torch.equal(x[m][:, :, trig], want[None, :, None].expand(30, 3, 4))
    assert (ps.data.y[m] == TARGET).all() and torch.equal(ps.data.y[~m], small_train.y[~m])
    assert torch.equal(ps.true_labels, small_train.y)
    assert ps.num_cover == 0
    test = att.triggered_test(small_train, TARGET)
    assert len(test) == int((small_train.y != TARGET).sum()) and (test.y == TARGET).all()
    assert torch.equal(test.x[:, :, trig], want[None, :, None].expand(len(test), 3, 4))


def test_apply_on_float_images_keeps_dtype_and_range():
    att = get_attack("pixels", layout="scattered", pixels=6, box=4, pattern_seed=3, color=[0.5])
    x = torch.rand(5, 3, 32, 32, dtype=torch.float64)
    out = att.apply(x)
    assert out.dtype == x.dtype and out.shape == x.shape and not torch.equal(out, x)
    m = att.mask(32, 32)
    assert int(m.sum()) == 6 and coords(m) <= {(r, c) for r in range(27, 31) for c in range(27, 31)}
    assert (out[:, :, m] == 0.5).all() and torch.equal(out[:, :, ~m], x[:, :, ~m])
    # the seed fixes the positions; another seed draws others
    assert torch.equal(get_attack("pixels", layout="scattered", pixels=6, box=4, pattern_seed=3).mask(32, 32), m)
    assert not torch.equal(get_attack("pixels", layout="scattered", pixels=6, box=4, pattern_seed=4).mask(32, 32), m)
    # one-channel images take a single colour value
    gray = att.apply(torch.zeros(2, 1, 32, 32))
    assert int((gray == 0.5).sum()) == 12


def test_paper_preset_is_tran_single_pixel():
    att = get_attack("pixels", "paper")
    assert coords(att.mask(32, 32)) == {(11, 16)}
    out = att.apply(torch.zeros(1, 3, 32, 32))
    torch.testing.assert_close(out[0, :, 11, 16], torch.tensor([101 / 255, 0.0, 25 / 255]))


@pytest.mark.parametrize("params, key", [
    ({"pixels": 0}, "pixels"),
    ({"layout": "x", "pixels": 4}, "pixels"),
    ({"layout": "scattered", "pixels": 10, "box": 3}, "pixels"),
    ({"spacing": 0}, "spacing"),
    ({"margin": -1}, "margin"),
    ({"row": 3}, "col"),
    ({"color": [1.5]}, "color"),
    ({"color": 1.0}, "color"),
    ({"layout": "diagonal"}, "layout"),
])
def test_bad_params_are_one_line_errors(params, key):
    with pytest.raises(ConfigError, match=rf"^--attack-param {key}: [^\n]+$"):
        get_attack("pixels", **params)


def test_trigger_that_does_not_fit_is_rejected_before_poisoning(small_train):
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match=r"^--attack-param row: the 1x1 trigger at \(40, 0\) does not fit"):
        get_attack("pixels", row=40, col=0).poison(small_train, 0.1, TARGET, gen)
    with pytest.raises(ConfigError, match=r"^--attack-param margin: "):
        get_attack("pixels", pixels=144, spacing=3).poison(small_train, 0.1, TARGET, gen)
    with pytest.raises(ConfigError, match=r"^--attack-param color: 2 values for 3-channel images"):
        get_attack("pixels", color=[1.0, 0.0]).poison(small_train, 0.1, TARGET, gen)
