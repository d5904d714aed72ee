"""DBD (Huang et al., ICLR 2022): backdoor defense by decoupling the training process.

1. Self-supervised SimCLR on the images without labels (kornia views: resized crop 0.2-1, flip, colour jitter,
   greyscale, blur): the backbone learns features in which poisoned samples lie near their true class rather
   than in a cluster of their own, because no label ties the trigger to the target.
2. Warm-up of the linear head with the SCE loss on the frozen backbone. The backbone runs in eval mode here:
   the public code trains the head with the whole model in train mode, so BatchNorm running statistics drift
   although the backbone is meant to be frozen.
3. Rounds of: score every sample by the SCE loss of the current model, keep the labels of the lowest
   ``epsilon`` (50 %) and drop the others', then fine-tune the whole model with MixMatch on the labelled and
   unlabelled sets (Adam 0.002; T 0.5, alpha 0.75, lambda_u 15 ramped up linearly over the rounds).

Paper preset: the authors' configs (ResNet-18; SimCLR SGD 0.4, momentum 0.9, weight decay 1e-4, batch 512,
temperature 0.5; 10 warm-up epochs; 190 rounds of 1,024 MixMatch iterations of batch 64). SimCLR epochs: their
SimCLR config trains 1,000 epochs on a 1,000-epoch cosine schedule, but their fine-tuning config loads the
checkpoint of epoch 100 — so the backbone DBD used saw 100 epochs at an almost undecayed learning rate. We train
100 epochs and anneal the cosine schedule over those 100 (a finished schedule, at the epoch count they used).
MixMatch's interleaving of labelled and unlabelled batches (a multi-GPU BatchNorm device) is replaced by one
forward pass over the whole mixed batch, which gives BatchNorm the same statistics. The MixMatch step is the
shared one of ``stages/semisup.py`` (ASD and VaB train with it too), with DBD's draws: batches with replacement.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..data.imageset import ImageSet
from ..seeding import derive_seed
from ..stages import DefenseContext
from ..stages.dbd import (
    QUICK_DBD,
    DBDParams,
    lowest,
    make_dbd_optimizer,
    restore,
    sce_scores,
    simclr_pretrain,
    warmup_head,
)
from ..stages.mixing import MixUp
from ..stages.semisup import SemiSpec, linear_rampup, semisup_epoch
from ..training import epoch_generator, save_checkpoint
from .base import Defense, DefenseResult, register_defense

log = logging.getLogger("antibackdoor")


def mixmatch_round(model: nn.Module, opt: torch.optim.Optimizer, data: ImageSet, labelled: torch.Tensor,
                   p: DBDParams, round_idx: int, ctx: DefenseContext) -> dict:
    """Stage 3, one round: ``p.iterations`` MixMatch steps on the whole model, in the context's precision (the
    shared semi-supervised step, ``stages/semisup.py``; batches drawn with replacement)."""
    cfg = p.finetune
    for g in opt.param_groups:
        g["lr"] = cfg.lr_at(round_idx)
    return semisup_epoch(
        model, opt, data, labelled, SemiSpec(temperature=p.mix_temperature), epoch=round_idx,
        iterations=p.iterations, batch_size=cfg.batch_size, crop=cfg.crop, flip=cfg.flip, mixer=MixUp(p.mix_alpha),
        weight_u=lambda progress: linear_rampup(p.lambda_u, progress, p.rampup),
        generator=epoch_generator(derive_seed(ctx.seed, "dbd", "mixmatch"), round_idx),
        precision=ctx.compute_precision(), device=ctx.device, sampling="random")


@register_defense
class DBD(Defense):
    name = "dbd"
    label = "DBD"
    description = "DBD: SimCLR backbone, SCE warm-up of the head, rounds of SCE split + MixMatch fine-tuning"
    Params = DBDParams
    presets = {
        "paper": DBDParams(),
        "quick": QUICK_DBD,
    }

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        p = self.params
        model = ctx.fresh_model("dbd")
        log.info("DBD stage 1/3: SimCLR on %d unlabelled images (%d epochs)", len(data), p.simclr.epochs)
        history = {"simclr": simclr_pretrain(model, data, p, ctx)}
        opt = make_dbd_optimizer(model, p)
        prec = ctx.compute_precision()
        path = ctx.checkpoint("dbd_finetune")
        state = restore(path, ctx.resume)
        rounds: list[dict] = []
        round_labelled: list[torch.Tensor] = []  # the labelled mask of every round
        if state is None:
            log.info("DBD stage 2/3: SCE warm-up of the linear head on the frozen backbone (%d epochs)",
                     p.warmup.epochs)
            history["warmup"] = warmup_head(model, opt, data, p, ctx)
            warmup_scores = sce_scores(model, data, p, ctx.device, precision=prec)
            start = 0
            _save(path, model, opt, 0, history, rounds, warmup_scores, round_labelled)
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            history, rounds, start = dict(state["history"]), list(state["rounds"]), int(state["round"])
            warmup_scores = state["warmup_scores"]
            round_labelled = list(state["round_labelled"])
        log.info("DBD stage 3/3: %d rounds of SCE split (lowest %.0f%% labelled) + %d MixMatch iterations",
                 p.finetune.epochs, 100 * p.epsilon, p.iterations)
        scores = warmup_scores
        labelled = lowest(scores, p.epsilon)
        for r in range(start, p.finetune.epochs):
            scores = sce_scores(model, data, p, ctx.device, precision=prec)
            labelled = lowest(scores, p.epsilon)
            round_labelled.append(labelled)
            stats = mixmatch_round(model, opt, data, labelled, p, r, ctx)
            rounds.append({"round": r + 1, "labelled": int(labelled.sum()), **stats})
            log.debug("dbd round %d: %s", r + 1, rounds[-1])
            _save(path, model, opt, r + 1, history, rounds, warmup_scores, round_labelled)
        history["rounds"] = rounds
        model.eval()
        info = {"labelled": int(labelled.sum()), "unlabelled": int((~labelled).sum()), "rounds": len(rounds),
                "simclr_final_loss": history["simclr"][-1]["loss"] if history["simclr"] else None,
                "warmup_train_acc": history.get("warmup", [{}])[-1].get("train_acc")}
        # the SCE scores after the warm-up are DBD's isolation score (AIBD's Table 2); the labelled mask of
        # every round shows how clean the split stays (benchmarks read them with the ground truth)
        stats = {"warmup_sce": warmup_scores, **{f"labelled_round_{i + 1}": m for i, m in enumerate(round_labelled)}}
        # the kept set is the labelled set of the last round; the unlabelled rest is what DBD isolated
        return DefenseResult(model, kept=labelled, scores=scores, score_name="dbd_sce", higher_is_suspicious=True,
                             info=info, history=history, sample_stats=stats)


def _save(path, model, opt, round_idx, history, rounds, warmup_scores, round_labelled) -> None:
    if path is None:
        return
    save_checkpoint(path, {"round": round_idx, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "history": history, "rounds": rounds, "warmup_scores": warmup_scores,
                           "round_labelled": round_labelled})
