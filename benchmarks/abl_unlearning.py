"""ABL's unlearning step, epoch by epoch: where the quick preset's model loses its clean accuracy.

    python benchmarks/abl_unlearning.py --attack blend --target 0 [--variants asis,poison,clean,lr=1e-4,epochs=20]

Runs ABL's stages 1-3 (isolation, scoring, fine-tuning) once with the quick preset, exactly as ``antibackdoor run
--defense abl --preset quick`` does at seed 0, then each variant of stage 4 from a copy of that fine-tuned model,
and prints one JSON line per variant with the test ACC, ASR, the accuracy on the unlearned samples and the share of
the test set given to the most predicted class after every unlearning epoch. A variant is ``+``-joined parts:
``asis`` (the preset), ``poison`` / ``clean`` (unlearn only the isolated samples that are / are not poisoned, with
batches that keep the preset's steps per epoch), ``lr=X``, ``epochs=N``, ``batch=N``. docs/baselines.md ("ABL on
Blend") has the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import replace

import torch

from antibackdoor.experiment import Experiment, ExperimentConfig, PoisonedRun
from antibackdoor.metrics import accuracy, predict
from antibackdoor.models.registry import build_model
from antibackdoor.precision import use_precision
from antibackdoor.seeding import derive_seed
from antibackdoor.stages import DefenseContext, train_stage
from antibackdoor.stages.abl import QUICK_ABL, abl_isolate
from antibackdoor.training import train


def unlearn_curve(model, data, cfg, seed, device, prec, desc, measure) -> list[dict]:
    """Stage 4 (gradient ascent on ``data``) with ``measure(model, data)`` after every epoch."""
    rows: list[dict] = []
    history = train(model, data, cfg, seed=seed, device=device, desc=desc, sample_weight=-torch.ones(len(data)),
                    precision=prec, on_epoch_end=lambda e, m: rows.append(measure(m, data)) or None)
    for row, h in zip(rows, history, strict=True):
        row["unlearned_loss"] = round(h["loss"], 3)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", default="blend")
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--poison-rate", type=float, default=0.1)
    ap.add_argument("--dataset", default="cifar10-mini")
    ap.add_argument("--variants", default="asis,poison,clean")
    args = ap.parse_args()

    cfg = ExperimentConfig(dataset=args.dataset, attack=args.attack, defense="abl", target=args.target,
                           poison_rate=args.poison_rate)
    exp = Experiment(cfg)
    resolved = exp.resolve()
    job = PoisonedRun(exp, resolved)
    dev, prec = resolved.device, resolved.precision
    with use_precision(prec):
        inp = job.inputs()
        data = inp.train

        def factory():
            return build_model(inp.model, data.num_classes, data.channels, data.image_size, data.mean, data.std)

        ctx = DefenseContext(factory, device=dev, seed=cfg.seed, precision=prec)
        p = QUICK_ABL
        model, _, isolated, _ = abl_isolate(data, ctx, p)
        train_stage(ctx, data.subset(~isolated), p.finetune, "finetune", model=model, seed_offset=1)
        poisoned = inp.poison_mask.to(isolated.device)[isolated]
        iso = data.subset(isolated)

        def measure(m, unlearned) -> dict:
            pred = predict(m, inp.test, dev, precision=prec)
            row = {"acc": accuracy(m, inp.test, dev, prec), "unlearned_acc": accuracy(m, unlearned, dev, prec),
                   "top_class_share": float(torch.bincount(pred).max()) / len(inp.test)}
            if inp.triggered is not None:
                row["asr"] = accuracy(m, inp.triggered, dev, prec)
            return {k: round(100 * v, 1) for k, v in row.items()}

        print(json.dumps({"attack": args.attack, "target": args.target, "isolated": int(isolated.sum()),
                          "isolated_poison": int(poisoned.sum()),
                          "isolated_labels": torch.bincount(iso.y.cpu(), minlength=data.num_classes).tolist(),
                          "finetuned": measure(model, iso)}), flush=True)
        for variant in args.variants.split(","):
            ucfg, subset = p.unlearn, None
            for part in variant.split("+"):
                key, _, value = part.partition("=")
                if key in ("poison", "clean"):
                    subset = poisoned if key == "poison" else ~poisoned
                elif key == "lr":
                    ucfg = replace(ucfg, lr=float(value))
                elif key == "epochs":
                    ucfg = replace(ucfg, epochs=int(value))
                elif key == "batch":
                    ucfg = replace(ucfg, batch_size=int(value))
                elif key != "asis":
                    ap.error(f"--variants: unknown part {part!r}")
            target_set = iso if subset is None else iso.subset(subset)
            if subset is not None and "batch" not in variant:  # the preset's steps per epoch on fewer samples
                steps = math.ceil(len(iso) / ucfg.batch_size)
                ucfg = replace(ucfg, batch_size=max(2, math.ceil(len(target_set) / steps)))
            rows = unlearn_curve(copy.deepcopy(model), target_set, ucfg, derive_seed(cfg.seed, "train", 2),
                                 dev, prec, variant, measure)
            print(json.dumps({"variant": variant, "samples": len(target_set), "batch": ucfg.batch_size,
                              "epochs": rows}), flush=True)


if __name__ == "__main__":
    main()
