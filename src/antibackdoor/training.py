"""The one training loop: SGD/Adam, step/cosine schedules, on-device augmentation, optional PGD adversary,
the precision of ``precision.py`` (bf16/fp16 autocast, channels_last), a checkpoint after every epoch and
exact resume.

Randomness (shuffling, augmentation, PGD random starts) comes from a generator seeded by
``derive_seed(seed, "epoch", epoch)``, so an epoch replayed after a resume draws the same numbers as it would
have without the interruption.

Defenses whose objective is not a (weighted) cross-entropy — attention distillation, re-weighted losses with
an adversarial estimator, contrastive losses — pass ``loss_fn``: it gets the model and the prepared batch
(with the loop's precision) and returns the loss, so they reuse this loop (schedules, precision, checkpoints,
resume) instead of writing their own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .adversarial.pgd import PGDConfig, adversarial_examples
from .caching import atomic_write
from .config import key_path, param
from .data.augment import augment
from .data.imageset import ImageSet
from .errors import ConfigError, RunStateError, TrainingDivergedError
from .precision import Precision, as_precision
from .progress import bar
from .seeding import generator

log = logging.getLogger("antibackdoor")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``optimizer`` is ``sgd`` (Nesterov momentum, L2 weight decay in the gradient) or
    ``adam``, which is AdamW: Adam with ``weight_decay`` decoupled from the gradient (Loshchilov & Hutter), so
    the decay means the same shrinkage whatever the gradients' scale."""

    epochs: int = param(20, doc="passes over the training data")
    batch_size: int = param(128, doc="samples per optimizer step")
    optimizer: Literal["sgd", "adam"] = param("adam", doc="sgd (Nesterov momentum when momentum > 0) or adam "
                                                          "(AdamW: Adam with decoupled weight decay)")
    lr: float = param(1e-3, doc="learning rate before the schedule and the warm-up scale it")
    momentum: float = param(0.9, doc="sgd's momentum (Nesterov when > 0; adam does not use it)")
    weight_decay: float = param(5e-4, doc="sgd: an L2 term in the gradient; adam: decoupled, each step shrinks the "
                                          "weights by lr * weight_decay")
    schedule: Literal["none", "step", "cosine"] = param("none", doc="lr per epoch: none (constant), step (x lr_gamma "
                                                                    "at each milestone), cosine (lr to 0 over epochs)")
    milestones: tuple[int, ...] = param((), doc="step: the epoch counts after which the lr is multiplied by lr_gamma")
    lr_gamma: float = param(0.1, doc="step: the factor applied to the lr at each milestone")
    warmup_epochs: int = param(0, doc="linear warm-up: epoch e < warmup_epochs runs at (e+1)/(warmup_epochs+1) of "
                                      "the lr")
    crop: int = param(4, doc="random-crop padding in pixels: zero-pad, crop back at a random offset (0: off)")
    flip: bool = param(True, doc="mirror a random half of each batch left-right")
    adversary: PGDConfig | None = param(None, doc="PGD adversarial training: each batch is replaced by its PGD "
                                                  "examples (null: plain training)")

    def validate(self, where: str) -> None:
        """Ranges and finiteness, before anything trains: an infinite lr or momentum only shows as a NaN loss
        epochs later (or never, for a zero lr_gamma)."""
        checks = [
            ("epochs", self.epochs >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", 0 < self.lr < math.inf, "a finite number > 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", 0 <= self.weight_decay < math.inf, "a finite number >= 0"),
            ("lr_gamma", 0 < self.lr_gamma < math.inf, "a finite number > 0"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("crop", self.crop >= 0, ">= 0"),
            ("milestones", all(m >= 0 for m in self.milestones), "epoch counts >= 0"),
        ]
        for key, ok, rule in checks:  # NaN fails every comparison, so it fails here too
            if not ok:
                value = list(self.milestones) if key == "milestones" else getattr(self, key)
                raise ConfigError(f"{key_path(where, key)}: {value} must be {rule}")

    def lr_at(self, epoch: int) -> float:
        if self.schedule == "step":
            lr = self.lr * self.lr_gamma ** sum(epoch >= m for m in self.milestones)
        elif self.schedule == "cosine":
            lr = 0.5 * self.lr * (1 + math.cos(math.pi * epoch / max(1, self.epochs)))
        else:
            lr = self.lr
        if epoch < self.warmup_epochs:
            lr *= (epoch + 1) / (self.warmup_epochs + 1)
        return lr


@dataclass
class Batch:
    """One prepared training batch, as the loop hands it to a custom loss (``train(loss_fn=...)``)."""

    x: torch.Tensor  # augmented images in [0, 1] (adversarial when cfg.adversary is set), in prec's layout
    y: torch.Tensor
    index: torch.Tensor  # positions of the samples in the training data
    weight: torch.Tensor | None  # their sample_weight, if any
    epoch: int
    #: the epoch's generator: a loss that needs randomness draws it here, so a resumed epoch replays it
    generator: torch.Generator
    #: the loop's precision: the loss runs under its autocast already; images the loss makes itself (extra
    #: views) go through ``precision.batch`` to match the model's memory layout
    precision: Precision


@dataclass
class StepOutput:
    """What a custom loss returns for one batch."""

    loss: torch.Tensor  # the scalar the optimizer minimises
    logits: torch.Tensor | None = None  # the model's outputs, for train_acc (omitted from the history if None)
    #: scalar terms (detached or not) averaged over the epoch into the history, e.g. {"at_loss": ...}
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


LossFn = Callable[[nn.Module, Batch], StepOutput]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return generator(seed, "epoch", epoch)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a killed process leaves the previous checkpoint intact."""
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable checkpoint file
        raise RunStateError(
            f"{path}: unreadable checkpoint ({exc.__class__.__name__}); delete it or use --force") from None


def train(model: nn.Module, data: ImageSet, cfg: TrainConfig, *, seed: int = 0,
          device: torch.device | str = "cpu", checkpoint: Path | None = None, resume: bool = False,
          desc: str = "train", sample_weight: torch.Tensor | None = None,
          on_epoch_end: Callable[[int, nn.Module], dict | None] | None = None,
          precision: Precision | str | None = None, loss_fn: LossFn | None = None,
          optimizer: torch.optim.Optimizer | None = None) -> list[dict]:
    """Train ``model`` in place on ``data`` and return one dict of statistics per epoch.

    ``precision`` (a Precision or auto/fp32/bf16/fp16; None: the active one, see ``precision.py``) sets the
    autocast dtype and memory layout of the model, the adversary and the batches.

    ``sample_weight`` (N floats) scales each sample's loss; negative weights give gradient ascent
    (unlearning). ``on_epoch_end(epoch, model)`` may return extra numbers for the history, and returning
    ``{"stop": True}`` ends training early (used to abandon a collapsing run).

    ``loss_fn(model, batch)`` replaces the (weighted) cross-entropy: it runs the forward pass itself (under
    the loop's autocast) and returns a StepOutput; its ``parts`` are averaged into the history. ``optimizer``
    continues an existing optimizer (its momentum carries over between calls that alternate between data
    sets); by default a new one is made from ``cfg``.
    """
    cfg.validate(desc)
    device = torch.device(device)
    prec = as_precision(precision, device)
    prec.prepare(model.to(device))
    opt = optimizer if optimizer is not None else make_optimizer(model, cfg)
    scaler = prec.scaler()
    history: list[dict] = []
    start = 0
    if checkpoint is not None and checkpoint.exists():
        if not resume:
            raise RunStateError(f"{checkpoint}: a checkpoint exists; pass --resume to continue or --force to restart")
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = list(state["history"])
        start = int(state["epoch"])
        log.info("%s: resumed from %s at epoch %d", desc, checkpoint, start)
    x_all, y_all = data.x.to(device), data.y.to(device)
    w_all = sample_weight.to(device) if sample_weight is not None else None
    n = len(data)
    epochs = bar(range(start, cfg.epochs), desc=desc, total=cfg.epochs, initial=start, unit="ep")
    for epoch in epochs:
        gen = epoch_generator(seed, epoch)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(epoch)
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        counted = 0
        part_sums: dict[str, torch.Tensor] = {}
        for s in range(0, n, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            if idx.numel() < 2 and n >= 2:  # BatchNorm needs two samples
                continue
            xb = prec.batch(augment(x_all[idx], cfg.crop, cfg.flip, gen).float().div_(255.0))
            yb = y_all[idx]
            if cfg.adversary is not None:
                xb = adversarial_examples(model, xb, yb, cfg.adversary, generator=gen, precision=prec)
                model.train()
            if loss_fn is None:
                with prec.autocast():
                    logits = model(xb)
                per = F.cross_entropy(logits.float(), yb, reduction="none")
                loss = (per * w_all[idx]).mean() if w_all is not None else per.mean()
                batch_loss = per.detach().sum()
            else:
                batch = Batch(xb, yb, idx, w_all[idx] if w_all is not None else None, epoch, gen, prec)
                with prec.autocast():
                    out = loss_fn(model, batch)
                loss, logits = out.loss.float(), out.logits
                batch_loss = loss.detach() * len(idx)
                for key, value in out.parts.items():
                    part_sums[key] = part_sums.get(key, 0.0) + value.detach().float() * len(idx)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += batch_loss
            if logits is not None:
                correct += (logits.argmax(1) == yb).sum()
                counted += len(idx)
        stats = {"epoch": epoch + 1, "lr": cfg.lr_at(epoch), "loss": float(loss_sum) / max(n, 1)}
        if counted or loss_fn is None:  # a custom loss that returns no logits has no train_acc
            stats["train_acc"] = float(correct) / max(n, 1)
        stats.update({key: float(value) / max(n, 1) for key, value in part_sums.items()})
        if not math.isfinite(stats["loss"]):
            raise TrainingDivergedError(
                f"{desc}: the loss became {stats['loss']} in epoch {epoch + 1}; lower the learning rate "
                "or use --precision fp32")
        stop = False
        if on_epoch_end is not None:
            extra = on_epoch_end(epoch, model) or {}
            stop = bool(extra.pop("stop", False))
            stats.update(extra)
        history.append(stats)
        if hasattr(epochs, "set_postfix"):
            epochs.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats.get('train_acc', math.nan):.3f}")
        log.debug("%s epoch %d: %s", desc, epoch + 1, {k: round(v, 4) for k, v in stats.items()})
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"epoch": epoch + 1, "model": model.state_dict(),
                                         "optimizer": opt.state_dict(), "history": history,
                                         "scaler": scaler.state_dict()})
        if stop:
            break
    model.eval()
    return history
