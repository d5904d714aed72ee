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
forward pass over the whole mixed batch, which gives BatchNorm the same statistics.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import augment
from ..data.imageset import ImageSet
from ..seeding import derive_seed
from ..selfsup import guess_labels, mixmatch_loss, mixup
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
from ..training import epoch_generator, save_checkpoint
from .base import Defense, DefenseResult, register_defense

log = logging.getLogger("antibackdoor")


def mixmatch_round(model: nn.Module, opt: torch.optim.Optimizer, data: ImageSet, labelled: torch.Tensor,
                   p: DBDParams, round_idx: int, ctx: DefenseContext) -> dict:
    """Stage 3, one round: ``p.iterations`` MixMatch steps on the whole model, in the context's precision."""
    cfg, dev, prec = p.finetune, ctx.device, ctx.compute_precision()
    gen = epoch_generator(derive_seed(ctx.seed, "dbd", "mixmatch"), round_idx)
    for g in opt.param_groups:
        g["lr"] = cfg.lr_at(round_idx)
    scaler = prec.scaler()
    lab = labelled.nonzero().squeeze(1)
    unl = (~labelled).nonzero().squeeze(1)
    b = cfg.batch_size
    k = data.num_classes
    model.train()
    sums = {"loss": 0.0, "lx": 0.0, "lu": 0.0}
    lam_u = 0.0
    for it in range(p.iterations):
        li = lab[torch.randint(len(lab), (b,), generator=gen)].to(data.device)
        ui = unl[torch.randint(len(unl), (b,), generator=gen)].to(data.device)
        xl = augment(data.x[li].to(dev), cfg.crop, cfg.flip, gen).float().div_(255.0)
        tl = F.one_hot(data.y[li].to(dev), k).float()
        xu = [augment(data.x[ui].to(dev), cfg.crop, cfg.flip, gen).float().div_(255.0) for _ in range(2)]
        with prec.autocast():
            tu = guess_labels(model, [prec.batch(v) for v in xu], p.mix_temperature)
        mixed, targets, _ = mixup(torch.cat([xl, *xu]), torch.cat([tl, tu, tu]), p.mix_alpha, gen)
        with prec.autocast():
            logits = model(prec.batch(mixed))
        lx, lu = mixmatch_loss(logits[:b], targets[:b], logits[b:], targets[b:])
        lam_u = p.lambda_u * min(max((round_idx + it / p.iterations) / max(p.rampup, 1), 0.0), 1.0)
        loss = lx + lam_u * lu
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sums["loss"] += float(loss.detach())
        sums["lx"] += float(lx.detach())
        sums["lu"] += float(lu.detach())
    return {k_: v / p.iterations for k_, v in sums.items()} | {"lambda_u": lam_u}


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
