"""AIBD (Adversarial-Inspired Backdoor Defense, AAAI 2025), Algorithm 1 of the paper.

1. Train an infected model f_p (on everything but a held-out slice, see below).
2. Unbounded L-inf PGD on every training sample (step 1/255, no random start, sign ascent of the CE loss
   w.r.t. the given label; whole batches in eval mode with early stop): k_i = the number of steps until
   the prediction first leaves the label (``pgd_cap`` if it never does), y^_i = the label it goes to.
3. Eq. 4: k_i <- (1 - sigmoid(g_i)) * k_i with g_i = ||grad_x L(f_p(x_i), y_i)||_p at the clean input
   (``grad_norm_p``: 1 = L1, the default; 2 = L2): confidently fitted samples (small gradient) keep k.
4. Progressive top-q: for q = 20%, 18%, ..., 2% the top-q fraction by amplified k forms D^t (high k =
   hard to turn into an adversarial example = poisoned, paper Sec. "Distinctive adversarial attack
   behaviors"); D^t is relabelled by y^ (Eq. 6) and f_p fine-tuned on D^c + D^t. The largest q whose
   accuracy ACC stays within ``tolerance`` of ACC_p is kept; a q whose ACC has collapsed below ACC_p -
   ``abandon_drop`` after ``abandon_epoch`` epochs is abandoned early (catastrophic forgetting, Fig. 3).

Both of AIBD's data-driven decisions follow one rule (docs/aibd.md, "Decisions"): AIBD changes course only when
a one-sided test at level ``alpha`` (Bonferroni over the comparisons one decision makes) says so. The target
filter (quick preset) restricts D^t to a class only when that class has a significant surplus at the top of
the ranking (``antibackdoor.surplus``, the test ``defend`` uses); a q is rejected (or abandoned) only when its
held-out accuracy, the mean of the last ``judge_epochs`` epochs, is significantly below ACC_p - ``tolerance``
(a paired test on the same held-out samples), so that ~2 points of noise on ~500 samples cannot decide q.

The defender has no clean test set, so ACC and ACC_p are measured on a random held-out slice of the
training data (``holdout``) that neither f_p nor the fine-tuned models see, minus the slice's samples in
the (unfiltered) top-max(qs): the slice holds poisoned samples too, and counting their target labels as
correct would reward the backdoor. Deviations from the official code (the authors' release) are listed in
docs/aibd.md.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..adversarial.pgd import PGDStats
from ..config import key_path, param
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..jsonutil import write_json
from ..metrics import predict
from ..plots import plot_class_surplus, plot_k_distribution
from ..seeding import generator
from ..stages import DefenseContext, Treatment, top_count, top_fraction, train_stage, treat
from ..stages.aibd import TARGET_FRACTIONS, flip_scores, flip_statistics, guess_target, rank_desc
from ..surplus import ALPHA, Surplus, TargetGuess
from ..training import TrainConfig
from .base import Defense, DefenseResult, register_defense

log = logging.getLogger("antibackdoor")

PAPER_QS = (0.20, 0.18, 0.16, 0.14, 0.12, 0.10, 0.08, 0.06, 0.04, 0.02)
TREATMENTS = ("adversarial", "random", "unlearn")


@dataclass(frozen=True)
class AIBDParams:
    infected: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=65, optimizer="sgd", lr=0.1, schedule="step", milestones=(25, 50), crop=0, flip=False),
        doc="f_p, the infected model, trained on everything but the held-out slice")
    holdout: float = param(0.1, doc="fraction of the training data held out to measure ACC / ACC_p")
    pgd_step: float = param(1 / 255, doc="step of the unbounded flip-counting PGD, pixel units")
    pgd_cap: int = param(255, doc="most PGD steps; never-flipped samples get k = cap")
    grad_norm_p: float = param(1.0, doc="Eq. 4's gradient magnitude: 1 = L1 norm, 2 = L2 norm of grad_x")
    amplify: bool = param(True, doc="apply Eq. 4 (False: rank by the raw k)")
    qs: tuple[float, ...] = param(PAPER_QS, doc="isolation rates (fractions of N), tried in this order (largest "
                                                "first)")
    retrain: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=15, optimizer="sgd", lr=0.1, schedule="step", milestones=(5, 10), crop=0, flip=False),
        doc="per q: training on D^c + the treated D^t (from f_p unless from_scratch)")
    from_scratch: bool = param(False, doc="retrain each q from a fresh model instead of fine-tuning f_p")
    tolerance: float = param(0.035, doc="a q is kept unless its ACC is significantly below ACC_p - tolerance "
                                        "(a fraction)")
    judge_epochs: int = param(3, doc="ACC = the mean held-out accuracy of the last this-many fine-tuning epochs")
    alpha: float = param(ALPHA, doc="level of the one-sided tests behind both decisions (target filter, q)")
    abandon_epoch: int = param(6, doc="check for a collapse after this many fine-tuning epochs (0: never abandon)")
    abandon_drop: float = param(0.07, doc="abandon the q if its ACC is then significantly below ACC_p - "
                                          "abandon_drop (a fraction)")
    treatment: Literal["adversarial", "random", "unlearn"] = param(
        "adversarial", doc="D^t labels: adversarial (y^, Eq. 6), random (uniform != y) or unlearn (gradient ascent)")
    unlearn_weight: float = param(1.0, doc="unlearn: loss weight -unlearn_weight on D^t (gradient ascent, as ABL)")
    target_filter: bool = param(False, doc="isolate only samples of the target class, when the surplus test finds "
                                           "one")
    target_fractions: tuple[float, ...] = param(TARGET_FRACTIONS, doc="depths (fractions of N) of the surplus test")
    batch_size: int = param(512, doc="images per batch of the flip-counting PGD")

    def validate(self, where: str) -> None:
        if not self.qs or any(not 0 < q < 1 for q in self.qs):
            raise ConfigError(f"{key_path(where, 'qs')}: {list(self.qs)} must be a non-empty list of fractions in "
                              "(0, 1)")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"{key_path(where, 'holdout')}: {self.holdout} must be in (0, 1)")
        if self.pgd_cap < 1 or not self.pgd_step > 0:
            raise ConfigError(f"{where}: pgd_cap >= 1 and pgd_step > 0 are required")
        if not self.target_fractions or any(not 0 < f <= 1 for f in self.target_fractions):
            raise ConfigError(f"{key_path(where, 'target_fractions')}: {list(self.target_fractions)} must be a "
                              "non-empty list of fractions in (0, 1]")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"{key_path(where, 'alpha')}: {self.alpha} must be in (0, 1)")
        if self.judge_epochs < 1:
            raise ConfigError(f"{key_path(where, 'judge_epochs')}: {self.judge_epochs} must be at least 1")


# -- the pieces of Algorithm 1 that the aibd-flip detector does not share ------------------------------------
def shortfall_test(epochs: list[dict], margin: float) -> tuple[float, float]:
    """(ACC, p): ACC = the mean held-out accuracy over ``epochs`` (their history records), p = the one-sided
    p-value of "ACC is at least ACC_p - ``margin``" (small p: significantly worse than that).

    Paired on the judged samples: per epoch, ``holdout_worse`` samples f_p got right and the model wrong and
    ``holdout_better`` the reverse; the difference ACC - ACC_p is their mean difference, its variance that of
    a {-1, 0, 1} variable over ``holdout_judged`` samples. The standard error of the mean over epochs is taken
    as the mean of the epochs' standard errors (an upper bound: the epochs are positively correlated); the
    statistic is referred to a t distribution with (samples - 1) degrees of freedom.
    """
    from scipy.stats import t

    if not epochs:
        return float("nan"), 1.0
    m = int(epochs[-1]["holdout_judged"])
    if m == 0:
        return float("nan"), 1.0
    diffs, ses = [], []
    for e in epochs:
        worse, better = int(e["holdout_worse"]), int(e["holdout_better"])
        d = (better - worse) / m
        diffs.append(d)
        ses.append(math.sqrt(max((better + worse) / m - d * d, 0.0) / m))
    acc = sum(float(e["holdout_acc"]) for e in epochs) / len(epochs)
    diff, se = sum(diffs) / len(diffs), sum(ses) / len(ses)
    excess = diff + margin  # negative: below ACC_p - margin
    if se == 0:
        return acc, 0.0 if excess < 0 else 1.0
    return acc, float(t.cdf(excess / se, max(m - 1, 1)))


def q_decision(abandoned: bool, p_shortfall: float, alpha: float) -> str:
    """The decision on one q: "abandoned" (collapsed early), "rejected" (held-out accuracy significantly
    below ACC_p - tolerance: ``p_shortfall`` < ``alpha``) or "chosen"."""
    if abandoned:
        return "abandoned"
    return "rejected" if p_shortfall < alpha else "chosen"


def isolate(scores: torch.Tensor, q: float, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5: D^t = the ``top_count(N, q)`` highest-scored samples (only among ``candidates`` when given)."""
    return top_fraction(scores, q, candidates)


#: AIBD's treatments of D^t (Eq. 6 and Table 3's ablations) as the one ``treat`` of the stages: "adversarial" is
#: relabelling with the adversarial label y^ (a sample that never flipped has none and is dropped), "random" a
#: random relabelling, "unlearn" gradient ascent
TREATMENT_OF: dict[str, Treatment] = {"adversarial": "relabel", "random": "relabel", "unlearn": "unlearn"}


@dataclass
class HeldOut:
    """The defender's stand-in for a clean test set: a held-out slice of the training data that neither f_p
    nor the fine-tuned models see, judged only on its samples outside the unfiltered top-max(qs) (``judge``):
    that drops most held-out poison, whose target label would reward the backdoor, without hiding what a
    class-filtered D^t does to the clean samples of the target class."""

    holdout: torch.Tensor  # bool, N: the held-out slice
    data: ImageSet  # the held-out samples
    judge: torch.Tensor  # bool, over the held-out samples: the ones that count
    correct_p: torch.Tensor  # bool, over the judged samples: f_p right
    acc_p: float  # ACC_p: f_p's accuracy on the judged samples
    acc_infected: float  # f_p's accuracy on every held-out sample (for the record)
    device: torch.device

    @classmethod
    def build(cls, infected: nn.Module, data: ImageSet, holdout: torch.Tensor, scores: torch.Tensor, q_max: float,
              device: torch.device) -> HeldOut:
        held = data.subset(holdout)
        judge = ~isolate(scores, q_max)[holdout]
        pred = predict(infected, held, device)
        y = held.y.cpu()
        correct_p = (pred == y)[judge]
        return cls(holdout, held, judge, correct_p, _masked_acc(pred, y, judge), float((pred == y).float().mean()),
                   device)

    def compare(self, model: nn.Module) -> dict:
        """``model`` against f_p on the judged samples: its accuracy and the paired discordant counts that
        ``shortfall_test`` reads (plain numbers, so they live in the training history and survive a resume)."""
        correct = (predict(model, self.data, self.device) == self.data.y.cpu())[self.judge]
        return {"holdout_acc": float(correct.float().mean()) if len(correct) else float("nan"),
                "holdout_acc_p": self.acc_p, "holdout_judged": len(correct),
                "holdout_worse": int((self.correct_p & ~correct).sum()),
                "holdout_better": int((~self.correct_p & correct).sum())}


@dataclass
class QSearch:
    """The progressive top-q search so far: every q's record, and the last trained q (the chosen one, or the
    fallback when none is stable)."""

    trials: list[dict] = field(default_factory=list)
    history: dict[str, list[dict]] = field(default_factory=dict)
    model: nn.Module | None = None
    q: float = float("nan")
    isolated: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    weight: torch.Tensor | None = None


# -- the defense -------------------------------------------------------------------------------------------
@register_defense
class AIBD(Defense):
    name = "aibd"
    cached_stages = {"infected": "aibd-holdout-complement"}  # all but its held-out slice
    label = "AIBD"
    description = "AIBD: isolate by PGD flip counts, relabel adversarially, progressive top-q"
    Params = AIBDParams
    assumptions = (
        "Nothing is known about the trigger and no clean data is needed; accuracy is judged on a held-out slice "
        "(holdout) of the untrusted training data itself.",
        "Poisoned samples sit deep inside their (target) class: an unbounded PGD attack needs many more steps to "
        "move them off their label than clean samples, and their input gradient is small (Eq. 4).",
        "At most the largest isolation rate in qs (20 %) of the data is poisoned; the largest q whose held-out "
        "accuracy is not significantly below the infected model's minus the tolerance (one-sided test at level "
        "alpha) is kept.",
        "An isolated sample's adversarial label (the class its adversarial example goes to) is its true class; "
        "it is retrained with that label.",
        "With the target filter (on in the quick preset): a single target class (all-to-one attack), found as the "
        "class with a significant surplus among the top 1-10 % by flip count; only samples of that class are "
        "isolated. When no class has a significant surplus, nothing is filtered.",
    )
    presets = {
        # Official code: ResNet-18, SGD 0.1 x0.1 at 25/50 of 65 epochs, no augmentation; fine-tuning of the
        # infected model per q with SGD 0.1/0.01/0.001 (5 epochs each), collapse check after epoch 6 at
        # 2 x 3.5 points, acceptance within 3.5 points; PGD step 1/255 up to 255 steps.
        "paper": AIBDParams(),
        # CPU budget (docs/aibd.md): the quick CNN trained without augmentation as in the paper; per q a
        # 6-epoch Adam fine-tune of f_p (cosine, crop 4: ends settled) instead of 15 SGD epochs; every
        # other q of the paper's grid; the collapse check at half-time (the Adam restart itself costs
        # ~10 points in the first epochs); a wider tolerance for the ~460-sample judge set, which still
        # holds poison that counts against a purified model; the target-class filter, which lifts TPR on
        # the quick CNN from ~0.7 to ~0.95 (BadNets) where the flip counts alone separate less than in
        # the paper.
        "quick": AIBDParams(
            infected=TrainConfig(epochs=20, optimizer="adam", lr=1e-3, crop=0, flip=False),
            qs=(0.20, 0.16, 0.12, 0.08, 0.04, 0.02),
            retrain=TrainConfig(epochs=6, optimizer="adam", lr=1e-3, schedule="cosine", crop=4, flip=False),
            abandon_epoch=3, abandon_drop=0.15, tolerance=0.05, judge_epochs=2, target_filter=True,
        ),
    }

    # The runner calls this after the run; the poison mask and true labels are evaluation-only.
    def write_plots(self, result: DefenseResult, poison_mask: torch.Tensor, run_dir: Path,
                    true_labels: torch.Tensor | None = None) -> list[Path]:
        stats = result.sample_stats
        if "k" not in stats or result.scores is None:
            return []
        paths = [plot_k_distribution(
            result.scores, poison_mask, run_dir / "k_distribution.png", raw_k=stats["k"],
            adv_label=stats.get("adv_label"), true_labels=true_labels, cut=result.info.get("threshold"),
            cap=result.info.get("pgd_cap"))]
        guess = TargetGuess.from_info(result.info)
        if guess is not None:
            paths.append(plot_class_surplus(guess.surplus, run_dir / "target_surplus.png",
                                            title=f"AIBD {guess.title()}"))
        return paths

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        """Algorithm 1: infected model, flip counts, Eq. 4, progressive top-q with relabelling."""
        p = self.params
        holdout = self.holdout_mask(len(data), ctx.seed)
        # Step 1: the infected model f_p, on everything but the held-out slice.
        infected, infected_hist = train_stage(ctx, data.subset(~holdout), p.infected, "infected")
        # Steps 2 and 3: flip counts k on every sample (held-out ones are ranked like the rest), Eq. 4.
        stats = self.flip_statistics(infected, data, ctx)
        scores, k = flip_scores(stats, p.pgd_cap, p.amplify)
        candidates, surplus = self.target_candidates(rank_desc(scores), data)
        # Step 4: progressive top-q, judged on the held-out slice.
        judge = HeldOut.build(infected, data, holdout, scores, max(p.qs), ctx.device)
        search = self.progressive_q(data, ctx, infected, judge, scores, candidates, stats.flip_label)
        search.history = {"infected": infected_hist, **search.history}
        return self.result(scores, stats, k, judge, search, surplus)

    # -- the steps of Algorithm 1 --------------------------------------------------------------------------
    def target_candidates(self, order: torch.Tensor, data: ImageSet) -> tuple[torch.Tensor | None, Surplus]:
        """The class-surplus test on the ranking (always run and recorded), and with ``target_filter`` the
        samples of the class it found; None (no filter) when the filter is off or no class has a significant
        surplus."""
        p = self.params
        y = data.y.cpu()
        surplus = guess_target(order, y, list(data.classes), p.target_fractions, p.alpha)
        best = "none" if surplus.best is None else f"class {surplus.best} ({data.classes[surplus.best]})"
        if surplus.target is None:
            log.info("aibd target guess: no class has a significant surplus at the top of the ranking (best %s, "
                     "adjusted p %.3g >= %g)%s", best, surplus.p, p.alpha,
                     "; the target filter is not applied" if p.target_filter else "")
            return None, surplus
        log.info("aibd target guess: %s, adjusted p %.3g < %g%s", best, surplus.p, p.alpha,
                 "; isolating within that class only" if p.target_filter else " (target filter off)")
        return (y == surplus.target if p.target_filter else None), surplus

    def progressive_q(self, data: ImageSet, ctx: DefenseContext, infected: nn.Module, judge: HeldOut,
                      scores: torch.Tensor, candidates: torch.Tensor | None, adv_label: torch.Tensor) -> QSearch:
        """Try each q, largest first, until one keeps the held-out accuracy; the last one is the fallback.

        A resumed run skips the q's already rejected (their records are kept in the work folder).
        """
        p = self.params
        n = len(data)
        state = self._load_state(ctx)
        search = QSearch()
        for i, q in enumerate(p.qs):
            stage = f"q{round(q * 1000):03d}"
            last = i == len(p.qs) - 1  # the fallback model: never skipped, its checkpoint is kept
            if candidates is not None and top_count(n, q) >= int(candidates.sum()) and not last:
                # as the official code: a q that would isolate every sample of the guessed class is skipped
                search.trials.append({"q": q, "decision": "skipped", "isolated": int(candidates.sum())})
                continue
            record = state.get(stage)
            if record is not None and not last and record["decision"] in ("abandoned", "rejected"):
                search.trials.append(record)
                search.history[stage] = record.get("history", [])
                continue
            isolated = isolate(scores, q, candidates)
            gen = generator(ctx.seed, "aibd", "treatment", stage)  # per q: a resume draws the same labels
            proposed = adv_label if p.treatment == "adversarial" else None
            labels, weight = treat(data.y.cpu(), isolated, TREATMENT_OF[p.treatment], data.num_classes, gen, proposed,
                                   p.unlearn_weight)
            model, record = self.fine_tune(data, ctx, infected, judge, stage, isolated, labels, weight)
            record = {"q": q, **record}
            search.trials.append(record)
            search.history[stage] = record["history"]
            log.info("aibd q=%.2f: holdout acc %.4f (mean of the last %d epochs) vs infected %.4f, p(shortfall "
                     "beyond %.3f) = %.3g after %d epochs -> %s", q, record["acc"], min(p.judge_epochs,
                     record["epochs"]), judge.acc_p, p.tolerance, record["p_shortfall"], record["epochs"],
                     record["decision"])
            if record["decision"] != "chosen" and not last:
                self._save_state(ctx, stage, record)
                _remove(ctx.checkpoint(stage))
            search.model, search.q, search.isolated, search.labels, search.weight = model, q, isolated, labels, weight
            if record["decision"] == "chosen":
                break
        return search

    def fine_tune(self, data: ImageSet, ctx: DefenseContext, infected: nn.Module, judge: HeldOut, stage: str,
                  isolated: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> tuple[nn.Module, dict]:
        """Train on D^c + relabelled D^t (Eq. 6) from f_p (or from scratch) and judge the result (``q_decision``):
        "abandoned" when at ``abandon_epoch`` it was significantly below ACC_p - ``abandon_drop``, "rejected"
        when its mean held-out accuracy over the last ``judge_epochs`` is significantly below ACC_p -
        ``tolerance``, else "chosen"."""
        p = self.params
        use = ~judge.holdout & (weight != 0)
        sw = weight[use] if p.treatment == "unlearn" else None

        def on_epoch_end(epoch: int, model: nn.Module) -> dict:
            out = judge.compare(model)
            if p.abandon_epoch and epoch + 1 == p.abandon_epoch and epoch + 1 < p.retrain.epochs \
                    and shortfall_test([out], p.abandon_drop)[1] < p.alpha:
                out.update(stop=True, abandoned=True)
            return out

        start = ctx.fresh_model(stage) if p.from_scratch else copy.deepcopy(infected)
        model, hist = train_stage(ctx, data.subset(use).with_labels(labels[use]), p.retrain, stage,
                                  sample_weight=sw, seed_offset=stage, on_epoch_end=on_epoch_end, model=start)
        abandoned = any(h.get("abandoned") for h in hist)
        acc, p_short = shortfall_test(hist[-p.judge_epochs:], p.tolerance)
        decision = q_decision(abandoned, p_short, p.alpha)
        return model, {"decision": decision, "acc": acc, "p_shortfall": p_short, "acc_p": judge.acc_p,
                       "acc_last": hist[-1].get("holdout_acc", float("nan")) if hist else float("nan"),
                       "epochs": len(hist), "isolated": int(isolated.sum()), "history": hist}

    def result(self, scores: torch.Tensor, stats: PGDStats, k: torch.Tensor, judge: HeldOut, search: QSearch,
               surplus: Surplus) -> DefenseResult:
        """The chosen q's model and split, with what the run measured (info and per-sample statistics)."""
        p = self.params
        assert search.model is not None and search.isolated is not None
        isolated, q = search.isolated, search.q
        stable = search.trials[-1]["decision"] == "chosen"
        if not stable:
            log.warning("aibd: every q in %s left the held-out accuracy significantly below the infected model's "
                        "minus %.3f; using the smallest, q=%.2f", list(p.qs), p.tolerance, q)
        info = {
            "q": q, "stable": stable, "threshold": float(scores[isolated].min()) if isolated.any() else None,
            "isolated": int(isolated.sum()), "kept": int((~isolated).sum()), "holdout": int(judge.holdout.sum()),
            "treatment": p.treatment, "acc_infected_holdout": judge.acc_infected, "acc_p": judge.acc_p,
            "judge_samples": int(judge.judge.sum()), "never_flipped": int((stats.flip_step < 0).sum()),
            "dropped_unflipped": int((isolated & (search.weight == 0)).sum()), "pgd_cap": p.pgd_cap,
            "grad_norm_p": p.grad_norm_p, "alpha": p.alpha, "judge_epochs": p.judge_epochs,
            # the target guess: the significant class or None, its adjusted p, whether D^t was restricted to it
            "target": surplus.target, "target_best": surplus.best, "target_p": surplus.p,
            "target_filter": p.target_filter, "target_filter_applied": p.target_filter and surplus.target is not None,
            "target_surplus": surplus.as_dict(),
            "trials": [{k_: v for k_, v in t.items() if k_ != "history"} for t in search.trials],
        }
        new_labels = None if p.treatment == "unlearn" else search.labels
        return DefenseResult(search.model, kept=~isolated, scores=scores, score_name="aibd_k_amplified",
                             higher_is_suspicious=True, new_labels=new_labels, info=info, history=search.history,
                             sample_stats={"k": k, "adv_label": stats.flip_label, "grad_norm": stats.grad_norm})

    # -- helpers -----------------------------------------------------------------------------------------
    def holdout_mask(self, n: int, seed: int) -> torch.Tensor:
        """A seeded random ``holdout`` fraction (at least one sample, at most n - 2)."""
        count = min(max(1, round(self.params.holdout * n)), max(n - 2, 1))
        perm = torch.randperm(n, generator=generator(seed, "aibd", "holdout"))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[perm[:count]] = True
        return mask

    def flip_statistics(self, model: nn.Module, data: ImageSet, ctx: DefenseContext) -> PGDStats:
        """Step 2, cached in the work folder so that a resumed run does not attack everything again."""
        path = None if ctx.workdir is None else ctx.workdir / "aibd_flip_stats.pt"
        if path is not None and ctx.resume and path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if len(saved["flip_step"]) == len(data):
                return PGDStats(**saved)
        p = self.params
        stats = flip_statistics(model, data, ctx, p.pgd_step, p.pgd_cap, p.grad_norm_p)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dict(stats.__dict__), path)
        return stats

    def _state_path(self, ctx: DefenseContext) -> Path | None:
        return None if ctx.workdir is None else ctx.workdir / "aibd_progress.json"

    def _load_state(self, ctx: DefenseContext) -> dict:
        path = self._state_path(ctx)
        if path is None or not ctx.resume or not path.exists():
            return {}
        return json.loads(path.read_text())

    def _save_state(self, ctx: DefenseContext, stage: str, record: dict) -> None:
        """Remember a rejected q so that a resume skips it (its checkpoint is deleted to save disk)."""
        path = self._state_path(ctx)
        if path is None:
            return
        state = json.loads(path.read_text()) if path.exists() else {}
        state[stage] = record
        write_json(path, state)


def _masked_acc(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    if int(mask.sum()) == 0:
        return float("nan")
    return float((pred[mask] == y[mask]).float().mean())


def _remove(path: Path | None) -> None:
    if path is not None and path.exists():
        path.unlink()
