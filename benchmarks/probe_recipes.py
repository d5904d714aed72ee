"""Probes behind two quick-preset choices, on BadNets-poisoned mini CIFAR-10 (10 %, target 0, seed 0).

    python benchmarks/probe_recipes.py at sgd05,sgd01,adam [--epochs 20]
        quick adversarial training (PGD-2, eps 8/255) with SGD lr 0.05 / 0.01 or Adam 1e-3, cosine schedule:
        test ACC, ASR and the per-epoch loss (SGD 0.05 diverges and collapses to one class).
    python benchmarks/probe_recipes.py naive crop4_40,flip40,noaug12,crop4_50step
        A-ABL's naive stage with other augmentation/length, then its split (iFGSM 2/255 x 5, SCE, Otsu):
        ACC, ASR, gamma, rho_vul, TPR, FPR of each recipe.
"""

from __future__ import annotations

import argparse
import time

import torch

import antibackdoor as ab
from antibackdoor.adversarial import PGDConfig
from antibackdoor.defenses import DefenseContext, get_defense
from antibackdoor.defenses.stages import otsu_threshold, train_stage
from antibackdoor.metrics import accuracy, attack_success_rate, split_metrics
from antibackdoor.training import TrainConfig


def at_recipes(epochs: int) -> dict[str, TrainConfig]:
    adv = PGDConfig(eps=8 / 255, step=4 / 255, steps=2)
    return {
        "sgd05": TrainConfig(epochs=epochs, optimizer="sgd", lr=0.05, schedule="cosine", adversary=adv),
        "sgd01": TrainConfig(epochs=epochs, optimizer="sgd", lr=0.01, schedule="cosine", adversary=adv),
        "adam": TrainConfig(epochs=epochs, optimizer="adam", lr=1e-3, schedule="cosine", adversary=adv),
    }


NAIVE = {
    "crop4_40": TrainConfig(epochs=40, optimizer="adam", lr=1e-3, crop=4, flip=False),  # the quick default
    "flip40": TrainConfig(epochs=40, optimizer="adam", lr=1e-3, crop=0, flip=True),
    "noaug12": TrainConfig(epochs=12, optimizer="adam", lr=1e-3, crop=0, flip=False),
    "crop4_50step": TrainConfig(epochs=50, optimizer="adam", lr=1e-3, crop=4, flip=False, schedule="step",
                                milestones=(40,)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=["at", "naive"])
    p.add_argument("recipes", help="comma-separated recipe names (see the module docstring)")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the 'at' recipes")
    p.add_argument("--attack", default="badnets")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    splits = ab.load_dataset("cifar10-mini")
    attack = ab.get_attack(a.attack)
    ps = attack.poison(splits.train, 0.1, 0, ab.seeded(0))
    table = at_recipes(a.epochs) if a.probe == "at" else NAIVE
    for name in a.recipes.split(","):
        if name not in table:
            p.error(f"unknown recipe {name!r}; known: {', '.join(table)}")
        ctx = DefenseContext(ab.model_factory("cnn", splits.train), seed=0)
        t = time.time()
        # the streams of the stage the recipe stands for: A-ABL's naive stage (offset 0) or stage 3 (offset 1)
        model, hist = train_stage(ctx, ps.data, table[name], name, seed_offset=1 if a.probe == "at" else 0)
        acc = accuracy(model, splits.test)
        asr = attack_success_rate(model, attack.triggered_test(splits.test, 0))
        line = f"{name}: {time.time() - t:.0f} s, ACC {acc:.3f}, ASR {asr:.3f}"
        if a.probe == "at":
            line += ", (epoch, loss, train acc): " + str([(e["epoch"], round(e["loss"], 2),
                                                           round(e["train_acc"], 3)) for e in hist])
        else:
            scores = get_defense("a-abl", "quick").split_scores(model, ps.data, ctx)
            m = split_metrics(scores > otsu_threshold(scores), ps.poison_mask)
            line += (f", gamma {m['gamma']:.3f}, rho_vul {m['rho_vul']:.4f}, TPR {m['tpr']:.3f}, "
                     f"FPR {m['fpr']:.3f}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
