"""ASD — Backdoor Defense via Adaptive Splitting (Gao et al., CVPR 2023).

One model is trained from scratch, every epoch on two pools that are re-split before the epoch: a clean pool,
whose labels are used, and a polluted pool (the rest), used unlabelled in MixMatch. The split tightens in three
stages, each ranking samples by the symmetric cross-entropy (SCE, alpha 0.1, beta 1) of the current model:

1. class-aware loss-guided split (epochs < ``class_aware_until``): the clean seed (a few known-clean samples
   per class: the trusted data) plus the ``grow_by * (epoch // grow_every)`` lowest-loss samples of each
   class (by its given label), so every class enters the clean pool alike;
2. class-agnostic loss-guided split (< ``agnostic_until``): the ``epsilon`` (50 %) lowest-loss samples;
3. meta-split (the rest): a virtual copy of the model is trained one epoch on all the data (its last
   ``meta_stages`` stages and the head, Adam 0.015); the ``epsilon`` samples whose loss drops least under that
   update are clean. Poisoned samples are learned fast, so the update lowers their loss most; clean samples
   that are hard (high loss) but change little are let into the clean pool this way.

Semi-supervised training: MixMatch (K = 2 views, T 0.5, alpha 0.75, lambda_u 15 ramped up linearly over the
whole training, Adam 0.002), ``iterations`` steps of one labelled and one unlabelled batch per epoch
(``stages/semisup.py``).

What the run records: ``kept`` is the clean pool of the last epoch (the samples whose labels trained the final
model); the polluted pool, used without labels, is what ASD isolated. ``scores`` is the last split's ranking
(SCE loss, or its drop under the virtual update when the meta-split ran last): higher is more suspicious.
``sample_stats`` hold the clean pool at the end of each stage (``clean_pool_class_aware``,
``clean_pool_agnostic``, ``clean_pool_meta``), so the isolation columns show how much poison each let in.

Choices (docs/baselines.md has the reasons): the seed is the trusted slice (the code draws it from the ground
truth); the split losses are measured without augmentation (the code scores augmented images); counts are
``round(epsilon * N)`` (the code truncates); the virtual update trains the last stages of any registered model.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..config import key_path, param
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..models.features import stage_modules
from ..seeding import derive_seed
from ..stages import DefenseContext, sample_losses
from ..stages.dbd import lowest, restore
from ..stages.mixing import MixUp
from ..stages.semisup import SemiSpec, linear_rampup, semisup_epoch
from ..training import TrainConfig, epoch_generator, make_optimizer, save_checkpoint, train
from .base import FORWARD_PASS, Defense, DefenseResult, register_defense, train_passes

log = logging.getLogger("antibackdoor")

PHASES = ("class_aware", "agnostic", "meta")


@dataclass(frozen=True)
class ASDParams:
    trusted_fraction: float = param(0.002, doc="share of the clean training data reserved as the clean seed "
                                               "(0.002: 10 per class of CIFAR-10, the paper's seed)")
    train: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=120, batch_size=64, optimizer="adam", lr=0.002, weight_decay=0.0, crop=4, flip=True),
        doc="the MixMatch training: epochs, the batch of each pool, optimizer, augmentation")
    iterations: int = param(1024, doc="MixMatch steps per epoch")
    class_aware_until: int = param(60, doc="epochs of the class-aware loss-guided split (stage 1)")
    agnostic_until: int = param(90, doc="the epoch at which the class-agnostic split (stage 2) gives way to the "
                                        "meta-split (stage 3)")
    grow_every: int = param(5, doc="stage 1: every this many epochs each class adds grow_by samples to the clean "
                                   "pool")
    grow_by: int = param(10, doc="stage 1: samples per class added every grow_every epochs")
    epsilon: float = param(0.5, doc="stages 2 and 3: share of all samples in the clean pool")
    meta: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=1, batch_size=128, optimizer="adam", lr=0.015, weight_decay=0.0, crop=4, flip=True),
        doc="stage 3: the virtual model's update on all the data (cross-entropy)")
    meta_stages: int = param(2, doc="stage 3: the virtual update trains the model's last this many stages and its "
                                    "head (the code: layer3, layer4 and the head of a ResNet-18)")
    mix_temperature: float = param(0.5, doc="MixMatch's sharpening temperature T")
    mix_alpha: float = param(0.75, doc="MixMatch's Beta(alpha, alpha) for MixUp")
    lambda_u: float = param(15.0, doc="weight of the unlabelled loss")
    rampup: int = param(120, doc="epochs over which the unlabelled weight rises linearly to lambda_u")

    def validate(self, where: str) -> None:
        if not 0 < self.trusted_fraction < 1:
            raise ConfigError(f"{key_path(where, 'trusted_fraction')}: {self.trusted_fraction} must lie in (0, 1)")
        if not 0 < self.epsilon < 1:
            raise ConfigError(f"{key_path(where, 'epsilon')}: {self.epsilon} must lie in (0, 1)")
        if not 0 <= self.class_aware_until <= self.agnostic_until:
            raise ConfigError(f"{key_path(where, 'agnostic_until')}: {self.agnostic_until} must be >= "
                              f"class_aware_until ({self.class_aware_until}) >= 0")
        for name in ("iterations", "grow_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key_path(where, name)}: {getattr(self, name)} must be >= 1")
        for name in ("grow_by", "meta_stages", "rampup"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key_path(where, name)}: {getattr(self, name)} must be >= 0")
        if not self.mix_temperature > 0:
            raise ConfigError(f"{key_path(where, 'mix_temperature')}: {self.mix_temperature} must be > 0")
        if not self.mix_alpha > 0:
            raise ConfigError(f"{key_path(where, 'mix_alpha')}: {self.mix_alpha} must be > 0")
        if not self.lambda_u >= 0:
            raise ConfigError(f"{key_path(where, 'lambda_u')}: {self.lambda_u} must be >= 0")

    def phase(self, epoch: int) -> str:
        if epoch < self.class_aware_until:
            return "class_aware"
        return "agnostic" if epoch < self.agnostic_until else "meta"


#: CPU budget (about 5 min on 2 cores with the quick CNN on the mini CIFAR-10): 30 epochs of 60 MixMatch steps
#: (the paper's 120 of 1,024), the stages at the paper's proportions (1/2, 3/4); the seed is 2 % of the data (about
#: 10 per class of the mini set's ~500), the clean pool grows by 5 per class every 2 epochs in stage 1 (to about 45 per
#: class, 9 %: the paper reaches 120 of 5,000, 2.4 %, but a smaller pool gives the small set too few labels).
QUICK_ASD = ASDParams(
    trusted_fraction=0.02,
    train=TrainConfig(epochs=30, batch_size=64, optimizer="adam", lr=0.002, weight_decay=0.0, crop=4, flip=True),
    iterations=60, class_aware_until=15, agnostic_until=22, grow_every=2, grow_by=5, rampup=30)


# -- the split rules -------------------------------------------------------------------------------------------
def class_aware_split(loss: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor, per_class: int,
                      num_classes: int) -> torch.Tensor:
    """Stage 1's clean pool (bool, CPU): the seeds plus, in every class (by the given labels), the ``per_class``
    non-seed samples with the lowest loss (all of a class that has fewer; ties by index, NaN last)."""
    loss, labels, seeds = loss.double().cpu(), labels.cpu(), seeds.bool().cpu()
    loss = torch.where(torch.isnan(loss), torch.full_like(loss, torch.inf), loss)
    order = torch.sort(loss, stable=True).indices
    order = order[~seeds[order]]
    by_class = order[torch.sort(labels[order], stable=True).indices]
    counts = torch.bincount(labels[by_class], minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(by_class)) - starts[labels[by_class]]
    clean = seeds.clone()
    clean[by_class[rank < per_class]] = True
    return clean


def stage1_count(epoch: int, p: ASDParams) -> int:
    """Samples per class that stage 1 adds to the seed at ``epoch`` (0-based): grow_by more every grow_every
    epochs, none in the first grow_every."""
    return p.grow_by * (epoch // p.grow_every)


def meta_split(loss: torch.Tensor, virtual_loss: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 3: the clean pool is the ``epsilon`` share whose loss drops least from ``loss`` to ``virtual_loss``
    (the virtually updated model's); returns it and the drops (the score: higher is more suspicious)."""
    drop = loss.double().cpu() - virtual_loss.double().cpu()
    return lowest(drop, epsilon), drop


def trailing_parameters(model: nn.Module, stages: int, example: torch.Tensor) -> list[nn.Parameter]:
    """The parameters of the modules that run after the model's ``stages``-th stage from the end has begun: its
    last ``stages`` stages and the head (all of them when it has no more stages; the head alone for 0). Found by
    the order in which one eval-mode forward pass of ``example`` runs the modules, so any registered model works."""
    marks = list(stage_modules(model).values())
    cut = len(marks) - stages  # stages before this one (0-based count of stage outputs) stay frozen
    events: list[nn.Module | None] = []  # a module that has parameters of its own, or None at a stage's end
    hooks = [m.register_forward_hook(lambda mod, i, o: events.append(mod))
             for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    hooks += [m.register_forward_hook(lambda mod, i, o: events.append(None)) for m in marks]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    seen, ends, chosen = set(), 0, []
    for ev in events:
        if ev is None:
            ends += 1
        elif ends >= cut and id(ev) not in seen:
            seen.add(id(ev))
            chosen.extend(ev.parameters(recurse=False))
    return chosen


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def virtual_update(model: nn.Module, data: ImageSet, p: ASDParams, ctx: DefenseContext, epoch: int) -> nn.Module:
    """A copy of ``model`` after its virtual update: ``p.meta`` (cross-entropy) on all of ``data``, moving only the
    trailing ``p.meta_stages`` stages and the head; ``model`` is left as it was. The copy is thrown away after
    scoring, so it is no stage of its own (no checkpoint: a resumed epoch redoes it from the same weights and
    the same stream)."""
    virtual = copy.deepcopy(model)
    example = data.x[:2].to(ctx.device).float().div_(255.0)
    opt = _optimizer(trailing_parameters(virtual, p.meta_stages, example), p.meta)
    train(virtual, data, p.meta, seed=derive_seed(ctx.seed, "asd", "meta", epoch), device=ctx.device,
          desc="asd meta", precision=ctx.compute_precision(), optimizer=opt)
    return virtual


def mixmatch_spec(p: ASDParams) -> SemiSpec:
    """The semi-supervised step ASD trains with (MixMatch's K = 2 views of each unlabelled sample)."""
    return SemiSpec(temperature=p.mix_temperature)


def asd_passes(p: ASDParams, n: int) -> float:
    """Sample passes (``base.Defense.extra_passes``) of one run on ``n`` images, seed included, counted from its
    loop: every epoch ``iterations`` MixMatch steps (a labelled batch and the K views of an unlabelled one
    trained, the K views guessed by a forward pass) and one scoring pass over all samples; every meta-split epoch
    also the virtual update (``p.meta`` on all samples) and a second scoring pass. The polluted pool holds at
    least a batch (it is half the data or more), so every step draws a whole unlabelled batch."""
    spec, b = mixmatch_spec(p), p.train.batch_size
    step = b * (spec.labelled_views + spec.views) + b * spec.views * FORWARD_PASS
    meta_epochs = max(0, p.train.epochs - p.agnostic_until)
    return (p.train.epochs * (p.iterations * step + n * FORWARD_PASS)
            + meta_epochs * (train_passes(p.meta, n) + n * FORWARD_PASS))


# -- the defense -----------------------------------------------------------------------------------------------
@register_defense
class ASD(Defense):
    name = "asd"
    label = "ASD"
    description = ("ASD: clean/polluted pools re-split every epoch (class-aware, then class-agnostic loss-guided, "
                   "then meta-split) + MixMatch with the polluted pool unlabelled")
    Params = ASDParams
    needs_trusted = True
    assumptions = (
        "A few clean samples of every class are known (the clean seed: the trusted data).",
        "Poisoned samples are learned faster than clean ones: under the current model they have a low loss "
        "among the samples of their (target) class less often than clean samples do, and one epoch of training "
        "lowers their loss more than a clean sample's.",
        "Training without the labels of the polluted pool (MixMatch: guessed labels) does not teach the backdoor; "
        "poison that reaches the clean pool is trained with its label.",
    )
    presets = {"paper": ASDParams(), "quick": QUICK_ASD}

    def extra_passes(self, n_train: int) -> float:
        """``asd_passes`` less the one pass of every image per epoch that ``train`` and ``meta`` count for."""
        p = self.params
        return asd_passes(p, n_train) - train_passes(p.train, n_train) - train_passes(p.meta, n_train)

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        p = self.params
        trusted = self.require_trusted(ctx).to(data.device)
        n = len(data)
        every = ImageSet(torch.cat([data.x, trusted.x]), torch.cat([data.y, trusted.y]), data.classes, data.mean,
                         data.std, data.name)
        seeds = torch.arange(len(every)) >= n
        model = ctx.fresh_model("asd")
        prec = ctx.compute_precision()
        prec.prepare(model.to(ctx.device))
        ctx.note_trained(model, p.train.epochs > 0)
        opt = make_optimizer(model, p.train)
        path = ctx.checkpoint("asd")
        state = restore(path, ctx.resume)
        epochs: list[dict] = []
        pools: dict[str, torch.Tensor] = {}
        scores, clean, score_name = torch.zeros(len(every), dtype=torch.float64), seeds.clone(), "sce_loss"
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            epochs, pools, start = list(state["epochs"]), dict(state["pools"]), int(state["epoch"])
            scores, clean, score_name = state["scores"], state["clean"], state["score_name"]
        log.info("ASD: %d epochs on %d samples + a clean seed of %d (class-aware split to epoch %d, "
                 "class-agnostic to %d, meta-split after)", p.train.epochs, n, len(trusted), p.class_aware_until,
                 p.agnostic_until)
        spec = mixmatch_spec(p)
        stream = derive_seed(ctx.seed, "asd", "mixmatch")
        for epoch in range(start, p.train.epochs):
            phase = p.phase(epoch)
            loss = sample_losses(model, every, ctx, "sce").double().cpu()
            if phase == "class_aware":
                clean = class_aware_split(loss, every.y, seeds, stage1_count(epoch, p), every.num_classes)
                scores, score_name = loss, "sce_loss"
            elif phase == "agnostic":
                clean, scores, score_name = lowest(loss, p.epsilon), loss, "sce_loss"
            else:
                virtual = virtual_update(model, every, p, ctx, epoch)
                clean, scores = meta_split(loss, sample_losses(virtual, every, ctx, "sce"), p.epsilon)
                score_name = "sce_drop"
            for g in opt.param_groups:
                g["lr"] = p.train.lr_at(epoch)
            stats = semisup_epoch(
                model, opt, every, clean, spec, epoch=epoch, iterations=p.iterations,
                batch_size=p.train.batch_size, crop=p.train.crop, flip=p.train.flip, mixer=MixUp(p.mix_alpha),
                weight_u=lambda progress: linear_rampup(p.lambda_u, progress, p.rampup),
                generator=epoch_generator(stream, epoch), precision=prec, device=ctx.device)
            pools[f"clean_pool_{phase}"] = clean[:n].clone()
            epochs.append({"epoch": epoch + 1, "phase": phase, "clean": int(clean.sum()),
                           "clean_seeds": int((clean & seeds).sum()), "lr": p.train.lr_at(epoch), **stats})
            log.debug("asd epoch %d: %s", epoch + 1, epochs[-1])
            if path is not None:
                save_checkpoint(path, {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                       "epochs": epochs, "pools": pools, "scores": scores, "clean": clean,
                                       "score_name": score_name})
        model.eval()
        kept = clean[:n].clone()
        info = {"seed": len(trusted), "clean": int(kept.sum()), "polluted": int((~kept).sum()),
                "last_phase": epochs[-1]["phase"] if epochs else None, "epochs": len(epochs),
                "clean_seeds_last": epochs[-1]["clean_seeds"] if epochs else None}
        return DefenseResult(model, kept=kept, scores=scores[:n].clone(), score_name=score_name,
                             higher_is_suspicious=True, info=info, history={"epochs": epochs}, sample_stats=pools)
