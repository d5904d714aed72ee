"""DBD's pieces on constructed inputs (SimCLR loss, MixMatch sharpening/mixing/losses, the frozen warm-up)
and one tiny end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch

import antibackdoor as ab
from antibackdoor.defenses.base import DefenseContext
from antibackdoor.defenses.dbd import DBD
from antibackdoor.models.features import classifier_head
from antibackdoor.selfsup import guess_labels, mixmatch_loss, mixup, nt_xent, sharpen
from antibackdoor.stages.dbd import lowest, sce_scores, warmup_head


def test_nt_xent_closed_form():
    # orthonormal embeddings, both views identical: the partner has similarity 1, the other 2N - 2 have 0
    n, t = 4, 0.5
    z = torch.eye(8)[:n]
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + (2 * n - 2)))
    assert float(nt_xent(z, z.clone(), t)) == pytest.approx(expected, rel=1e-6)
    # swapping partners makes it worse; the loss is symmetric in the two views
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    b = torch.nn.functional.normalize(a + 0.05 * torch.randn(6, 5, generator=g), dim=1)
    assert float(nt_xent(a, b)) < float(nt_xent(a, b.roll(1, 0)))
    assert float(nt_xent(a, b)) == pytest.approx(float(nt_xent(b, a)), rel=1e-6)


def test_sharpen_and_mixup():
    p = torch.tensor([[0.6, 0.3, 0.1]])
    s = sharpen(p, 0.5)
    assert torch.allclose(s, p ** 2 / (p ** 2).sum())
    assert torch.allclose(sharpen(p, 1.0), p)
    # the same lambda and permutation mix inputs and targets: mix one-hot "images" equal to their targets
    t = torch.eye(6)
    g = torch.Generator().manual_seed(1)
    mx, mt, lam = mixup(t.clone(), t.clone(), 0.75, g)
    assert lam >= 0.5 and torch.allclose(mx, mt)
    assert torch.allclose(mt.sum(1), torch.ones(6)) and (mt.max(1).values >= lam - 1e-6).all()


def test_mixmatch_loss_and_guess():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    lx, lu = mixmatch_loss(logits, targets, logits, targets)
    ls = torch.log_softmax(logits, 1)
    assert float(lx) == pytest.approx(float(-(ls * targets).sum(1).mean()))
    p = torch.softmax(logits, 1)
    assert float(lu) == pytest.approx(float(((p - targets) ** 2).mean()))

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    views = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    q = guess_labels(Fixed(), views, 0.5)
    mean = (torch.softmax(views[0], 1) + torch.softmax(views[1], 1)) / 2
    assert torch.allclose(q, sharpen(mean, 0.5))


def test_lowest_takes_the_labelled_fraction():
    s = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0, 0.0], dtype=torch.float64)
    assert lowest(s, 0.5).nonzero().squeeze(1).tolist() == [1, 3, 5]


def test_warmup_trains_the_head_only_and_keeps_batchnorm_statistics(small_train):
    data = small_train.subset(torch.arange(64))
    torch.manual_seed(0)
    model = ab.build_model("cnn-small", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = DBD("quick", {"warmup": {"epochs": 2, "batch_size": 16}}).params
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    warmup_head(model, opt, data, p, DefenseContext(lambda: model))
    head_ids = {id(q) for q in classifier_head(model).parameters()}
    head = {n for n, q in model.named_parameters() if id(q) in head_ids}
    after = model.state_dict()
    assert head and all(k in after for k in head)
    for k, v in before.items():
        if k in head:
            assert not torch.equal(v, after[k]), k
        else:
            assert torch.equal(v, after[k]), k  # conv weights and BatchNorm running statistics untouched
    s = sce_scores(model, data, p, "cpu")
    assert s.shape == (64,) and (s >= 0).all()


def test_dbd_end_to_end(tmp_path, tiny_npz):
    over = {"simclr": {"epochs": 1, "batch_size": 64}, "warmup": {"epochs": 1},
            "finetune": {"epochs": 2, "batch_size": 16}, "iterations": 3, "rampup": 2}
    r = ab.run_experiment({"dataset": f"npz:{tiny_npz}", "model": "cnn-small", "defense": "dbd",
                           "out": str(tmp_path), "defense_params": over})
    m = r.metrics
    assert m["defense_info"]["labelled"] == 120 and m["isolated"] == 120  # epsilon 0.5 of 240
    assert m["defense_info"]["rounds"] == 2 and 0 <= m["acc"] <= 1
    hist = r.result.history
    assert len(hist["simclr"]) == 1 and len(hist["warmup"]) == 1 and len(hist["rounds"]) == 2
    assert all(math.isfinite(h["loss"]) for h in hist["rounds"])
