"""The deployed-model wrapper (models/wrappers.py) and its one-file format (models/io.py): a constructed network
whose answers are known shows the stamp and the label map exactly; save/load gives the same module back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import antibackdoor
from antibackdoor.adversarial.pgd import PGDConfig, pgd
from antibackdoor.data.imageset import ImageSet
from antibackdoor.errors import DataError
from antibackdoor.models import build_model
from antibackdoor.models.features import capture
from antibackdoor.models.io import read_metadata, save_model
from antibackdoor.models.wrappers import StampAndRelabel, WrapperError, unwrap
from antibackdoor.seeding import seeded_rng

K = 4


class ReadsCorner(nn.Module):
    """Answers the class written in the bottom-right pixel of channel 0 (round(3 * value)), plus 1 (mod K) when
    the top-left pixel is above 1.5 (stamped: no image in [0, 1] has such a pixel); logit 10 for its answer and
    0.1 * k for every other class k, so that the whole vector, not only its argmax, is known. Keeps its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.detach().clone()
        answer = (torch.round(x[:, 0, -1, -1] * 3).long() + (x[:, 0, 0, 0] > 1.5).long()) % K
        logits = 0.1 * torch.arange(K, dtype=torch.float32).repeat(x.shape[0], 1)
        logits[torch.arange(x.shape[0]), answer] = 10.0
        return logits


def images(classes: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Random images in [0, 1] whose bottom-right pixel of channel 0 writes ``classes`` (value c / 3)."""
    x = torch.rand(len(classes), 3, size, size, generator=torch.Generator().manual_seed(0))
    x[:, 0, -1, -1] = classes.float() / 3
    return x


def square(size: int = 8, side: int = 3, value: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(1, 1, size, size)
    mask[..., :side, :side] = 1
    return torch.full((1, 3, size, size), value), mask


def test_stamp_and_relabel_maps_every_class_back_exactly():
    y = torch.tensor([0, 1, 2, 3, 3, 1])
    x = images(y)
    inner = ReadsCorner()
    assert torch.equal(inner(x).argmax(1), y)  # unstamped, the network reads the class
    pattern, mask = square()
    h = [(c + 1) % K for c in range(K)]  # the network was "taught" stamped class c -> c + 1
    model = StampAndRelabel(inner, pattern, mask, h)
    out = model(x)
    # the network saw the images stamped: value 2.0 in the 3x3 corner of every channel, every other pixel as given
    seen = inner.seen
    assert torch.equal(seen[:, :, :3, :3], torch.full((6, 3, 3, 3), 2.0))
    keep = mask[0, 0] == 0
    assert torch.equal(seen[:, :, keep], x[:, :, keep])
    # it answered c + 1; the wrapper's output class i is the network's class h(i): the logits are permuted exactly
    raw = inner(model.stamp(x))
    assert torch.equal(raw.argmax(1), (y + 1) % K)
    assert torch.equal(out, raw[:, h])
    assert torch.equal(out.argmax(1), y)
    # a permutation of the logits: softmax and cross-entropy speak of the original classes
    assert torch.allclose(out.softmax(1).sum(1), torch.ones(6))
    assert torch.equal(torch.nn.functional.cross_entropy(out, y, reduction="none"),
                       torch.nn.functional.cross_entropy(raw, (y + 1) % K, reduction="none"))


def test_the_wrapper_refuses_what_is_not_a_stamp_or_a_permutation():
    pattern, mask = square()
    with pytest.raises(WrapperError, match="not a permutation"):
        StampAndRelabel(ReadsCorner(), pattern, mask, [1, 1, 2, 3])
    with pytest.raises(WrapperError, match="mask: expected 1 x 1 x 8 x 8"):
        StampAndRelabel(ReadsCorner(), pattern, mask[:, :, :4], [0, 1, 2, 3])
    with pytest.raises(WrapperError, match="in \\[0, 1\\]"):
        StampAndRelabel(ReadsCorner(), pattern, mask * 2, [0, 1, 2, 3])


def like(size: int = 8) -> ImageSet:
    return ImageSet(torch.zeros(K, 3, size, size, dtype=torch.uint8), torch.arange(K), [f"c{i}" for i in range(K)],
                    (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "tiny")


def wrapped_cnn(size: int = 8) -> StampAndRelabel:
    with seeded_rng(0, "test", "wrapper"):
        net = build_model("cnn-small", K, 3, size, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    pattern, mask = square(size)
    return StampAndRelabel(net, pattern, mask, [2, 0, 3, 1]).eval()


def test_gradients_flow_through_the_wrapper_except_where_the_stamp_overwrites_the_image():
    """RA attacks the wrapper end to end: the input gradient is the network's at the stamped image, read through
    the label map, outside the stamp, and exactly 0 under it (the stamp replaces those pixels)."""
    model = wrapped_cnn()
    h = model.label_map
    y = torch.tensor([0, 1, 2, 3, 1])
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(2)).requires_grad_()
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y, reduction="sum"), x)
    xs = model.stamp(x.detach()).requires_grad_()
    (inner,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model.net(xs), h[y], reduction="sum"), xs)
    assert torch.equal(grad[:, :, :3, :3], torch.zeros(5, 3, 3, 3))
    assert torch.allclose(grad, inner * (1 - model.mask), atol=1e-7)
    assert bool((grad[:, :, 3:, 3:] != 0).any())
    # PGD on the wrapper: its prediction is the wrapper's at the adversarial point, which moved off the image
    res = pgd(model, x.detach(), y, PGDConfig(eps=8 / 255, step=2 / 255, steps=3, random_start=False))
    with torch.no_grad():
        assert torch.equal(res.pred, model(res.x_adv).argmax(1))
    assert bool((res.x_adv != x.detach()).any())


def test_a_wrapped_model_round_trips_through_one_file(tmp_path):
    model = wrapped_cnn()
    path = save_model(model, tmp_path / "model.safetensors", "cnn-small", like(), defense="pdb")
    meta = read_metadata(path)
    assert meta["wrapper"] == "stamp-relabel" and json.loads(meta["wrapper_label_map"]) == [2, 0, 3, 1]
    assert meta["model"] == "cnn-small" and meta["defense"] == "pdb"
    assert {"pattern", "mask"} <= set(load_file(str(path)))
    loaded = antibackdoor.load_model(path)
    assert isinstance(loaded, StampAndRelabel) and loaded.wrapper == "stamp-relabel" and not loaded.training
    assert loaded.label_map.tolist() == [2, 0, 3, 1] and loaded.classes == ["c0", "c1", "c2", "c3"]
    assert torch.equal(loaded.pattern, model.pattern) and torch.equal(loaded.mask, model.mask)
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        # the network inside is the saved one, and the wrapper is what changes the answer
        assert torch.equal(unwrap(loaded)(x), model.net(x))
    # features of a wrapped model are its network's on the stamped input
    with torch.no_grad(), capture(loaded, stages=False) as f:
        loaded(x)
    with torch.no_grad(), capture(model.net, stages=False) as g:
        model.net(model.stamp(x))
    assert torch.equal(f.penultimate, g.penultimate)


def test_a_plain_model_loads_unwrapped(tmp_path):
    net = wrapped_cnn().net
    path = save_model(net, tmp_path / "plain.safetensors", "cnn-small", like())
    assert "wrapper" not in read_metadata(path)
    loaded = antibackdoor.load_model(path)
    assert not isinstance(loaded, StampAndRelabel) and loaded.wrapper is None


@pytest.mark.parametrize("change, message", [
    (lambda meta, state: meta.update(wrapper="mystery"), "wrapper 'mystery' is not a known wrapper"),
    (lambda meta, state: meta.update(wrapper_label_map="[0, 0, 1, 2]"), "is not a permutation"),
    (lambda meta, state: meta.update(wrapper_label_map="[0, 1, 2]"), "maps 3 classes, the model has 4"),
    (lambda meta, state: meta.pop("wrapper_label_map"), "lacks or garbles wrapper_label_map"),
    (lambda meta, state: state.pop("mask"), "holds no mask tensor"),
    (lambda meta, state: state.update(pattern=torch.zeros(1, 1, 8, 8)), "pattern: expected 1 x 3 x 8 x 8"),
])
def test_load_model_refuses_a_wrapper_that_does_not_fit(tmp_path, change, message):
    path = save_model(wrapped_cnn(), tmp_path / "model.safetensors", "cnn-small", like())
    meta, state = read_metadata(path), load_file(str(path))
    change(meta, state)
    save_file(state, str(path), metadata=meta)
    with pytest.raises(DataError, match=message) as err:
        antibackdoor.load_model(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
