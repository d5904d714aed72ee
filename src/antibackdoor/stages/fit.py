"""Training stages that defenses and detectors compose: train a model (fresh or given, with a custom loss where
needed), the plain backdoored model post-training defenses start from, and unlearning."""

from __future__ import annotations

import torch
from torch import nn

from ..data.imageset import ImageSet
from ..seeding import derive_seed
from ..training import LossFn, TrainConfig, train
from .context import DefenseContext


def train_stage(ctx: DefenseContext, data: ImageSet, cfg: TrainConfig, stage: str,
                sample_weight: torch.Tensor | None = None, seed_offset: int | str = 0,
                on_epoch_end=None, model: nn.Module | None = None,
                loss_fn: LossFn | None = None) -> tuple[nn.Module, list[dict]]:
    """Train a freshly initialised model (or ``model``) on ``data``, checkpointed under ``stage``.

    ``seed_offset`` names the stage's random streams: its initial weights (``ctx.fresh_model(seed_offset)``)
    and its batch order and augmentation (``derive_seed(ctx.seed, "train", seed_offset)``). ``loss_fn``
    replaces the cross-entropy (``training.train``).

    With ``ctx.stage_cache`` set (bench cells), a stage that another run has already trained with the same
    data, initial weights, config, seed and precision is loaded instead of trained again; stages with an
    epoch callback or their own loss are always trained (the cache key cannot tell their objectives apart).
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
                     precision=prec, loss_fn=loss_fn)

    cache = ctx.stage_cache
    if cache is None or on_epoch_end is not None or loss_fn is not None:
        return model, fit()
    return model, cache.train_or_load(model, data, cfg, seed=seed, stage=stage, fit=fit,
                                      sample_weight=sample_weight, precision=prec)


def backdoored_model(ctx: DefenseContext, data: ImageSet, cfg: TrainConfig, stage: str = "backdoored",
                     seed_offset: int | str = 0) -> tuple[nn.Module, list[dict]]:
    """A model trained with plain cross-entropy on all the (possibly poisoned) data: what post-training
    defenses (NAD, D-BR) purify. With seed offset 0 it starts and trains like the ``none`` defense."""
    return train_stage(ctx, data, cfg, stage, seed_offset=seed_offset)


def unlearn(ctx: DefenseContext, model: nn.Module, data: ImageSet, cfg: TrainConfig, stage: str,
            seed_offset: int | str = 0) -> list[dict]:
    """Gradient ascent on the cross-entropy of ``data`` (every sample weighted -1), in place: ABL's
    backdoor unlearning on its isolated samples."""
    weight = -torch.ones(len(data))
    _, history = train_stage(ctx, data, cfg, stage, sample_weight=weight, seed_offset=seed_offset, model=model)
    return history
