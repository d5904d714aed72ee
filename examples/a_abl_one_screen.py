"""A-ABL in one screen: adversarially robust anti-backdoor learning on the bundled mini CIFAR-10.

A-ABL learns a clean, adversarially robust classifier from training data that may hold a backdoor, in three stages:

1. Naive training on all the data. A normally trained model learns a strong trigger (a patch) so firmly that a
   small perturbation cannot move a poisoned image off the label it was given (the attacker's target).
2. The split. Every training image is attacked with iFGSM (eps 2/255, 5 steps of eps/5, no random start) on the
   naive model and scored by the symmetric cross-entropy (SCE) of its adversarial example. Clean images lie near
   the decision boundary: the attack flips them and their loss is high. Images with a strong trigger keep their
   label: low loss. Otsu's threshold cuts the scores in two; the low side (adversarially robust) is isolated, the
   high side (vulnerable) is kept.
3. PGD adversarial training from scratch on the kept images only. Stealthy triggers (blending, warping) pass the
   split, but they are fragile: a model trained against 8/255 perturbations does not learn them.

This is the ``a-abl`` defense's ``quick`` preset written out with the library's primitives: data, attacks, models,
the one training loop (``antibackdoor.training.train``) and the one PGD engine (``antibackdoor.adversarial.pgd``).
It draws the same random streams as ``antibackdoor run``: the poison from the seed itself, each stage's initial
weights from ``derive_seed(seed, "model", stage)`` and its batch order and augmentation from
``derive_seed(seed, "train", stage)`` (stage 0: naive, 1: final). So with the same seed and precision it keeps
exactly the samples the defense keeps (tests/test_example.py checks it). What the defense adds: checkpoints and
resume, the run directory, and options that are off in ``quick`` (the ``paper`` preset's ``min_isolated`` floor,
``split_log``, ``purge``, take back: docs/a-abl.md).

    python examples/a_abl_one_screen.py                    # as long as `antibackdoor run` (minutes on a CPU)
    python examples/a_abl_one_screen.py --epochs 0.2 --attack blend --target 3 --out result.json
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace

import torch
from torch import nn

import antibackdoor as ab
from antibackdoor.adversarial.pgd import PGDConfig, pgd_statistics
from antibackdoor.data.imageset import ImageSet
from antibackdoor.metrics import accuracy, attack_success_rate, robust_accuracy, split_metrics
from antibackdoor.precision import Precision, resolve_precision, use_precision
from antibackdoor.seeding import derive_seed, seeded_rng
from antibackdoor.stages.recipes import QUICK_AT, QUICK_NAIVE
from antibackdoor.stages.select import otsu_threshold
from antibackdoor.training import TrainConfig, train

log = logging.getLogger("antibackdoor")

SPLIT_EPS, SPLIT_STEPS = 2 / 255, 5  # stage 2's iFGSM, the paper's (1/255 on 64x64 images)


def stage_configs(scale: float = 1.0) -> tuple[TrainConfig, TrainConfig]:
    """Stage 1 and stage 3 of the quick preset (stages/recipes.py), their epochs scaled by ``scale``.

    Stage 1: 25 epochs of Adam at 2e-3 with a cosine decay, random crop without flip (a flip moves a corner patch
    to the other corner). Stage 3: 20 epochs of Adam at 1e-3, cosine, crop and flip, against PGD-2 (eps 8/255,
    step 4/255); the paper's 100 epochs of SGD against PGD-10 are the ``paper`` preset (a GPU's work).
    """
    return tuple(replace(c, epochs=max(1, round(c.epochs * scale))) for c in (QUICK_NAIVE, QUICK_AT))


def fresh_model(name: str, like: ImageSet, seed: int, stage: int, device: torch.device) -> nn.Module:
    """A newly initialised model, its weights drawn from the stream ``(seed, "model", stage)``."""
    with seeded_rng(seed, "model", stage):  # leaves torch's global random state as it was
        model = ab.build_model(name, like.num_classes, like.channels, like.image_size, like.mean, like.std)
    return model.to(device)


def stage1_naive(data: ImageSet, cfg: TrainConfig, model_name: str, seed: int, device: torch.device,
                 precision: Precision) -> nn.Module:
    """Plain cross-entropy training on everything, poison included: the model learns the backdoor."""
    model = fresh_model(model_name, data, seed, 0, device)
    train(model, data, cfg, seed=derive_seed(seed, "train", 0), device=device, desc="naive", precision=precision)
    return model


def stage2_split(model: nn.Module, data: ImageSet, device: torch.device,
                 precision: Precision) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The SCE loss of every sample's iFGSM example, and which samples lie above Otsu's threshold (kept)."""
    ifgsm = PGDConfig.ifgsm(SPLIT_EPS, SPLIT_STEPS, loss="sce")  # PGD with step eps/steps and no random start
    # whole batches in eval mode (BatchNorm's running statistics: a score does not depend on its batch-mates);
    # the losses come back as float32 on the CPU
    scores = pgd_statistics(model, data.x, data.y, ifgsm, device=device, precision=precision).loss
    threshold = otsu_threshold(scores)  # scikit-image's Otsu (1024 bins), moved to the middle of the gap
    kept = scores > threshold  # high loss = vulnerable = kept; low loss = robust = isolated
    if not kept.any():  # all scores equal: train on everything rather than on nothing
        log.warning("split: Otsu's threshold isolates every sample; keeping all %d", len(kept))
        kept = torch.ones_like(kept)
    return kept, scores, threshold


def stage3_adversarial(data: ImageSet, kept: torch.Tensor, cfg: TrainConfig, model_name: str, seed: int,
                       device: torch.device, precision: Precision) -> nn.Module:
    """PGD adversarial training of a fresh model on the kept samples only."""
    model = fresh_model(model_name, data, seed, 1, device)
    train(model, data.subset(kept), cfg, seed=derive_seed(seed, "train", 1), device=device, desc="adv_train",
          precision=precision)
    return model


def a_abl(data: ImageSet, naive: TrainConfig, final: TrainConfig, model_name: str, seed: int,
          device: torch.device, precision: Precision) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    """The three stages: the final model, the kept mask, the split scores and the threshold."""
    log.info("stage 1/3: naive training on all %d samples", len(data))
    model = stage1_naive(data, naive, model_name, seed, device, precision)
    log.info("stage 2/3: iFGSM split (eps %.4g, %d steps, SCE)", SPLIT_EPS, SPLIT_STEPS)
    kept, scores, threshold = stage2_split(model, data, device, precision)
    log.info("split: threshold %.4g; kept %d vulnerable, isolated %d robust samples", threshold, int(kept.sum()),
             int((~kept).sum()))
    log.info("stage 3/3: PGD adversarial training on the %d kept samples", int(kept.sum()))
    final_model = stage3_adversarial(data, kept, final, model_name, seed, device, precision)
    return final_model, kept, scores, threshold


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="A-ABL's three stages on the bundled mini CIFAR-10.")
    parser.add_argument("--epochs", type=float, default=1.0, help="scale of both stages' epochs (default 1: quick)")
    parser.add_argument("--attack", default="badnets", choices=sorted(ab.ATTACKS), help="the poisoning attack")
    parser.add_argument("--rate", type=float, default=0.1, help="poison rate (default 0.1)")
    parser.add_argument("--target", type=int, default=0, help="the attack's target class (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of every random stream (default 0)")
    parser.add_argument("--model", default="cnn", choices=sorted(ab.MODELS), help="architecture (default cnn)")
    parser.add_argument("--limit", type=int, default=0, help="use the first N training and test images (0: all)")
    parser.add_argument("--out", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[a-abl] %(message)s")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision("auto", device)  # bf16 where the hardware runs it natively, else fp32
    splits = ab.load_dataset("cifar10-mini")
    train_set, test_set = splits.train.to(device), splits.test.to(device)
    if args.limit:
        train_set, test_set = (s.subset(torch.arange(min(args.limit, len(s)))) for s in (train_set, test_set))
    attack = ab.get_attack(args.attack)  # the attack's quick preset
    with use_precision(precision):  # attacks that train a network of their own compute in it too
        try:
            poisoned = attack.poison(train_set, args.rate, args.target, ab.seeded(args.seed))
        except ab.AntibackdoorError as exc:
            parser.error(str(exc))
        log.info("%s: %d of %d training images poisoned towards class %d (precision %s)", args.attack,
                 poisoned.num_poison, len(train_set), args.target, precision.name)
        model, kept, _, threshold = a_abl(poisoned.data, *stage_configs(args.epochs), args.model, args.seed, device,
                                          precision)
        triggered = attack.triggered_test(test_set, args.target)
        results = {"acc": accuracy(model, test_set, device, precision),
                   "asr": attack_success_rate(model, triggered, device, precision),
                   "ra": robust_accuracy(model, test_set, device=device, seed=args.seed, precision=precision),
                   "threshold": threshold, **split_metrics(kept, poisoned.poison_mask)}
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "precision": precision.name, **results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
