"""Stages that defenses compose: train a model, score samples adversarially, split by a threshold.

Each is a plain function so that a defense's ``run`` reads like its paper's algorithm.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from ..adversarial.pgd import PGDConfig, PGDStats, pgd_statistics
from ..data.imageset import ImageSet
from ..seeding import derive_seed
from ..training import TrainConfig, train
from .base import DefenseContext

log = logging.getLogger("antibackdoor")


def train_stage(ctx: DefenseContext, data: ImageSet, cfg: TrainConfig, stage: str,
                sample_weight: torch.Tensor | None = None, seed_offset: int | str = 0,
                on_epoch_end=None, model: nn.Module | None = None) -> tuple[nn.Module, list[dict]]:
    """Train a freshly initialised model (or ``model``) on ``data``, checkpointed under ``stage``.

    ``seed_offset`` names the stage's random streams: its initial weights (``ctx.fresh_model(seed_offset)``)
    and its batch order and augmentation (``derive_seed(ctx.seed, "train", seed_offset)``).

    With ``ctx.stage_cache`` set (bench cells), a stage that another run has already trained with the same
    data, initial weights, config, seed and precision is loaded instead of trained again; stages with an
    epoch callback are always trained.
    """
    fresh = model is None
    model = model if model is not None else ctx.fresh_model(seed_offset)
    if fresh or cfg.epochs > 0:  # a given model with 0 epochs keeps whatever training it had
        ctx.note_trained(model, cfg.epochs > 0)
    seed = derive_seed(ctx.seed, "train", seed_offset)
    prec = ctx.compute_precision()

    def fit() -> list[dict]:
        return train(model, data, cfg, seed=seed, device=ctx.device, checkpoint=ctx.checkpoint(stage),
                     resume=ctx.resume, desc=stage, sample_weight=sample_weight, on_epoch_end=on_epoch_end,
                     precision=prec)

    cache = ctx.stage_cache
    if cache is None or on_epoch_end is not None:
        return model, fit()
    return model, cache.train_or_load(model, data, cfg, seed=seed, stage=stage, fit=fit,
                                      sample_weight=sample_weight, precision=prec)


def adversarial_scores(model: nn.Module, data: ImageSet, cfg: PGDConfig, ctx: DefenseContext,
                       desc: str | None = "scoring") -> PGDStats:
    """Attack every sample with ``cfg`` (eval mode, whole batches) and return per-sample statistics.

    The model runs in the context's precision (bf16 autocast where the hardware has it natively); the
    per-sample losses are fp32 either way.
    """
    return pgd_statistics(model, data.x, data.y, cfg, device=ctx.device, progress=desc,
                          precision=ctx.compute_precision())


def sample_losses(model: nn.Module, data: ImageSet, ctx: DefenseContext, loss: str = "ce") -> torch.Tensor:
    """Per-sample loss (``ce`` or ``sce``) of ``model`` on the clean images, w.r.t. the given labels (eval mode,
    whole batches): the PGD engine with zero steps."""
    cfg = PGDConfig(eps=0.0, step=0.0, steps=0, random_start=False, loss=loss)
    return adversarial_scores(model, data, cfg, ctx, desc=None).loss


def otsu_threshold(scores: torch.Tensor) -> float:
    """Otsu's threshold (scikit-image) on a 1-D score distribution; the midpoint if all scores are equal."""
    from skimage.filters import threshold_otsu

    values = scores.double().cpu().numpy()
    if values.size == 0:
        raise ValueError("no scores to threshold")
    if np.ptp(values) == 0:
        return float(values[0])
    nbins = 1024
    t = float(threshold_otsu(values, nbins=nbins))
    # skimage returns the centre of the threshold's histogram bin, which can lie below values of the lower
    # class in that same bin; move it to the middle of the gap between the two classes it defines.
    upper = t + np.ptp(values) / nbins / 2
    below, above = values[values <= upper], values[values > upper]
    if below.size and above.size:
        t = float((below.max() + above.min()) / 2)
    return t
