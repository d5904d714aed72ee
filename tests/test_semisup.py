"""The shared semi-supervised step (stages/semisup.py) and the mixing augmentations (stages/mixing.py) on
constructed batches: sharpening, the pools' batches, the unlabelled weight's ramp, the losses of one step on a
model whose outputs are known, labels never read from the unlabelled pool, and MixUp / CutMix / AttentionMix
mixing images and targets by the same shares."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from antibackdoor.data.imageset import ImageSet
from antibackdoor.models import build_model
from antibackdoor.precision import PLAIN
from antibackdoor.seeding import seeded_rng
from antibackdoor.selfsup import sharpen, sharpen_hard
from antibackdoor.stages.mixing import AttentionMix, CutMix, MixUp, attention_mix, cutmix, no_mix
from antibackdoor.stages.semisup import (
    PoolSampler,
    SemiSpec,
    guess,
    linear_rampup,
    semisup_epoch,
    semisup_losses,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class MeanColour(nn.Module):
    """Logits = W @ (mean of each channel): a model whose every output is known, with no BatchNorm."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.w = nn.Parameter(torch.arange(3 * classes, dtype=torch.float32).reshape(classes, 3) / 4 - 1)

    def forward(self, x):
        return x.mean(dim=(2, 3)) @ self.w.t()


def colour_set(n: int = 12, classes: int = 3, size: int = 4) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageSet(x, torch.arange(n) % classes, [str(c) for c in range(classes)], (0.5,) * 3, (0.25,) * 3, "c")


def test_sharpening_and_its_hard_limit():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    assert torch.allclose(sharpen(p, 0.5), p ** 2 / (p ** 2).sum(1, keepdim=True))
    assert torch.equal(sharpen_hard(p), torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))  # ties share
    # a low temperature approaches the hard limit
    assert torch.allclose(sharpen(p[:1], 0.01), sharpen_hard(p[:1]), atol=1e-6)


def test_unlabelled_weight_ramps_linearly():
    assert [linear_rampup(15.0, e, 10) for e in (0, 2.5, 10, 30)] == [0.0, 3.75, 15.0, 15.0]
    assert linear_rampup(15.0, 0.5, 0) == 7.5  # rampup 0 counts as one epoch


def test_pool_sampler_passes_and_draws():
    pool = torch.tensor([3, 5, 7, 11, 13])
    g = torch.Generator().manual_seed(0)
    s = PoolSampler(pool, 2, "passes", g)
    first = torch.cat([s.next(), s.next()])
    # one pass: 4 distinct samples of the pool, then a new shuffle (the fifth is dropped, as drop_last)
    assert len(set(first.tolist())) == 4 and set(first.tolist()) <= set(pool.tolist())
    again = torch.cat([s.next(), s.next()])
    assert len(set(again.tolist())) == 4
    # a pool smaller than a batch gives the whole pool
    assert sorted(PoolSampler(pool[:3], 8, "passes", g).next().tolist()) == [3, 5, 7]
    drawn = PoolSampler(pool, 64, "random", g).next()
    assert drawn.shape == (64,) and set(drawn.tolist()) <= set(pool.tolist())


def test_guess_is_the_sharpened_mean_prediction_over_views():
    model = MeanColour()
    g = torch.Generator().manual_seed(1)
    views = [torch.rand(4, 3, 4, 4, generator=g) for _ in range(2)]
    mean = torch.stack([torch.softmax(model(v), 1) for v in views]).mean(0)
    assert torch.allclose(guess(model, views, 0.5, PLAIN), sharpen(mean, 0.5))
    assert torch.equal(guess(model, views, 0.0, PLAIN), sharpen_hard(mean))


class ModeAware(MeanColour):
    """MeanColour that records the mode and batch size of every forward pass and, like BatchNorm, refuses a
    train-mode batch of one row."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[bool, int]] = []

    def forward(self, x):
        self.calls.append((self.training, x.shape[0]))
        if self.training and x.shape[0] < 2:
            raise ValueError("Expected more than 1 value per channel when training")
        return super().forward(x)


def test_a_single_unlabelled_sample_is_guessed_from_its_views_together():
    g = torch.Generator().manual_seed(2)
    views = [torch.rand(1, 3, 4, 4, generator=g) for _ in range(2)]
    model = ModeAware().train()
    expected = torch.stack([torch.softmax(MeanColour()(v), 1) for v in views]).mean(0)
    assert torch.allclose(guess(model, views, 0.5, PLAIN), sharpen(expected, 0.5))
    assert model.calls == [(True, 2)] and model.training  # both views in one train-mode pass
    model.calls.clear()
    one = guess(model, views[:1], 0.0, PLAIN)  # one view of one sample: eval mode, and train mode after
    assert torch.equal(one, sharpen_hard(torch.softmax(MeanColour()(views[0]), 1)))
    assert model.calls == [(False, 1)] and model.training
    model.calls.clear()
    guess(model, [torch.rand(3, 3, 4, 4, generator=g) for _ in range(2)], 0.5, PLAIN)
    assert model.calls == [(True, 3), (True, 3)]  # larger batches: one pass per view, as MixMatch


def test_one_step_losses_on_a_known_model():
    """No augmentation and no mixing: both views of an unlabelled sample are its image, so its guess is the
    sharpened prediction of that image; L_x is the cross-entropy of the labelled images' given labels."""
    model, data = MeanColour(), colour_set()
    li, ui = torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6, 7])
    g = torch.Generator().manual_seed(0)
    lx, lu = semisup_losses(model, data, li, ui, SemiSpec(temperature=0.5), crop=0, flip=False, mixer=no_mix,
                            generator=g, precision=PLAIN, device="cpu")
    logits = model(data.x.float() / 255)
    logits = logits.detach()
    assert float(lx.detach()) == pytest.approx(float(F.cross_entropy(logits[li], data.y[li])), rel=1e-6)
    p = torch.softmax(logits[ui], 1)
    assert float(lu.detach()) == pytest.approx(float(((p - sharpen(p, 0.5)) ** 2).mean()), rel=1e-6)
    # the cross-entropy form of the unlabelled loss (VaB), with hard guesses
    _, lu_ce = semisup_losses(model, data, li, ui, SemiSpec(temperature=0.0, unlabelled_loss="ce"), crop=0,
                              flip=False, mixer=no_mix, generator=g, precision=PLAIN, device="cpu")
    assert float(lu_ce.detach()) == pytest.approx(float(F.cross_entropy(logits[ui], p.argmax(1))), rel=1e-6)
    # an adjustment of the targets (VaB's suppression) reaches the loss: zero targets give zero losses
    zero = semisup_losses(model, data, li, ui, SemiSpec(temperature=0.0, unlabelled_loss="ce"), crop=0, flip=False,
                          mixer=no_mix, generator=g, precision=PLAIN, device="cpu",
                          adjust=lambda tl, tu, a, b: (tl * 0, tu * 0))
    assert [float(v.detach()) for v in zero] == [0.0, 0.0]


def _epoch(data, labelled, seed=0, **kw):
    with seeded_rng(0, "test"):
        model = build_model("cnn-small", data.num_classes, image_size=data.image_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    stats = semisup_epoch(model, opt, data, labelled, SemiSpec(), epoch=kw.pop("epoch", 0), iterations=3,
                          batch_size=8, crop=2, flip=True, mixer=MixUp(0.75),
                          generator=torch.Generator().manual_seed(seed), precision=PLAIN, device="cpu", **kw)
    return model, stats


def test_the_unlabelled_pool_labels_are_never_read(small_train):
    data = small_train.subset(torch.arange(64))
    labelled = torch.arange(64) < 24
    model, stats = _epoch(data, labelled, weight_u=lambda e: 10.0)
    # any other labels on the unlabelled samples: the same training, bit for bit
    scrambled = data.y.clone()
    scrambled[~labelled] = (scrambled[~labelled] + 3) % 10
    other, _ = _epoch(data.with_labels(scrambled), labelled, weight_u=lambda e: 10.0)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # while the labelled samples' labels do change it (the comparison can fail)
    changed = data.y.clone()
    changed[labelled] = (changed[labelled] + 3) % 10
    third, _ = _epoch(data.with_labels(changed), labelled, weight_u=lambda e: 10.0)
    pairs = zip(model.state_dict().values(), third.state_dict().values(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)
    assert set(stats) == {"loss", "lx", "lu", "lambda_u"}


def test_the_epoch_reports_the_ramped_weight_and_an_empty_unlabelled_pool_trains_labelled_only(small_train):
    data = small_train.subset(torch.arange(48))
    labelled = torch.arange(48) < 16
    _, stats = _epoch(data, labelled, epoch=2, weight_u=lambda e: linear_rampup(15.0, e, 10))
    assert stats["lambda_u"] == linear_rampup(15.0, 2 + 2 / 3, 10)  # the last of 3 steps of epoch 2
    _, alone = _epoch(data, labelled, weight_u=lambda e: 15.0, unlabelled=torch.zeros(48, dtype=torch.bool))
    assert alone["lu"] == 0.0 and alone["loss"] == alone["lx"] > 0


def _encoded(targets: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Images whose channel k holds the target's k-th entry everywhere: a pixel mean per channel reads the
    share of each image a mix kept."""
    return targets[:, :, None, None].expand(-1, -1, size, size).clone()


def test_mixup_and_cutmix_mix_images_and_targets_alike():
    t = torch.eye(6)
    g = torch.Generator().manual_seed(3)
    mixed, mt = MixUp(0.75)(None, _encoded(t), t, g, PLAIN)
    assert torch.allclose(mixed.mean(dim=(2, 3)), mt) and (mt.max(1).values >= 0.5 - 1e-6).all()
    for seed in range(5):
        mixed, mt, kept = cutmix(_encoded(t), t, 1.0, torch.Generator().manual_seed(seed))
        assert torch.allclose(mixed.mean(dim=(2, 3)), mt, atol=1e-6)  # the targets follow the pasted area
        assert torch.allclose(mt.sum(1), torch.ones(6)) and 0.0 <= kept <= 1.0
    out, _ = CutMix(1.0)(None, _encoded(t), t, torch.Generator().manual_seed(0), PLAIN)
    assert out.shape == (6, 6, 8, 8)


SWAP_SEED = 1


def test_attention_mix_on_constructed_attention():
    """Sample 0 attends only to the left half, sample 1 everywhere alike: with threshold 0.5, sample 0 mixes
    its left half (all of its attention, w = 1) with sample 1's, which holds half of sample 1's attention
    (c = 0.5): the half becomes 2/3 own and 1/3 partner, and 1/3 of the label moves; sample 1's region is the
    whole image (w = 1) and holds all of sample 0's attention (c = 1): half of it and half of its label move."""
    att = torch.zeros(2, 1, 4, 4)
    att[0, :, :, :2] = 1.0
    att[1] = 1.0
    x = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    t = torch.eye(2)
    # the generator's permutation swaps the two (CPU generators draw the same everywhere)
    assert torch.randperm(2, generator=torch.Generator().manual_seed(SWAP_SEED)).tolist() == [1, 0]
    g = torch.Generator().manual_seed(SWAP_SEED)
    mixed, mt, area = attention_mix(x, att, t, 0.5, g)
    assert torch.allclose(mixed[0, :, :, :2], torch.full((3, 4, 2), 1 / 3))
    assert torch.equal(mixed[0, :, :, 2:], torch.zeros(3, 4, 2))
    assert torch.allclose(mt[0], torch.tensor([2 / 3, 1 / 3]))
    assert torch.allclose(mixed[1], torch.full((3, 4, 4), 0.5)) and torch.allclose(mt[1], torch.tensor([0.5, 0.5]))
    assert area.tolist() == [0.5, 1.0]
    # with the model's own attention (its last stage), shapes and label mass are kept
    model = build_model("cnn-small", 2, image_size=16)
    xs = torch.rand(4, 3, 16, 16, generator=g)
    ts = F.one_hot(torch.tensor([0, 1, 0, 1]), 2).float()
    out, mts = AttentionMix(0.1)(model, xs, ts, g, PLAIN)
    assert out.shape == xs.shape and torch.allclose(mts.sum(1), torch.ones(4))

