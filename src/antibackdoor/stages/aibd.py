"""AIBD's scorer (steps 2-3 of Algorithm 1), shared by the ``aibd`` defense and the ``aibd-flip`` detector:
unbounded PGD flip counts k, Eq. 4's amplification, and the target guess on the ranking they give."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..adversarial.pgd import PGDConfig, PGDStats
from ..data.imageset import ImageSet
from ..surplus import ALPHA, Surplus, class_surplus
from .context import DefenseContext
from .scores import adversarial_scores

#: top fractions of the ranking by k at which the class-surplus test reads the target class
TARGET_FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.20)  # 20 %: the largest q of AIBD's schedule


def flip_config(step: float, cap: int, grad_norm_p: float = 1.0) -> PGDConfig:
    """Unbounded (eps = inf) sign-gradient PGD with early stop: the flip-counting attack of step 2 (``cap``
    steps of ``step`` at most; the input gradient's ``grad_norm_p`` norm at the clean input is recorded)."""
    return PGDConfig(eps=math.inf, step=step, steps=cap, random_start=False, loss="ce", early_stop=True,
                     grad_norm_p=grad_norm_p)


def flip_statistics(model: nn.Module, data: ImageSet, ctx: DefenseContext, step: float, cap: int,
                    grad_norm_p: float = 1.0) -> PGDStats:
    """Step 2 on every sample: first flip step and label, input-gradient norm (eval mode, whole batches)."""
    return adversarial_scores(model, data, flip_config(step, cap, grad_norm_p), ctx, desc="aibd flip counting")


def flip_counts(stats: PGDStats, cap: int) -> torch.Tensor:
    """k_i: steps until the prediction left the label (0 = already misclassified), ``cap`` if it never did."""
    return torch.where(stats.flip_step >= 0, stats.flip_step, torch.full_like(stats.flip_step, cap))


def amplified_scores(k: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """Eq. 4 in float64: (1 - sigmoid(g)) * k, written as sigmoid(-g) * k so that a large g does not round
    the factor to exactly 0 (float32 1 - sigmoid(g) is 0 for g > 17, which would tie many samples)."""
    return torch.sigmoid(-grad_norm.double()) * k.double()


def flip_scores(stats: PGDStats, cap: int, amplify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, k): AIBD's score of every sample (Eq. 4, or the raw k without ``amplify``; high = suspicious)."""
    k = flip_counts(stats, cap)
    return (amplified_scores(k, stats.grad_norm) if amplify else k.double()), k


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Indices by decreasing score; ties keep index order, so the split is deterministic."""
    return torch.sort(scores.double(), descending=True, stable=True).indices


def guess_target(order: torch.Tensor, y: torch.Tensor, classes: list[str],
                 fractions: tuple[float, ...] = TARGET_FRACTIONS, alpha: float = ALPHA) -> Surplus:
    """The class-surplus test on the ranking by k: ``.target`` is the class whose share of the top
    ``fractions`` of the ranking exceeds its share of the data beyond the other classes' spread (adjusted
    p < ``alpha``), or None; ``.best`` and ``.p`` are the strongest candidate either way.

    A count vote (the most frequent label among the top 1 %) is fooled by a clean class whose samples are
    naturally hard to flip: a few dozen such samples outvote the poison at the very top although the poison
    outnumbers them further down. (The official code's vote, over int(N * 1e-5) samples, is even empty on
    CIFAR-10 and always answers class 0.) The surplus test reads several depths and weighs each class
    against its size and the other classes' spread.
    """
    order_np = order.cpu().numpy()
    return class_surplus(y.cpu().numpy(), order_np, np.zeros(len(order_np), bool), classes, alpha, fractions)
