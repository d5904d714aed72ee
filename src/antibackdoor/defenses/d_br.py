"""D-BR — backdoor removal with sample distinguishment (Chen et al., NeurIPS 2022).

1. Separation (stages/separation.py): FCT scores of a briefly trained, intra-class fine-tuned model split
   the data into D_c (20 % lowest FCT), D_p (5 % highest) and the uncertain rest.
2. The backdoored model: plain training on all data with the usual augmentation.
3. Backdoor removal, ``rounds.epochs`` rounds of: one pass of gradient ascent on D_p (unlearning), then one
   pass of gradient descent on D_c (relearning), one SGD optimizer carried through all passes.

D_p is the isolated set for TPR/FPR; ``separation.json`` in the run directory says how much true poison
each of the three parts holds.

Choices where the sources disagree (docs/baselines.md): the official script keeps the round whose *test*
accuracy minus *test* ASR is best, which a defender cannot compute; we keep the last round. The separation's
single seeded transformation draw is described in separation.py. Schedules (paper preset) follow the
official scripts: the backdoored model SGD 0.01, x0.1 at 100 and 150 of 200 epochs, crop + flip; removal 20
rounds at SGD 1e-4 (momentum 0.9, weight decay 5e-4, batches of 128, crop + flip on both parts). A resumed run
redoes the removal rounds (they are short); the separation and backdoored models are checkpointed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import key_path, param
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..precision import Precision
from ..seeding import derive_seed
from ..stages import DefenseContext, backdoored_model
from ..stages.recipes import QUICK_PLAIN
from ..stages.separation import QUICK_SEPARATION, SeparationParams, separate
from ..training import TrainConfig, make_optimizer, train
from ._separation import separation_result, write_separation
from .base import Defense, DefenseResult, register_defense

log = logging.getLogger("antibackdoor")


@dataclass(frozen=True)
class DBRParams:
    separation: SeparationParams = param(factory=SeparationParams, doc="the FCT split into D_c, D_p and the rest")
    backdoored: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=200, optimizer="sgd", lr=0.01, schedule="step", milestones=(100, 150), weight_decay=5e-4,
        batch_size=128, crop=4, flip=True), doc="the backdoored model: plain training on all the data")
    rounds: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=20, optimizer="sgd", lr=1e-4, weight_decay=5e-4, batch_size=128, crop=4, flip=True),
        doc="removal: epochs = rounds of one unlearning pass on D_p and one relearning pass on D_c")
    unlearn_weight: float = param(1.0, doc="loss weight -unlearn_weight on D_p when unlearning")

    def validate(self, where: str) -> None:
        self.separation.validate(key_path(where, 'separation'))
        if not self.unlearn_weight > 0:
            raise ConfigError(f"{key_path(where, 'unlearn_weight')}: {self.unlearn_weight} must be > 0")


def remove_backdoor(model: torch.nn.Module, data: ImageSet, poisoned: torch.Tensor, clean: torch.Tensor,
                    cfg: TrainConfig, seed: int, device: torch.device, unlearn_weight: float = 1.0,
                    precision: Precision | None = None) -> list[dict]:
    """D-BR's BR module in place: per round, one unlearning pass on D_p, then one relearning pass on D_c
    (in ``precision``; None: the active one)."""
    opt = make_optimizer(model, cfg)
    unlearn_set, relearn_set = data.subset(poisoned), data.subset(clean)
    ascent = -unlearn_weight * torch.ones(len(unlearn_set))
    history = []
    for r in range(cfg.epochs):
        one = replace(cfg, epochs=1, lr=cfg.lr_at(r), schedule="none", warmup_epochs=0)
        h_u = train(model, unlearn_set, one, seed=derive_seed(seed, "unlearn", r), device=device,
                    desc=f"unlearn {r + 1}", sample_weight=ascent, optimizer=opt, precision=precision)
        h_r = train(model, relearn_set, one, seed=derive_seed(seed, "relearn", r), device=device,
                    desc=f"relearn {r + 1}", optimizer=opt, precision=precision)
        history.append({"round": r + 1, "lr": one.lr, "unlearn_loss": h_u[0]["loss"],
                        "unlearn_acc": h_u[0]["train_acc"], "relearn_loss": h_r[0]["loss"],
                        "relearn_acc": h_r[0]["train_acc"]})
        log.debug("D-BR round %d: %s", r + 1, history[-1])
    return history


@register_defense
class DBR(Defense):
    name = "d-br"
    cached_stages = {"backdoored": "all"}
    label = "D-BR"
    description = "D-BR: FCT separation, then unlearn the poisoned part / relearn the clean part of a backdoored model"
    Params = DBRParams
    presets = {
        "paper": DBRParams(),
        # CPU budget: the separation model is the small CNN with Adam (2 + 10 epochs, as in the paper), the
        # backdoored model `none`'s quick recipe; removal keeps 20 rounds at the paper's SGD 1e-4 but in
        # batches of 32, so the ~260 samples of D_p give 8 ascent steps per round as ~2,500 do at 128 in the
        # paper's setting; crop without flip, like every quick stage.
        "quick": DBRParams(
            separation=QUICK_SEPARATION,
            backdoored=QUICK_PLAIN,
            rounds=TrainConfig(epochs=20, optimizer="sgd", lr=1e-4, weight_decay=5e-4, batch_size=32, crop=4,
                               flip=False),
        ),
    }

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        p = self.params
        log.info("D-BR 1/3: sample distinguishment")
        sep = separate(ctx, data, p.separation)
        log.info("D-BR 2/3: backdoored model on all %d samples", len(data))
        model, hist_b = backdoored_model(ctx, data, p.backdoored)  # same init and seed as `none`
        log.info("D-BR 3/3: %d rounds of unlearning D_p (%d) / relearning D_c (%d)", p.rounds.epochs,
                 int(sep.poisoned.sum()), int(sep.clean.sum()))
        hist_r = remove_backdoor(model, data, sep.poisoned, sep.clean, p.rounds, derive_seed(ctx.seed, "d-br"),
                                 ctx.device, p.unlearn_weight, ctx.compute_precision())
        return separation_result(sep, model, {"backdoored": hist_b, "removal": hist_r})

    def write_plots(self, result: DefenseResult, poison_mask: torch.Tensor, run_dir: Path,
                    true_labels: torch.Tensor | None = None) -> list[Path]:
        return write_separation(result, poison_mask, run_dir)
