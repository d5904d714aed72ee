"""Stages that defenses compose: train a model (with a custom loss where needed), score samples adversarially,
per-sample losses and features, rank and threshold scores, unlearn.

Each is a plain function so that a defense's ``run`` reads like its paper's algorithm, and so that a detector
can call one piece (e.g. per-sample losses) without running a whole defense.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from ..adversarial.pgd import PGDConfig, PGDStats, eval_mode, pgd_statistics
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..models.features import capture
from ..precision import Precision, as_precision
from ..seeding import derive_seed
from ..training import LossFn, TrainConfig, train
from .base import DefenseContext

log = logging.getLogger("antibackdoor")


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


@torch.no_grad()
def sample_features(model: nn.Module, data: ImageSet, device: torch.device | str = "cpu", layer: str | None = None,
                    transform=None, batch_size: int = 512,
                    precision: Precision | str | None = None) -> torch.Tensor:
    """Features of every sample in eval mode, in whole batches (float32, N x D, on the CPU).

    ``layer``: None for the penultimate features (the input of the final linear layer), or the name of one
    of the model's stages (``models.features.stage_modules``), flattened. ``transform(images, index)``, if
    given, maps each float batch in [0, 1] (with the samples' positions) to the images actually fed in.
    ``precision`` (None: the active one) sets the autocast dtype and layout, as in the training loop.
    """
    prec = as_precision(precision, device)
    parts = []
    stages = [layer] if layer is not None else False
    with eval_mode(model), capture(model, stages=stages, penultimate=layer is None) as feats:
        for s in range(0, len(data), batch_size):
            xb = data.x[s:s + batch_size].to(device).float().div_(255.0)
            if transform is not None:
                xb = transform(xb, torch.arange(s, s + xb.shape[0]))
            with prec.autocast():
                model(prec.batch(xb))
            out = feats.penultimate if layer is None else feats.stages[layer]
            parts.append(out.float().flatten(1).cpu())
    return torch.cat(parts) if parts else torch.empty(0)


def rank_fraction(scores: torch.Tensor, fraction: float, lowest: bool = True) -> torch.Tensor:
    """Mask of the int(fraction * N) lowest (or highest) scores, at least one; ties keep index order."""
    n = len(scores)
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction {fraction}: must be in (0, 1)")
    count = min(n, max(1, int(fraction * n + 1e-9)))
    order = torch.sort(scores.double().cpu(), descending=not lowest, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def agrees_with_label(model: nn.Module, data: ImageSet, ctx: DefenseContext) -> torch.Tensor:
    """Bool N (CPU): whether ``model`` predicts each sample's given label (eval mode, whole batches)."""
    from ..metrics import predict

    return predict(model, data, ctx.device, precision=ctx.compute_precision()) == data.y.cpu()


def take_back(model: nn.Module, data: ImageSet, kept: torch.Tensor, ctx: DefenseContext) -> torch.Tensor:
    """Bool N: the isolated samples (``~kept``) whose given label ``model`` predicts.

    Meant for a model that has not learned the backdoor (e.g. A-ABL's robust stage-3 model): it predicts a
    poisoned sample's true class, not the target label the sample was given, while it agrees with most clean
    samples, so this selects clean samples the split threw away and few poisoned ones.
    """
    isolated = ~kept.bool().cpu()
    selected = torch.zeros(len(data), dtype=torch.bool)
    idx = isolated.nonzero().squeeze(1)
    if len(idx):
        selected[idx] = agrees_with_label(model, data.subset(isolated), ctx)
    return selected


def otsu_threshold(scores: torch.Tensor, log_scale: bool = False) -> float:
    """Otsu's threshold (scikit-image) on a 1-D score distribution; the midpoint if all scores are equal.

    ``log_scale``: Otsu on log(score) (scores clamped to >= 1e-12), returned in the scores' own units; for
    non-negative scores spread over orders of magnitude, where the raw histogram crowds the low ones into few bins.
    """
    from skimage.filters import threshold_otsu

    values = scores.double().cpu().numpy()
    if values.size == 0:
        raise ValueError("no scores to threshold")
    if log_scale:
        return float(np.exp(otsu_threshold(torch.from_numpy(np.log(np.maximum(values, 1e-12))))))
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
