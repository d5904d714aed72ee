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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adversarial.losses import symmetric_cross_entropy
from ..adversarial.pgd import eval_mode
from ..config import param
from ..data.augment import augment
from ..data.imageset import ImageSet
from ..errors import ConfigError, RunStateError
from ..models.features import capture, classifier_head
from ..precision import PLAIN, Precision
from ..seeding import derive_seed, seeded_rng
from ..selfsup import ProjectionHead, guess_labels, mixmatch_loss, mixup, nt_xent
from ..training import TrainConfig, epoch_generator, load_checkpoint, make_optimizer, save_checkpoint
from .base import Defense, DefenseContext, DefenseResult, register_defense

log = logging.getLogger("antibackdoor")

PAPER_SIMCLR = TrainConfig(epochs=100, batch_size=512, optimizer="sgd", lr=0.4, momentum=0.9, weight_decay=1e-4,
                           schedule="cosine", crop=0, flip=False)
# Adam without weight decay, as the authors' configs ("adam" is AdamW here; with weight_decay 0 it is Adam)
PAPER_WARMUP = TrainConfig(epochs=10, batch_size=128, optimizer="adam", lr=0.002, weight_decay=0.0, crop=4,
                           flip=True)
PAPER_FINETUNE = TrainConfig(epochs=190, batch_size=64, optimizer="adam", lr=0.002, weight_decay=0.0, crop=4,
                             flip=True)


@dataclass(frozen=True)
class DBDParams:
    simclr: TrainConfig = param(factory=lambda: PAPER_SIMCLR, doc="SimCLR stage (sgd: plain momentum SGD)")
    temperature: float = param(0.5, doc="SimCLR's NT-Xent temperature")
    proj_dim: int = param(128, doc="output size of SimCLR's projection head")
    blur_kernel: int = param(3, doc="Gaussian-blur kernel of the SimCLR views (odd)")
    warmup: TrainConfig = param(factory=lambda: PAPER_WARMUP, doc="SCE warm-up of the linear head, frozen backbone")
    finetune: TrainConfig = param(factory=lambda: PAPER_FINETUNE, doc="MixMatch fine-tuning; epochs = rounds")
    iterations: int = param(1024, doc="MixMatch iterations per round")
    epsilon: float = param(0.5, doc="labelled share: the samples with the lowest SCE loss")
    mix_temperature: float = param(0.5, doc="MixMatch's sharpening temperature T")
    mix_alpha: float = param(0.75, doc="MixMatch's Beta(alpha, alpha) for MixUp")
    lambda_u: float = param(15.0, doc="weight of the unlabelled loss")
    rampup: int = param(190, doc="rounds over which lambda_u rises linearly to its value")
    sce_alpha: float = param(0.1, doc="SCE's CE weight")
    sce_beta: float = param(1.0, doc="SCE's reverse-CE weight")

    def validate(self) -> None:
        if not 0 < self.epsilon < 1:
            raise ConfigError(f"defense_params (dbd).epsilon: {self.epsilon} must lie in (0, 1)")
        if self.iterations < 1 or self.proj_dim < 1 or self.blur_kernel % 2 == 0:
            raise ConfigError("defense_params (dbd): iterations >= 1, proj_dim >= 1 and an odd blur_kernel are "
                              "required")
        for name in ("simclr", "warmup", "finetune"):
            getattr(self, name).validate(f"defense_params (dbd).{name}")


def _backbone_params(model: nn.Module) -> list[nn.Parameter]:
    head = {id(q) for q in classifier_head(model).parameters()}
    return [q for q in model.parameters() if id(q) not in head]


def _restore(path, resume: bool) -> dict | None:
    if path is None or not path.exists():
        return None
    if not resume:
        raise RunStateError(f"{path}: a checkpoint exists; pass --resume to continue or --force to restart")
    return load_checkpoint(path)


def simclr_pretrain(model: nn.Module, data: ImageSet, p: DBDParams, ctx: DefenseContext) -> list[dict]:
    """Stage 1: SimCLR on the backbone of ``model`` (all layers but the classifier head), in place, in the
    context's precision."""
    from ..data.strong_augment import SimCLRViews
    from ..progress import bar

    cfg, dev, prec = p.simclr, ctx.device, ctx.compute_precision()
    head = classifier_head(model)
    proj = ProjectionHead(head.in_features, p.proj_dim).to(dev)
    prec.prepare(model.to(dev))
    params = _backbone_params(model) + list(proj.parameters())
    if cfg.optimizer == "adam":  # AdamW, as everywhere in the library
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:  # plain momentum SGD, as SimCLR and DBD (not the Nesterov variant of training.py)
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = prec.scaler()
    views = SimCLRViews(data.image_size, p.blur_kernel)
    path = ctx.checkpoint("simclr")
    history: list[dict] = []
    start = 0
    state = _restore(path, ctx.resume)
    if state is not None:
        model.load_state_dict(state["model"])
        proj.load_state_dict(state["proj"])
        opt.load_state_dict(state["optimizer"])
        history, start = list(state["history"]), int(state["epoch"])
    n = len(data)
    stream = derive_seed(ctx.seed, "dbd", "simclr")
    for epoch in bar(range(start, cfg.epochs), desc="dbd simclr", total=cfg.epochs, initial=start, unit="ep"):
        gen = epoch_generator(stream, epoch)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(epoch)
        model.train()
        proj.train()
        order = torch.randperm(n, generator=gen).to(data.device)
        total, batches = 0.0, 0
        with seeded_rng(stream, "kornia", epoch):  # kornia draws the views from torch's global RNG: a fork
            for s in range(0, n, cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                if idx.numel() < 2:
                    continue
                x = data.x[idx].to(dev).float().div_(255.0)
                pair = prec.batch(torch.cat([views(x), views(x)]))
                with prec.autocast(), capture(model, stages=False) as feats:
                    model(pair)
                z = proj(feats.penultimate.float())
                loss = nt_xent(z[:idx.numel()], z[idx.numel():], p.temperature)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                total += float(loss.detach())
                batches += 1
        history.append({"epoch": epoch + 1, "lr": cfg.lr_at(epoch), "loss": total / max(batches, 1)})
        log.debug("dbd simclr epoch %d: loss %.4f", epoch + 1, history[-1]["loss"])
        if path is not None:
            save_checkpoint(path, {"epoch": epoch + 1, "model": model.state_dict(), "proj": proj.state_dict(),
                                   "optimizer": opt.state_dict(), "history": history})
    return history


def warmup_head(model: nn.Module, opt: torch.optim.Optimizer, data: ImageSet, p: DBDParams,
                ctx: DefenseContext) -> list[dict]:
    """Stage 2: train only the (re-initialised) classifier head with SCE on frozen features (eval mode), at
    ``warmup.lr``; the backbone's forward passes run in the context's precision, the head in fp32."""
    cfg, dev, prec = p.warmup, ctx.device, ctx.compute_precision()
    head = classifier_head(model)
    head.reset_parameters()
    prec.prepare(model.to(dev))
    for g in opt.param_groups:
        g["lr"] = cfg.lr
    history = []
    n = len(data)
    stream = derive_seed(ctx.seed, "dbd", "warmup")
    for epoch in range(cfg.epochs):
        gen = epoch_generator(stream, epoch)
        order = torch.randperm(n, generator=gen).to(data.device)
        total = correct = 0.0
        for s in range(0, n, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            x = augment(data.x[idx].to(dev), cfg.crop, cfg.flip, gen).float().div_(255.0)
            y = data.y[idx].to(dev)
            with torch.no_grad(), eval_mode(model), prec.autocast(), capture(model, stages=False) as f:
                model(prec.batch(x))
            logits = head(f.penultimate.float())
            per = symmetric_cross_entropy(logits, y, p.sce_alpha, p.sce_beta)
            opt.zero_grad(set_to_none=True)
            per.mean().backward()
            opt.step()
            total += float(per.detach().sum())
            correct += float((logits.argmax(1) == y).sum())
        history.append({"epoch": epoch + 1, "loss": total / n, "train_acc": correct / n})
    return history


@torch.no_grad()
def sce_scores(model: nn.Module, data: ImageSet, p: DBDParams, device, batch_size: int = 1024,
               precision: Precision | None = None) -> torch.Tensor:
    """Per-sample SCE loss of the current model (eval mode, no augmentation): DBD's credibility score. The
    forward passes run in ``precision`` (None: plain fp32), the loss in fp32."""
    prec = PLAIN if precision is None else precision
    out = []
    with eval_mode(model):
        for s in range(0, len(data), batch_size):
            with prec.autocast():
                logits = model(prec.batch(data.x[s:s + batch_size].to(device).float().div_(255.0)))
            out.append(symmetric_cross_entropy(logits.float(), data.y[s:s + batch_size].to(device), p.sce_alpha,
                                               p.sce_beta).double().cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def make_dbd_optimizer(model: nn.Module, p: DBDParams) -> torch.optim.Optimizer:
    """The one optimizer of stages 2 and 3 (the warm-up only moves the head; it runs at ``warmup.lr``, the
    rounds at ``finetune``'s learning rate): ``finetune``'s optimizer and weight decay."""
    return make_optimizer(model, p.finetune)


def lowest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the ``fraction`` of samples with the lowest scores (ties by index)."""
    count = int(len(scores) * fraction)
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[torch.sort(scores, stable=True).indices[:count]] = True
    return mask


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
    description = "DBD: SimCLR backbone, SCE warm-up of the head, rounds of SCE split + MixMatch fine-tuning"
    Params = DBDParams
    presets = {
        "paper": DBDParams(),
        # CPU budget (<= 8 min on 2 cores with the quick CNN on the mini CIFAR-10; BadNets: 288 s): 40 SimCLR
        # epochs of batch 256 with Adam 1e-3 (cosine), 10 warm-up epochs, 8 rounds of 60 MixMatch iterations
        # of batch 64. SGD 0.3 for 30 epochs ended with a dirtier labelled set (poison share 11.6 % vs 7.9 %
        # in the last round) and ASR 62.7 % vs 46.3 % (benchmarks/grids/dbd.yaml, docs/dbd.md).
        "quick": DBDParams(
            simclr=TrainConfig(epochs=40, batch_size=256, optimizer="adam", lr=1e-3, weight_decay=0.0,
                               schedule="cosine", crop=0, flip=False),
            finetune=TrainConfig(epochs=8, batch_size=64, optimizer="adam", lr=0.002, weight_decay=0.0, crop=4,
                                 flip=True),
            iterations=60, rampup=8),
    }

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        p = self.params
        model = ctx.fresh_model("dbd")
        log.info("DBD stage 1/3: SimCLR on %d unlabelled images (%d epochs)", len(data), p.simclr.epochs)
        history = {"simclr": simclr_pretrain(model, data, p, ctx)}
        opt = make_dbd_optimizer(model, p)
        prec = ctx.compute_precision()
        path = ctx.checkpoint("dbd_finetune")
        state = _restore(path, ctx.resume)
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
