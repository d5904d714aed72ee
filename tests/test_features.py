"""The feature interface (stages and penultimate features) holds for every registered model."""

from __future__ import annotations

import pytest
import torch

from antibackdoor.models import MODELS, build_model
from antibackdoor.models.features import capture, classifier_head, penultimate_features, stage_modules

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stages_and_penultimate_of_every_model(name):
    torch.manual_seed(0)
    model = build_model(name, 7, 3, 32).eval()
    x = torch.rand(3, 3, 32, 32)
    with capture(model) as feats:
        logits = model(x)
    stages = stage_modules(model)
    assert list(feats.stages) == list(stages) and len(stages) >= 3
    sizes = [t.shape[-1] for t in feats.stages.values()]
    assert all(t.dim() == 4 and t.shape[0] == 3 for t in feats.stages.values())
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]  # each stage at a coarser resolution
    head = classifier_head(model)
    assert feats.penultimate.shape == (3, head.in_features)
    torch.testing.assert_close(head(feats.penultimate), logits)


def test_captured_features_carry_gradients_and_hooks_are_removed():
    model = build_model("cnn-small", 4, 3, 32)
    x = torch.rand(4, 3, 32, 32)
    with capture(model, stages=["features.7"]) as feats:
        model(x)
    feats.stages["features.7"].pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_penultimate_features_match_batches_of_any_size():
    model = build_model("cnn-small", 4, 3, 32).eval()
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    a = penultimate_features(model, images, batch_size=3)
    b = penultimate_features(model, images, batch_size=10)
    assert a.shape == (10, classifier_head(model).in_features)
    torch.testing.assert_close(a, b)
