"""VaB — The Victim and The Beneficiary (Zhu et al., ICCV 2023).

Two models. The **victim** is meant to learn the backdoor: trained on all the data briefly, then only on the
samples it finds suspicious, it predicts poisoned samples with low entropy. A sample is *suspicious* when its
prediction entropy under the victim (a running average, ``ema`` weight on the newest, scaled to [0, 1] over the
data) is at most ``threshold``; the rest are *credible*. The **beneficiary**, the model VaB returns, never sees
a suspicious sample's label:

1. victim: ``victim_warmup_epochs`` on all the data, then one round on the suspects per threshold in
   ``warmup_thresholds`` (looser first), then the split the beneficiary starts from;
2. beneficiary, epochs 1..``semi_from``: the credible samples only, two augmented views each, mixed with
   AttentionMix (``stages/mixing.py``: the region a sample's own attention covers is mixed with a partner's,
   so a missed trigger is diluted where the model looks); the victim trains a round on the suspects and the
   split is renewed every ``victim_every`` epochs;
3. beneficiary, the remaining epochs: semi-supervised suppression. The suspects join unlabelled: their
   pseudo-label is the one-hot argmax of the beneficiary's mean prediction over two views, *minus the victim's
   softened prediction* (temperature ``victim_temperature``) on the un-augmented image, clipped to [0, 1] — a
   pseudo-label that agrees with the victim, i.e. the backdoor's target on a poisoned sample, is suppressed;
   the credible samples' labels are suppressed the same way (a missed poisoned sample's target label is what the
   victim predicts). Loss: AttentionMix cross-entropy on the credible views + ``lambda_u`` (``lambda_u_late``
   from epoch ``late_from``) x cross-entropy of the unmixed suspect views; the victim trains and re-splits
   every epoch.

What the run records: ``kept`` is the final credible set (trained with its labels); the suspects, trained
without labels, are what VaB isolated. ``scores`` is the scaled running entropy (lower is more suspicious);
``sample_stats`` holds ``suspect_initial`` (the split the beneficiary started from) and ``victim_entropy``.

Choices (docs/baselines.md has the reasons): the victim is the run's model (the code: a ResNet-18 whatever the
beneficiary); entropy is the sum over classes with 0 log 0 = 0 (the code averages over classes and sets a
sample whose softmax underflows to 0 to entropy 0); one forward pass per batch; the beneficiary keeps the
model's own head (the code adds a head on the pooled last feature map).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from ..adversarial.pgd import eval_mode
from ..config import key_path, param
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..precision import Precision
from ..seeding import derive_seed
from ..stages import DefenseContext
from ..stages.dbd import restore
from ..stages.mixing import AttentionMix, CutMix, Mixer, MixUp, no_mix
from ..stages.semisup import SemiSpec, semisup_epoch
from ..training import TrainConfig, epoch_generator, make_optimizer, save_checkpoint, train
from .base import FORWARD_PASS, Defense, DefenseResult, register_defense, train_passes

log = logging.getLogger("antibackdoor")


@dataclass(frozen=True)
class VaBParams:
    victim: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=1, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=5e-4, crop=0, flip=False),
        doc="the victim's training; epochs = one round on the suspects (one optimizer for all its training)")
    victim_warmup_epochs: int = param(1, doc="the victim's first training, on all the data")
    warmup_thresholds: tuple[float, ...] = param((0.6, 0.2), doc="one victim round on the suspects per threshold, "
                                                                 "before the beneficiary starts")
    threshold: float = param(0.2, doc="a sample is suspicious when its scaled entropy is at most this")
    ema: float = param(0.75, doc="weight of the newest entropy in the running average the split reads")
    beneficiary: TrainConfig = param(factory=lambda: TrainConfig(
        epochs=200, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="step",
        milestones=(50, 100, 150), crop=4, flip=True), doc="the beneficiary (the returned model); batch_size: "
                                                           "credible samples per step")
    semi_from: int = param(100, doc="beneficiary epochs on the credible samples alone; the suspects join "
                                    "(unlabelled, suppressed) after them")
    victim_every: int = param(5, doc="until semi_from the victim trains a round and the split is renewed every "
                                     "this many beneficiary epochs (every epoch after)")
    mix: Literal["attention", "mixup", "cutmix", "none"] = param(
        "attention", doc="the credible views' mixing: AttentionMix, MixUp, CutMix (ablations) or none")
    mix_threshold: float = param(0.1, doc="AttentionMix: attention (scaled to [0, 1]) at which a pixel is mixed")
    mix_alpha: float = param(1.0, doc="MixUp / CutMix: Beta(alpha, alpha)")
    lambda_u: float = param(0.1, doc="weight of the suspects' loss from semi_from")
    lambda_u_late: float = param(0.5, doc="weight of the suspects' loss from late_from")
    late_from: int = param(150, doc="the beneficiary epoch after which lambda_u_late applies")
    victim_temperature: float = param(3.0, doc="softmax temperature of the victim's prediction that is subtracted")

    def validate(self, where: str) -> None:
        for name in ("threshold", "mix_threshold"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ConfigError(f"{key_path(where, name)}: {value} must lie in [0, 1)")
        for value in self.warmup_thresholds:
            if not 0 <= value < 1:
                raise ConfigError(f"{key_path(where, 'warmup_thresholds')}: {value} must lie in [0, 1)")
        if not 0 < self.ema <= 1:
            raise ConfigError(f"{key_path(where, 'ema')}: {self.ema} must lie in (0, 1]")
        if self.victim_warmup_epochs < 1:
            raise ConfigError(f"{key_path(where, 'victim_warmup_epochs')}: {self.victim_warmup_epochs} must be >= 1")
        if self.victim_every < 1:
            raise ConfigError(f"{key_path(where, 'victim_every')}: {self.victim_every} must be >= 1")
        if not 0 <= self.semi_from <= self.late_from:
            raise ConfigError(f"{key_path(where, 'late_from')}: {self.late_from} must be >= semi_from "
                              f"({self.semi_from}) >= 0")
        for name in ("lambda_u", "lambda_u_late"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{key_path(where, name)}: {getattr(self, name)} must be >= 0")
        for name in ("mix_alpha", "victim_temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{key_path(where, name)}: {getattr(self, name)} must be > 0")


#: CPU budget (about 5 min on 2 cores with the quick CNN on the mini CIFAR-10): 30 beneficiary epochs (the paper's
#: 200), the semi-supervised phase and the later weight at the paper's proportions (1/2, 3/4); Adam 2e-3 on a cosine
#: schedule as the other quick recipes. The victim's warm-up is 5 epochs: one epoch of the mini set is 41 steps,
#: a tenth of one CIFAR-10 epoch, too few for the victim to learn a backdoor before it is asked about one.
QUICK_VAB = VaBParams(
    victim=TrainConfig(epochs=1, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=5e-4, crop=0, flip=False),
    victim_warmup_epochs=5,
    beneficiary=TrainConfig(epochs=30, batch_size=128, optimizer="adam", lr=2e-3, schedule="cosine", crop=4,
                            flip=True),
    semi_from=15, victim_every=3, late_from=23)


# -- the victim's split ----------------------------------------------------------------------------------------
@torch.no_grad()
def prediction_entropy(model: nn.Module, data: ImageSet, device: torch.device | str, precision: Precision,
                       batch_size: int = 1024) -> torch.Tensor:
    """-sum_k p_k log p_k of every sample's prediction (eval mode, no augmentation; fp64 on the CPU)."""
    out = []
    with eval_mode(model):
        for s in range(0, len(data), batch_size):
            with precision.autocast():
                logits = model(precision.batch(data.x[s:s + batch_size].to(device).float().div_(255.0)))
            p = torch.softmax(logits.float(), 1)
            out.append(-torch.special.xlogy(p, p).sum(1).double().cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def flag_suspects(entropy: torch.Tensor, previous: torch.Tensor | None, ema: float,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split from a new entropy measurement: the running average (``ema`` on the new one; the new one alone
    the first time), scaled to [0, 1] over the data (all 0 when every sample has the same), and the suspects:
    scaled entropy at most ``threshold``. Returns (suspects, running, scaled)."""
    running = entropy if previous is None else ema * entropy + (1.0 - ema) * previous
    low, high = running.min(), running.max()
    scaled = (running - low) / (high - low) if high > low else torch.zeros_like(running)
    return scaled <= threshold, running, scaled


def suppress(targets: torch.Tensor, victim_probs: torch.Tensor) -> torch.Tensor:
    """VaB's suppression: the targets minus the victim's (softened) prediction, clipped to [0, 1]: whatever the
    victim believes loses weight, most of all a backdoor target it is sure of."""
    return (targets - victim_probs).clamp(0.0, 1.0)


@torch.no_grad()
def victim_probabilities(victim: nn.Module, images: torch.Tensor, temperature: float,
                         precision: Precision) -> torch.Tensor:
    """softmax(victim(x) / T) of uint8 images, un-augmented, in eval mode (fp32)."""
    with eval_mode(victim), precision.autocast():
        logits = victim(precision.batch(images.float().div_(255.0)))
    return torch.softmax(logits.float() / temperature, 1)


def make_mixer(p: VaBParams) -> Mixer:
    return {"attention": AttentionMix(p.mix_threshold), "mixup": MixUp(p.mix_alpha),
            "cutmix": CutMix(p.mix_alpha), "none": no_mix}[p.mix]


def beneficiary_spec() -> SemiSpec:
    """The beneficiary's step: two views of each credible sample mixed by the mixer alone, two of each suspect
    unmixed with a hard pseudo-label and a cross-entropy loss."""
    return SemiSpec(temperature=0.0, views=2, labelled_views=2, mix_unlabelled=False, unlabelled_loss="ce")


#: the suspects' share of the data, for counting a run's cost before it runs (the victim's split is known only
#: then): the grids' default poison rate, which is what the victim flags when it works. It moves little of the
#: count: a suspect costs the beneficiary about what a credible sample does.
SUSPECT_SHARE = 0.1


def vab_passes(p: VaBParams, n: int) -> float:
    """Sample passes (``base.Defense.extra_passes``) of one run on ``n`` images, counted from its loops with
    ``SUSPECT_SHARE`` of them suspects. Victim: the warm-up on all samples, a round on the suspects per warm-up
    threshold, one every ``victim_every`` beneficiary epochs before ``semi_from`` and every epoch after; each
    round ends with a forward pass over all samples (the entropy). Beneficiary, every epoch: its views of the
    credible batches trained (AttentionMix adds a forward pass of them for the attention maps); from
    ``semi_from`` also the suspects' views guessed (forward) and trained, and the victim's prediction of every
    drawn sample (forward)."""
    spec, cfg = beneficiary_spec(), p.beneficiary
    suspects = round(SUSPECT_SHARE * n)
    iterations = math.ceil((n - suspects) / cfg.batch_size)
    credible = iterations * min(cfg.batch_size, n - suspects)  # what the sampler draws an epoch
    unlabelled = iterations * max(suspects // max(iterations, 1), 1)
    labelled = credible * spec.labelled_views * (1 + (FORWARD_PASS if p.mix == "attention" else 0.0))
    semi_extra = unlabelled * spec.views * (1 + FORWARD_PASS) + (credible + unlabelled) * FORWARD_PASS
    semi_epochs = max(0, cfg.epochs - p.semi_from)
    rounds = len(p.warmup_thresholds) + min(p.semi_from, cfg.epochs) // p.victim_every + semi_epochs
    victim_round = train_passes(p.victim, suspects)
    entropy = (1 + rounds) * n * FORWARD_PASS
    warmup = train_passes(replace(p.victim, epochs=p.victim_warmup_epochs), n)
    return cfg.epochs * labelled + semi_epochs * semi_extra + warmup + rounds * victim_round + entropy


# -- the defense -----------------------------------------------------------------------------------------------
@register_defense
class VaB(Defense):
    name = "vab"
    label = "VaB"
    description = ("VaB: a victim trained on its own suspects flags low-entropy samples; the beneficiary trains on "
                   "the rest with AttentionMix, then semi-supervised with the suspects' pseudo-labels suppressed")
    Params = VaBParams
    assumptions = (
        "Nothing is known about the trigger or the target, and no clean data is needed.",
        "A model trained briefly on the data predicts poisoned samples with lower entropy (more confidently) than "
        "clean ones, and training it further on its most confident samples sharpens that: what it flags holds "
        "most of the poison.",
        "The poison the victim misses is diluted by AttentionMix and its target label is suppressed where the "
        "victim predicts it.",
    )
    presets = {"paper": VaBParams(), "quick": QUICK_VAB}

    def extra_passes(self, n_train: int) -> float:
        """``vab_passes`` less one pass of every image per epoch of ``victim`` and ``beneficiary``, what the
        estimate counts for them."""
        p = self.params
        return vab_passes(p, n_train) - train_passes(p.victim, n_train) - train_passes(p.beneficiary, n_train)

    def run(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        p = self.params
        prec, dev = ctx.compute_precision(), ctx.device
        victim = ctx.fresh_model("vab-victim")
        ben = ctx.fresh_model("vab-beneficiary")
        for m in (victim, ben):
            prec.prepare(m.to(dev))
        ctx.note_trained(ben, p.beneficiary.epochs > 0)
        victim_opt = make_optimizer(victim, p.victim)
        ben_opt = make_optimizer(ben, p.beneficiary)
        path = ctx.checkpoint("vab")
        state = restore(path, ctx.resume)
        rounds: list[dict] = []
        victim_hist: list[dict] = []

        def victim_round(subset: torch.Tensor, epochs: int, thr: float, running: torch.Tensor | None):
            """One victim round on ``subset`` (bool), then a new split at ``thr``."""
            idx = len(rounds)
            hist = train(victim, data.subset(subset), replace(p.victim, epochs=epochs),
                         seed=derive_seed(ctx.seed, "vab", "victim", idx), device=dev, desc="vab victim",
                         precision=prec, optimizer=victim_opt)
            victim_hist.extend({"round": idx, **h} for h in hist)
            suspects, running, scaled = flag_suspects(prediction_entropy(victim, data, dev, prec), running, p.ema,
                                                      thr)
            rounds.append({"round": idx, "trained_on": int(subset.sum()), "threshold": thr,
                           "suspects": int(suspects.sum())})
            return suspects, running, scaled

        history: list[dict] = []
        if state is None:
            log.info("VaB 1/3: victim warm-up (%d epochs on all %d samples, then %d rounds on its suspects)",
                     p.victim_warmup_epochs, len(data), len(p.warmup_thresholds))
            thresholds = [*p.warmup_thresholds, p.threshold]
            suspects, running, scaled = victim_round(torch.ones(len(data), dtype=torch.bool),
                                                     p.victim_warmup_epochs, thresholds[0], None)
            for thr in thresholds[1:]:
                suspects, running, scaled = victim_round(suspects, p.victim.epochs, thr, running)
            initial, start = suspects.clone(), 0
            _save(path, 0, victim, victim_opt, ben, ben_opt, suspects, running, scaled, initial, rounds,
                  victim_hist, history)
        else:
            victim.load_state_dict(state["victim"])
            victim_opt.load_state_dict(state["victim_opt"])
            ben.load_state_dict(state["beneficiary"])
            ben_opt.load_state_dict(state["beneficiary_opt"])
            suspects, running, scaled, initial = state["suspects"], state["running"], state["scaled"], state["initial"]
            rounds, victim_hist = list(state["rounds"]), list(state["victim_history"])
            history, start = list(state["history"]), int(state["epoch"])
        log.info("VaB 2/3: beneficiary on %d credible samples (%d suspects), AttentionMix, %d epochs; "
                 "3/3 semi-supervised suppression after epoch %d", int((~suspects).sum()), int(suspects.sum()),
                 p.beneficiary.epochs, p.semi_from)
        cfg, mixer = p.beneficiary, make_mixer(p)
        stream = derive_seed(ctx.seed, "vab", "beneficiary")
        spec = beneficiary_spec()
        for epoch in range(start, cfg.epochs):
            semi = epoch >= p.semi_from
            credible = ~suspects
            iterations = math.ceil(int(credible.sum()) / cfg.batch_size)
            weight = p.lambda_u if epoch < p.late_from else p.lambda_u_late

            def adjust(tl, tu, li, ui):
                tl = suppress(tl, victim_probabilities(victim, data.x[li].to(dev), p.victim_temperature, prec))
                if tu is not None:
                    tu = suppress(tu, victim_probabilities(victim, data.x[ui].to(dev), p.victim_temperature, prec))
                return tl, tu

            for g in ben_opt.param_groups:
                g["lr"] = cfg.lr_at(epoch)
            stats = semisup_epoch(
                ben, ben_opt, data, credible, spec, epoch=epoch, iterations=iterations,
                batch_size=cfg.batch_size, crop=cfg.crop, flip=cfg.flip, mixer=mixer,
                weight_u=lambda _progress, w=weight: w, generator=epoch_generator(stream, epoch), precision=prec,
                device=dev, unlabelled=suspects if semi else torch.zeros_like(suspects),
                unlabelled_batch=max(int(suspects.sum()) // iterations, 1), adjust=adjust if semi else None)
            history.append({"epoch": epoch + 1, "semi": semi, "credible": int(credible.sum()),
                            "lr": cfg.lr_at(epoch), **stats})
            if (epoch + 1) % p.victim_every == 0 or semi:
                suspects, running, scaled = victim_round(suspects, p.victim.epochs, p.threshold, running)
            log.debug("vab epoch %d: %s", epoch + 1, history[-1])
            _save(path, epoch + 1, victim, victim_opt, ben, ben_opt, suspects, running, scaled, initial, rounds,
                  victim_hist, history)
        ben.eval()
        kept = ~suspects
        info = {"threshold": p.threshold, "suspects": int(suspects.sum()), "credible": int(kept.sum()),
                "suspects_initial": int(initial.sum()), "victim_rounds": len(rounds), "mix": p.mix}
        return DefenseResult(ben, kept=kept, scores=scaled.clone(), score_name="victim_entropy_scaled",
                             higher_is_suspicious=False, info=info,
                             history={"beneficiary": history, "victim": victim_hist, "splits": rounds},
                             sample_stats={"suspect_initial": initial, "victim_entropy": running})


def _save(path, epoch, victim, victim_opt, ben, ben_opt, suspects, running, scaled, initial, rounds, victim_hist,
          history) -> None:
    if path is None:
        return
    save_checkpoint(path, {"epoch": epoch, "victim": victim.state_dict(), "victim_opt": victim_opt.state_dict(),
                           "beneficiary": ben.state_dict(), "beneficiary_opt": ben_opt.state_dict(),
                           "suspects": suspects, "running": running, "scaled": scaled, "initial": initial,
                           "rounds": rounds, "victim_history": victim_hist, "history": history})
