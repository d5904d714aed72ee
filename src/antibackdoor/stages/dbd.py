"""DBD's pieces before its semi-supervised rounds (Huang et al., ICLR 2022), shared by the ``dbd`` defense and
the ``dbd-sce`` detector: SimCLR on the backbone, the SCE warm-up of the linear head on the frozen backbone, and
the SCE score that splits labelled from unlabelled samples. ``DBDParams`` holds the whole method's settings (the
detector reads the SimCLR and warm-up ones)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..adversarial.losses import symmetric_cross_entropy
from ..adversarial.pgd import eval_mode
from ..config import key_path, param
from ..data.augment import augment
from ..data.imageset import ImageSet
from ..data.strong_augment import SimCLRViews
from ..errors import ConfigError, RunStateError
from ..models.features import capture, classifier_head
from ..precision import PLAIN, Precision
from ..progress import bar
from ..seeding import derive_seed, seeded_rng
from ..selfsup import ProjectionHead, nt_xent
from ..training import TrainConfig, epoch_generator, load_checkpoint, make_optimizer, save_checkpoint
from .context import DefenseContext
from .recipes import PAPER_FINETUNE, PAPER_SIMCLR, PAPER_WARMUP
from .select import top_fraction

log = logging.getLogger("antibackdoor")


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

    def validate(self, where: str) -> None:
        if not 0 < self.epsilon < 1:
            raise ConfigError(f"{key_path(where, 'epsilon')}: {self.epsilon} must lie in (0, 1)")
        if self.iterations < 1 or self.proj_dim < 1 or self.blur_kernel % 2 == 0:
            raise ConfigError(f"{where}: iterations >= 1, proj_dim >= 1 and an odd blur_kernel are required")


def _backbone_params(model: nn.Module) -> list[nn.Parameter]:
    head = {id(q) for q in classifier_head(model).parameters()}
    return [q for q in model.parameters() if id(q) not in head]


def restore(path, resume: bool) -> dict | None:
    """A stage's checkpoint to continue from (None: none); one left by an earlier run needs ``--resume``."""
    if path is None or not path.exists():
        return None
    if not resume:
        raise RunStateError(f"{path}: a checkpoint exists; pass --resume to continue or --force to restart")
    return load_checkpoint(path)


def simclr_pretrain(model: nn.Module, data: ImageSet, p: DBDParams, ctx: DefenseContext) -> list[dict]:
    """Stage 1: SimCLR on the backbone of ``model`` (all layers but the classifier head), in place, in the
    context's precision."""
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
    state = restore(path, ctx.resume)
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
    """DBD's labelled set: the ``top_count(N, fraction)`` samples with the lowest scores (ties by index)."""
    return top_fraction(-scores.double(), fraction)


#: CPU budget (<= 8 min on 2 cores with the quick CNN on the mini CIFAR-10; BadNets: 288 s): 40 SimCLR epochs of
#: batch 256 with Adam 1e-3 (cosine), 10 warm-up epochs, 8 rounds of 60 MixMatch iterations of batch 64. SGD 0.3
#: for 30 epochs ended with a dirtier labelled set (poison share 11.6 % vs 7.9 % in the last round) and ASR 62.7 %
#: vs 46.3 % (benchmarks/grids/dbd.yaml, docs/dbd.md).
QUICK_DBD = DBDParams(
    simclr=TrainConfig(epochs=40, batch_size=256, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine",
                       crop=0, flip=False),
    finetune=TrainConfig(epochs=8, batch_size=64, optimizer="adam", lr=0.002, weight_decay=0.0, crop=4, flip=True),
    iterations=60, rampup=8)
