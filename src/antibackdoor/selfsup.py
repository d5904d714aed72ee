"""Self- and semi-supervised pieces for DBD: SimCLR (contrastive pre-training of a backbone) and MixMatch
(semi-supervised training from a labelled and an unlabelled set).

Both work on any registered model: the backbone's output is the penultimate feature vector (captured at the
input of the final linear layer, see models/features.py), and the final linear layer is the classifier head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .seeding import rng_from


# -- SimCLR ------------------------------------------------------------------------------------------------
class ProjectionHead(nn.Module):
    """SimCLR's MLP projection head: Linear - BatchNorm - ReLU - Linear (to ``out_dim``)."""

    def __init__(self, dim: int, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                                 nn.Linear(dim, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(h), dim=1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over a batch of view pairs (Chen et al. 2020).

    ``z1[i]`` and ``z2[i]`` (L2-normalised) are the two views of sample i: each of the 2N embeddings must pick
    its partner among the other 2N - 1 by cosine similarity / temperature. Mean over the 2N anchors.
    """
    n = z1.shape[0]
    z = torch.cat([z1, z2]).float()
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(-math.inf)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, partner)


# -- MixMatch ----------------------------------------------------------------------------------------------
def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixMatch's sharpening: p^(1/T), renormalised per row."""
    pt = p.pow(1.0 / temperature)
    return pt / pt.sum(1, keepdim=True)


def mixup(x: torch.Tensor, targets: torch.Tensor, alpha: float,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MixMatch's MixUp: one lambda' = max(l, 1 - l), l ~ Beta(alpha, alpha), mixing every row with a row of a
    random permutation, so that the mix stays closer to its first input."""
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    with rng_from(generator):
        lam = float(beta.sample())
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm], lam


def mixmatch_loss(logits_x: torch.Tensor, targets_x: torch.Tensor, logits_u: torch.Tensor,
                  targets_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_x: cross-entropy with soft targets on the labelled part; L_u: squared error of probabilities on the
    unlabelled part (mean over rows and classes, as in MixMatch)."""
    lx = -(F.log_softmax(logits_x.float(), 1) * targets_x).sum(1).mean()
    lu = ((torch.softmax(logits_u.float(), 1) - targets_u) ** 2).mean()
    return lx, lu


@torch.no_grad()
def guess_labels(model: nn.Module, views: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """MixMatch's label guess: the sharpened mean prediction over the augmented views of unlabelled samples."""
    return sharpen(mean_prediction(model, views), temperature)


@torch.no_grad()
def mean_prediction(model: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """The mean softmax prediction (fp32) over the augmented views of the same samples, one forward pass per view.

    A batch of one sample (an unlabelled pool of one) cannot pass a model in train mode one view at a time:
    BatchNorm needs two values per channel, which a small image no longer has at the last stage. Its views then
    pass together, and a single view of a single sample passes in eval mode."""
    n = views[0].shape[0]
    if n >= 2:
        return torch.stack([torch.softmax(model(v).float(), 1) for v in views]).mean(0)
    joined, was_training = torch.cat(views), model.training
    model.train(was_training and joined.shape[0] >= 2)
    try:
        p = torch.softmax(model(joined).float(), 1)
    finally:
        model.train(was_training)
    return p.view(len(views), n, -1).mean(0)


def sharpen_hard(p: torch.Tensor) -> torch.Tensor:
    """Sharpening's limit T -> 0: the one-hot of each row's largest entry (ties share it equally), as VaB's
    pseudo-labels."""
    top = (p == p.max(1, keepdim=True).values).float()
    return top / top.sum(1, keepdim=True)
