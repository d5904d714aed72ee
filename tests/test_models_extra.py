"""The papers' other architectures: shapes, one CPU training step, and parameter counts against references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from antibackdoor.models import MODELS, build_model, count_parameters

NEW = ["resnet34", "wrn16-1", "wrn16-2", "vgg16", "mobilenetv2", "densenet121"]



pytestmark = pytest.mark.usefixtures("one_thread")


# ours with 10 classes, 3 channels, 32 px (docs/models.md lists these)
COUNTS = {"resnet34": 21_282_122, "wrn16-1": 175_066, "wrn16-2": 691_674, "vgg16": 14_724_042,
          "mobilenetv2": 2_236_682, "densenet121": 6_956_298}


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("channels, size", [(1, 32), (3, 64)])
def test_shape_and_one_training_step(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, 5, channels, size)
    x = torch.rand(2, channels, size, size)
    y = torch.tensor([1, 4])
    out = model(x)
    assert out.shape == (2, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(out, y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("channels, size", [(3, 32), (1, 64), (1, 28)])
def test_output_shape(name, channels, size):
    """The other input kinds, incl. Fashion-MNIST's 28 px: VGG's five halvings must still reach its head."""
    model = build_model(name, 10, channels, size).eval()
    with torch.no_grad():
        assert model(torch.rand(2, channels, size, size)).shape == (2, 10)


@pytest.mark.parametrize("name", NEW)
def test_parameter_counts(name):
    assert MODELS[name].description
    builder = MODELS[name].builder
    assert count_parameters(builder(num_classes=10, in_channels=3, image_size=32)) == COUNTS[name]
    # the 64 px variant strides its stem: same weights, same cost as 32 px
    assert count_parameters(builder(num_classes=10, in_channels=3, image_size=64)) == COUNTS[name]


def test_counts_match_published_imagenet_versions():
    """With 1000 classes our models equal torchvision's ImageNet ones up to the stem (7x7 conv + its BN)."""

    def ours(name):
        return count_parameters(MODELS[name].builder(num_classes=1000, in_channels=3, image_size=32))

    stem_7x7_minus_3x3 = 64 * 3 * (49 - 9)
    assert ours("mobilenetv2") == 3_504_872  # same 3x3 stem
    assert ours("resnet34") + stem_7x7_minus_3x3 == 21_797_672
    assert ours("densenet121") + stem_7x7_minus_3x3 + 2 * 64 == 7_978_856  # + DenseNet's stem BatchNorm


def test_build_model_normalises_first():
    model = build_model("wrn16-1", 3, 3, 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.allclose(model[0](torch.full((1, 3, 2, 2), 0.75)), torch.ones(1, 3, 2, 2))
