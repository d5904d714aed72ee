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
from ..training import TrainConfig, train
from .base import DefenseContext

log = logging.getLogger("antibackdoor")


def train_stage(ctx: DefenseContext, data: ImageSet, cfg: TrainConfig, stage: str,
                sample_weight: torch.Tensor | None = None, seed_offset: int = 0,
                on_epoch_end=None, model: nn.Module | None = None) -> tuple[nn.Module, list[dict]]:
    """Train a freshly initialised model (or ``model``) on ``data``, checkpointed under ``stage``.

    With ``ctx.stage_cache`` set (bench cells), a stage that another run has already trained with the same
    data, initial weights, config and seed is loaded instead of trained again; stages with an epoch
    callback are always trained.
    """
    model = model if model is not None else ctx.fresh_model(seed_offset)
    seed = ctx.seed * 31 + seed_offset

    def fit() -> list[dict]:
        return train(model, data, cfg, seed=seed, device=ctx.device, checkpoint=ctx.checkpoint(stage),
                     resume=ctx.resume, desc=stage, sample_weight=sample_weight, on_epoch_end=on_epoch_end)

    cache = ctx.stage_cache
    if cache is None or on_epoch_end is not None:
        return model, fit()
    context = {"device": ctx.device.type, "precision": getattr(ctx, "precision", None)}
    return model, cache.train_or_load(model, data, cfg, seed=seed, stage=stage, fit=fit,
                                      sample_weight=sample_weight, context=context)


def adversarial_scores(model: nn.Module, data: ImageSet, cfg: PGDConfig, ctx: DefenseContext,
                       desc: str = "scoring") -> PGDStats:
    """Attack every sample with ``cfg`` (eval mode, whole batches) and return per-sample statistics.

    On a GPU the attack runs under bf16 autocast with channels_last batches (the losses stay fp32); on the
    CPU in plain fp32, where the scores are those the tests compare with the batch-of-one reference.
    """
    gpu = ctx.device.type == "cuda"
    return pgd_statistics(model, data.x, data.y, cfg, device=ctx.device, progress=desc, amp=gpu,
                          channels_last=gpu)


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
