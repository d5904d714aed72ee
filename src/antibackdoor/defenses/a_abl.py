"""A-ABL (Zhao & Wressnegger, AISec 2024): adversarially robust anti-backdoor learning.

1. Naive training on all data (Adam, lr 1e-3; 20 epochs in the paper).
2. Attack every sample with iFGSM (eps 2/255, 5 steps; 1/255 on 64x64 data), score it by the SCE loss of
   its adversarial example and split with Otsu's threshold: low loss = adversarially robust = isolated
   (patch triggers such as BadNets/Trojan land here); the vulnerable rest is kept.
3. PGD adversarial training from scratch on the kept subset (eps 8/255, step 2/255, 10 steps; SGD lr 0.1,
   x0.1 at epochs 50/75/90 of 100), which suppresses the stealthy triggers (Blend, WaNet, SSBA) left in it.

The split's floor, ``min_isolated`` (0 = off in ``quick``; 0.1 in ``paper``): when Otsu's threshold isolates less
than that share, the lowest-scored ``min_isolated`` share is isolated instead. The paper does not state it; its
Table 1 reports gamma = 90.00 exactly wherever Otsu would keep more, which a floor of 10 % isolated explains
(docs/a-abl.md, "Choices the paper does not state"). When Otsu would isolate every sample, every sample is kept.
Both log a line when they act, and ``defense_info.split_rule`` says which rule decided.

Options that are not the paper's (off by default, so both presets stay the paper's algorithm; ``a-abl+`` switches
them on; docs/a-abl.md):

- ``split_log``: Otsu's threshold on log(score) instead of the raw score;
- ``takeback_epochs`` > 0, "take back": the robust stage-3 model has not learned the backdoor, so it predicts an
  isolated poisoned sample's true class (not its given target label) but agrees with most isolated clean samples;
  the isolated samples whose given label it predicts are re-included and adversarial training continues from the
  stage-3 model on the union for ``takeback_epochs`` epochs (``final``'s adversary and optimiser, learning rate
  ``takeback_lr`` with a cosine decay). ``kept`` (and so gamma, rho_vul, TPR, FPR) still describes the split;
  the taken-back samples are ``sample_stats["taken_back"]``.
- ``purge``: the split leaves the poison the naive model had not learned firmly in the kept set, all of it
  labelled with the target class. The class-surplus test (``antibackdoor.surplus``) reads the target from the
  split's ranking; if it finds one, the kept samples of that class whose given label the robust stage-3 model does
  not predict are dropped (a poisoned sample's true class is another one) and stage 3 is trained again, from
  scratch, on what is left; ``purge_rounds`` > 1 repeats this, each round judged by the model the previous round
  trained (which has learned less of the backdoor). Without a surplus nothing is dropped and nothing retrained.
  Costs one more stage 3 per round.
  The dropped samples are ``sample_stats["purged"]``; ``kept`` still describes the split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from ..config import key_path, param
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..stages import DefenseContext, agrees_with_label, take_back, train_stage
from ..stages.aabl import SplitLoss, ifgsm_scores, robust_split
from ..stages.recipes import PAPER_AT, PAPER_NAIVE, QUICK_AT, QUICK_NAIVE
from ..surplus import class_surplus
from ..training import TrainConfig
from .base import Defense, DefenseResult, register_defense

log = logging.getLogger("antibackdoor")


@dataclass(frozen=True)
class AABLParams:
    naive: TrainConfig = param(factory=lambda: PAPER_NAIVE, doc="stage 1: naive training on all the data")
    split_eps: float = param(2 / 255, doc="stage 2: iFGSM budget (L-inf, pixel units; the paper: 2/255, 1/255 on "
                                          "64x64 images)")
    split_steps: int = param(5, doc="stage 2: iFGSM steps")
    split_step: float | None = param(None, doc="stage 2: iFGSM step size (None: split_eps / split_steps)")
    split_loss: SplitLoss = param("sce", doc="stage 2: the loss iFGSM maximises and the split scores (sce: "
                                             "symmetric cross-entropy, the paper's; ce)")
    final: TrainConfig = param(factory=lambda: PAPER_AT, doc="stage 3: PGD adversarial training from scratch on "
                                                             "the kept (vulnerable) samples")
    split_log: bool = param(False, doc="Otsu's threshold on log(score) instead of the raw score (not the paper's)")
    takeback_epochs: int = param(0, doc="take back: re-include the isolated samples whose given label the stage-3 "
                                        "model predicts and continue adversarial training this many epochs (0 = off)")
    takeback_lr: float | None = param(None, doc="take back's learning rate, cosine decay (None: a tenth of final.lr)")
    purge: bool = param(False, doc="purge: drop the kept samples of the surplus (target) class the stage-3 model "
                                   "disagrees with and train stage 3 again (not the paper's)")
    purge_rounds: int = param(1, doc="purge: how many times to drop and retrain, each round judged by the "
                                     "previous round's model")
    min_isolated: float = param(0.0, doc="floor of the split: when Otsu isolates a smaller share, the lowest-scored "
                                         "min_isolated share is isolated instead (0 = off; paper preset 0.1, read "
                                         "from the paper's Table 1: docs/a-abl.md)")

    def validate(self, where: str) -> None:
        if self.takeback_epochs < 0:
            raise ConfigError(f"{key_path(where, 'takeback_epochs')}: {self.takeback_epochs} must be >= 0")
        if self.purge_rounds < 1:
            raise ConfigError(f"{key_path(where, 'purge_rounds')}: {self.purge_rounds} must be >= 1")
        if self.takeback_lr is not None and not self.takeback_lr > 0:
            raise ConfigError(f"{key_path(where, 'takeback_lr')}: {self.takeback_lr} must be > 0")
        if not 0.0 <= self.min_isolated < 1.0:
            raise ConfigError(f"{key_path(where, 'min_isolated')}: {self.min_isolated} must lie in [0, 1)")
        if not self.split_eps > 0 or self.split_steps < 1:
            raise ConfigError(f"{key_path(where, 'split_eps')}: an iFGSM budget > 0 and at least one step are "
                              "required")

    def takeback_config(self) -> TrainConfig:
        """The take-back training: stage 3's adversary and optimiser, fresh cosine schedule, a lower rate."""
        lr = self.takeback_lr if self.takeback_lr is not None else self.final.lr / 10
        return replace(self.final, epochs=self.takeback_epochs, lr=lr, schedule="cosine", milestones=(),
                       warmup_epochs=0)


@register_defense
class AABL(Defense):
    name = "a-abl"
    cached_stages = {"naive": "all"}
    label = "A-ABL"
    description = "A-ABL: naive training, iFGSM+SCE Otsu split, PGD adversarial training on the vulnerable subset"
    Params = AABLParams
    assumptions = (
        "Nothing is known about the trigger, the target class or the poison rate, and no clean data is needed.",
        "A model trained normally on all the data learns the backdoor as a strong feature: poisoned samples keep "
        "their label under a small iFGSM perturbation (split_eps), so their adversarial loss is low and they fall "
        "below Otsu's threshold. Patch-like triggers behave so; blended, warping or other stealthy triggers "
        "usually do not and stay in the kept set.",
        "Adversarial training (PGD, eps 8/255) on the kept set suppresses the triggers left in it; a trigger that "
        "changes images by more than that budget is not suppressed by it.",
        "Otsu's threshold always cuts the score distribution somewhere, so clean samples are isolated too (on "
        "clean data typically 10-25 %): isolation alone is no evidence of poison; a class with a surplus is.",
    )
    presets = {
        # min_isolated 0.1: the paper's Table 1 reports gamma = 90.00 exactly wherever Otsu would keep more
        # (clean CIFAR-10 and Tiny-ImageNet, Blend, SSBA), the mark of a floor of 10 % isolated (docs/a-abl.md)
        "paper": AABLParams(min_isolated=0.1),
        # The split only works once the naive model has learned the backdoor firmly: crop without flip (a flip
        # moves a corner patch to the other corner) and a schedule that ends at a low loss. 25 epochs of Adam
        # at 2e-3 with a cosine decay isolate as much poison as 40 at a constant 1e-3 in 60 % of the time
        # (mini CIFAR-10, BadNets, targets 0 and 3: docs/a-abl.md, "Stage 1 of the quick preset").
        "quick": AABLParams(naive=QUICK_NAIVE, final=QUICK_AT),
    }

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        p = self.params
        # Stage 1: naive training on everything.
        log.info("A-ABL stage 1/3: naive training on all %d samples", len(data))
        naive, naive_hist = train_stage(ctx, data, p.naive, "naive")
        # Stage 2: adversarial split.
        log.info("A-ABL stage 2/3: iFGSM split (eps %.4g, %d steps, %s)", p.split_eps, p.split_steps, p.split_loss)
        scores = self.split_scores(naive, data, ctx)
        split = robust_split(scores, log_scale=p.split_log, min_isolated=p.min_isolated)
        kept = split.kept  # vulnerable (high adversarial SCE loss) samples are kept
        log.info("split (%s): threshold %.4g; kept %d vulnerable, isolated %d robust samples", split.rule,
                 split.threshold, int(kept.sum()), int((~kept).sum()))
        # Stage 3: adversarial training from scratch on the vulnerable subset.
        log.info("A-ABL stage 3/3: PGD adversarial training on the %d kept samples", int(kept.sum()))
        model, final_hist = train_stage(ctx, data.subset(kept), p.final, "adv_train", seed_offset=1)
        info = split.info()
        history = {"naive": naive_hist, "adv_train": final_hist}
        stats = {}
        if p.purge:
            model = self.purge(model, data, kept, scores, ctx, info, history, stats)
        if p.takeback_epochs:
            back = take_back(model, data, kept, ctx)
            trained = kept.cpu() & ~stats["purged"] if "purged" in stats else kept.cpu()  # purged stay out
            info["taken_back"] = int(back.sum())
            log.info("take back: the robust model predicts the given label of %d of the %d isolated samples; "
                     "adversarial training continues on %d samples for %d epochs", int(back.sum()),
                     int((~kept).sum()), int((trained | back).sum()), p.takeback_epochs)
            history["takeback"] = train_stage(ctx, data.subset(trained | back), p.takeback_config(), "takeback",
                                              seed_offset=2, model=model)[1]
            stats["taken_back"] = back
        return DefenseResult(model, kept=kept, scores=scores, score_name="sce_adv", higher_is_suspicious=False,
                             info=info, history=history, sample_stats=stats)

    def purge(self, model, data: ImageSet, kept, scores, ctx: DefenseContext, info: dict, history: dict,
              stats: dict, retrain_last: bool = True):
        """The ``purge`` option: the stage-3 model retrained without the kept target-class samples it disagrees
        with (``purge_rounds`` times, each round judged by the previous round's model), or ``model`` itself when
        the split's ranking shows no class surplus. Without ``retrain_last`` the last round only drops (a later
        stage trains on what is left) and the model that judged it is returned."""
        surplus = class_surplus(data.y.cpu().numpy(), torch.argsort(scores.cpu()).numpy(),
                                (~kept).cpu().numpy(), data.classes)
        info["purge_target"], info["purge_p"] = surplus.target, surplus.p
        if surplus.target is None:
            log.info("purge: no class has a surplus among the isolated samples (best %s, p %.2g): nothing dropped",
                     surplus.best, surplus.p)
            return model
        kept = kept.cpu()
        in_target = kept & (data.y.cpu() == surplus.target)
        purged = torch.zeros_like(kept)
        info["purged_per_round"] = []
        rounds = self.params.purge_rounds
        for r in range(1, rounds + 1):
            dropped = in_target & ~purged & ~agrees_with_label(model, data, ctx)
            purged |= dropped
            info["purged_per_round"].append(int(dropped.sum()))
            log.info("purge round %d: class %d has a surplus (p %.2g); dropping %d more of its %d kept samples "
                     "(the robust model disagrees with their label), %d kept samples left", r, surplus.target,
                     surplus.p, int(dropped.sum()), int(in_target.sum()), int((kept & ~purged).sum()))
            if r == rounds and not retrain_last:
                break
            model = self.train_purged(ctx, data, kept & ~purged, r, history)
        info["purged"] = int(purged.sum())
        stats["purged"] = purged
        return model

    def train_purged(self, ctx: DefenseContext, data: ImageSet, train_on, r: int, history: dict):
        """Stage 3 again, from scratch, on ``train_on`` after purge round ``r`` (its own stage name and seed)."""
        stage = "purged_adv_train" if r == 1 else f"purged_adv_train_{r}"
        model, history[stage] = train_stage(ctx, data.subset(train_on), self.params.final, stage, seed_offset=2 + r)
        return model

    def split_scores(self, model, data: ImageSet, ctx: DefenseContext) -> torch.Tensor:
        """Per-sample SCE loss of the iFGSM adversarial example (low = robust = suspicious): the scorer the
        ``ifgsm-sce`` detector calls too."""
        p = self.params
        return ifgsm_scores(model, data, ctx, p.split_eps, p.split_steps, p.split_step, p.split_loss)
