"""A-ABL-PDB (ours): A-ABL+'s isolation and purge, then adversarial training behind a defensive backdoor.

A-ABL+ (the log-score split and the purge of the surplus class) removes the poison a naively trained model learns
as a robust feature: patches, few pixels, Trojan, IAB. Whole-image triggers (Blend, WaNet, SSBA) stay in its kept
set; adversarial training learns little of their trigger, but their target-labelled poison still pulls clean inputs
toward the target class. PDB's defensive backdoor overrides both at inference, if its pool holds no poison. So:

1. Naive training on all data; A-ABL's iFGSM split with Otsu's threshold on the log score (``a-abl+``).
2. The robust model: PGD adversarial training on the kept samples (A-ABL's stage 3).
3. The purge (``a-abl+``): where the split shows a class surplus, the kept samples of that class the robust model
   disagrees with are dropped (without the retraining ``a-abl+`` does: step 4 trains on what is left).
4. The defensive pool: in every class, the ``ratio`` share of the data (the same number a class) that the ranking
   ``pool_rank`` trusts most, among the samples left that both models predict with their given label. The
   default ranking, ``loss-gain``, is the naive model's loss minus the robust model's: a poisoned sample is easy
   for the naive model (it learned the trigger) and harder for the robust one (it learned little of it), a clean
   sample the other way round.
5. PGD adversarial training from scratch on the samples left plus ``frequency`` stamped and augmented copies of
   every pool sample, labelled h(y) = (y + shift) mod K; the adversary perturbs every row, around the defensive
   trigger but never on it. The returned model stamps the trigger on every input and maps the answer back through
   h^-1 (``models.wrappers.StampAndRelabel``), so ACC, ASR, RA (PGD through the wrapper) and ``defend``'s report
   measure what is deployed.

Cost: one more stage 3 than ``a-abl`` on the kept samples plus the defensive copies (``frequency`` x ``ratio`` of
the data); no retraining after the purge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

import torch

from ..config import key_path, param
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..stages import DefenseContext, agrees_with_label, sample_losses, train_stage
from ..stages.aabl import robust_split
from ..stages.defensive import DefensiveAugment, DefensiveTrigger, validate_defensive, validate_ratio
from ..stages.recipes import QUICK_AT, QUICK_NAIVE
from ..training import TrainConfig
from .a_abl import AABL, AABLParams
from .base import DefenseResult, register_defense, train_passes
from .pdb import _PDBBase

log = logging.getLogger("antibackdoor")

PoolRank = Literal["loss-gain", "robust-loss", "naive-loss"]


@dataclass(frozen=True)
class AABLPDBParams(AABLParams):
    ratio: float = param(0.3, doc="size of the defensive pool as a share of the training data, the same number "
                                  "from every class (PDB's ratio is 0.1; docs/every-trigger.md)")
    pool_rank: PoolRank = param("loss-gain", doc="which samples the pool trusts most, among those both models "
                                                 "predict with their given label: loss-gain (the naive model's "
                                                 "loss minus the robust model's, highest first), robust-loss (the "
                                                 "robust model's loss, lowest first), naive-loss (the naive "
                                                 "model's loss, highest first)")
    frequency: int = param(2, doc="copies of every defensive sample in each epoch of the final training (PDB's: 5)")
    shift: int = param(1, doc="the label map h(y) = (y + shift) mod K, undone at inference")
    from_robust: bool = param(False, doc="the final training continues from the robust model instead of a fresh "
                                         "one")
    defended_epochs: int | None = param(None, doc="epochs of the final training (None: final.epochs)")
    defended_lr: float | None = param(None, doc="learning rate of the final training (None: final.lr)")
    trigger: DefensiveTrigger = param(factory=DefensiveTrigger, doc="the defensive trigger")
    augment: DefensiveAugment = param(factory=DefensiveAugment, doc="augmentation of the defensive copies, after "
                                                                    "stamping")

    def validate(self, where: str) -> None:
        super().validate(where)
        validate_ratio(where, self.ratio)
        validate_defensive(where, self.frequency, self.shift)
        if self.defended_epochs is not None and self.defended_epochs < 1:
            raise ConfigError(f"{key_path(where, 'defended_epochs')}: {self.defended_epochs} must be >= 1")
        if self.defended_lr is not None and not self.defended_lr > 0:
            raise ConfigError(f"{key_path(where, 'defended_lr')}: {self.defended_lr} must be > 0")
        if self.final.adversary is None:
            raise ConfigError(f"{key_path(where, 'final.adversary')}: the final training must be adversarial")


@register_defense
class AABLPDB(AABL, _PDBBase):
    name = "a-abl-pdb"
    label = ""  # ours: tables name it by its name
    paper_settings_of = "a-abl"
    description = ("A-ABL+'s split and purge, then adversarial training behind a defensive backdoor drawn from "
                   "the samples the naive and robust models trust most")
    Params = AABLPDBParams
    assumptions = (
        "Nothing is known about the trigger, the target class or the poison rate, and no clean data is needed.",
        "Poison a naively trained model learns as a robust feature (patches, few pixels) falls below the split's "
        "threshold or is purged from the class with a surplus among the isolated samples, as in a-abl+.",
        "Adversarial training learns little of the triggers left (blended, warping, invisible ones), so the "
        "robust model finds their poisoned samples harder than the naive model does: in every class the samples "
        "whose loss drops most from the naive to the robust model are clean, and they form the defensive pool. "
        "Poison in the pool would carry the attacker's backdoor through the defense.",
        "Every prediction of the returned model stamps the defensive trigger on the input and maps the answer "
        "back: the model is only defended when used as returned (antibackdoor.load_model does so).",
        AABL.assumptions[-1],  # Otsu's threshold always cuts: isolation alone is no evidence of poison
    )
    presets = {
        # a-abl+'s presets (a-abl's with the log split and the purge) and PDB's defensive backdoor
        "paper": AABLPDBParams(min_isolated=0.1, split_log=True, purge=True),
        "quick": AABLPDBParams(naive=QUICK_NAIVE, final=QUICK_AT, split_log=True, purge=True),
    }

    def per_class(self, data: ImageSet) -> int:
        """int(N x ratio / K) pool samples a class, at least one: a small data set still gets a pool."""
        return max(1, int(len(data) * self.params.ratio / data.num_classes))

    def defended_config(self) -> TrainConfig:
        """The final training: stage 3's adversary and optimiser, with ``defended_epochs`` and ``defended_lr``."""
        p = self.params
        return replace(p.final, epochs=p.defended_epochs or p.final.epochs, lr=p.defended_lr or p.final.lr)

    def extra_passes(self, n_train: int) -> float:
        """The final training on (about) the kept samples plus the defensive copies, which ``describe()``
        counts only as the one ``final`` config of stage 3."""
        p = self.params
        return train_passes(self.defended_config(), n_train * (1 + p.frequency * p.ratio))

    def trust(self, naive, robust, data: ImageSet, ctx: DefenseContext) -> torch.Tensor:
        """Per-sample trust for the pool under ``pool_rank`` (higher = more trusted), float64 on the CPU."""
        rank = self.params.pool_rank
        if rank == "robust-loss":
            return -sample_losses(robust, data, ctx).double()
        naive_loss = sample_losses(naive, data, ctx).double()
        if rank == "naive-loss":
            return naive_loss
        return naive_loss - sample_losses(robust, data, ctx).double()

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        p = self.params
        self.check_data(data)
        log.info("A-ABL-PDB 1/5: naive training on all %d samples", len(data))
        naive, naive_hist = train_stage(ctx, data, p.naive, "naive")
        scores = self.split_scores(naive, data, ctx)
        split = robust_split(scores, log_scale=p.split_log, min_isolated=p.min_isolated)
        kept = split.kept.cpu()
        log.info("split (%s): threshold %.4g; kept %d, isolated %d", split.rule, split.threshold, int(kept.sum()),
                 int((~kept).sum()))
        log.info("A-ABL-PDB 2/5: PGD adversarial training on the %d kept samples", int(kept.sum()))
        robust, robust_hist = train_stage(ctx, data.subset(kept), p.final, "adv_train", seed_offset=1)
        info = split.info()
        history = {"naive": naive_hist, "adv_train": robust_hist}
        stats: dict[str, torch.Tensor] = {}
        if p.purge:
            log.info("A-ABL-PDB 3/5: purge")
            robust = self.purge(robust, data, kept, scores, ctx, info, history, stats, retrain_last=False)
        left = kept & ~stats["purged"] if "purged" in stats else kept
        log.info("A-ABL-PDB 4/5: defensive pool (%s)", p.pool_rank)
        eligible = left & agrees_with_label(robust, data, ctx) & agrees_with_label(naive, data, ctx)
        trust = self.trust(naive, robust, data, ctx)
        per_class = self.per_class(data)
        chosen, pool = self.draw_pool(data, -trust, eligible, per_class)
        info.update({"pool_rank": p.pool_rank, "eligible": int(eligible.sum()), "trained_on": int(left.sum())})
        stats.update({"defensive": chosen, "pool_eligible": eligible, "pool_trust": trust.float()})
        if not bool(chosen.any()):
            # no sample both models agree with: a defensive backdoor would have nothing to learn from, and a
            # deployed model that stamps every input would answer at random; A-ABL+'s model is returned instead
            log.warning("A-ABL-PDB: no sample is eligible for the defensive pool (neither model agrees with any "
                        "given label); returning the robust model without a defensive backdoor")
            info["defensive_backdoor"] = False
            if "purged" in stats:  # the retraining a-abl+'s last purge round does
                robust = self.train_purged(ctx, data, left, p.purge_rounds, history)
            return DefenseResult(robust, kept=kept, scores=scores, score_name="sce_adv", higher_is_suspicious=False,
                                 info=info, history=history, sample_stats=stats)
        log.info("A-ABL-PDB 5/5: adversarial training on %d samples behind the defensive trigger", int(left.sum()))
        model, history["defended"] = self.train_defended(data.subset(left), pool, ctx, cfg=self.defended_config(),
                                                         stage="defended", seed_offset="defended",
                                                         model=robust if p.from_robust else None)
        info["defensive_backdoor"] = True
        info.update(self.describe_pool(pool, data.num_classes))
        return DefenseResult(model, kept=kept, scores=scores, score_name="sce_adv", higher_is_suspicious=False,
                             info=info, history=history, sample_stats=stats)
