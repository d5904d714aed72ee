"""Per-sample passes over a trained model, in whole batches on the compute device: adversarial statistics (the
one PGD engine), losses, features, and whether the model agrees with each given label."""

from __future__ import annotations

import torch
from torch import nn

from ..adversarial.pgd import PGDConfig, PGDStats, eval_mode, pgd_statistics
from ..data.imageset import ImageSet
from ..metrics import predict
from ..models.features import capture
from ..precision import Precision, as_precision
from .context import DefenseContext


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


def agrees_with_label(model: nn.Module, data: ImageSet, ctx: DefenseContext) -> torch.Tensor:
    """Bool N (CPU): whether ``model`` predicts each sample's given label (eval mode, whole batches)."""
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
