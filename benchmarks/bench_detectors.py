"""Isolation detectors side by side (AIBD Table 2 and A-ABL Table 5 layouts) on the bundled mini CIFAR-10.

    python benchmarks/bench_detectors.py [--attacks badnets,blend,sig,iab,trojan,clb,ssba,wanet]
        [--detectors all] [--target 0] [--seed 0] [--poison-rate 0.1] [--out runs/detectors] [--threads 2]

Attacks ``own-patch`` and ``own-blend`` are triggers written into the data before the tool sees it (the data set
``outside:TRIGGER?target=T``, docs/datasets.md).
One suspect model per attack (the quick recipe shared by the model-based detectors: A-ABL's naive stage) is
trained once and scored by every detector, so the detectors differ only in how they score. Writes, under
--out: per attack the suspect model and every detector's scores (scores_<attack>.npz, reused by later runs),
and the tables detectors_t<target>.md (TPR/FPR/AUC, AIBD Table 2 layout; gamma/rho_vul of the augmentation
splits next to iFGSM, A-ABL Table 5 layout) plus roc_t<target>.png (one ROC panel per attack).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _common import pct

import antibackdoor as ab
from antibackdoor.data.outside import TRIGGERS
from antibackdoor.detectors import DETECTORS, DetectionResult, detection_metrics, get_detector
from antibackdoor.metrics import roc_curve_points
from antibackdoor.precision import resolve_precision, use_precision
from antibackdoor.stages import DefenseContext, train_stage
from antibackdoor.stages.recipes import QUICK_SUSPECT

TABLE2 = ("badnets", "blend", "sig", "iab", "trojan")
TABLE5 = ("badnets", "trojan", "clb", "iab", "blend", "ssba", "wanet")
AUG = ("randaugment-sce", "autoaugment-sce", "augmix-sce", "ifgsm-sce")


def suspect_model(data, ctx: DefenseContext, path: Path, cfg):
    """Train (or load) the shared suspect model."""
    from safetensors.torch import load_file, save_file

    model = ctx.fresh_model()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), 0.0
    t0 = time.time()
    model, _ = train_stage(ctx, data, cfg, "naive")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval(), time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attacks", default=",".join(dict.fromkeys(TABLE2 + TABLE5)))
    p.add_argument("--detectors", default="all", help="comma-separated names, all, or none (tables only)")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--poison-rate", type=float, default=0.1)
    p.add_argument("--model", default="cnn")
    p.add_argument("--out", default="runs/detectors")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=None, help="suspect-model epochs (default: the quick recipe's)")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (see antibackdoor doctor)")
    a = p.parse_args()
    prec = resolve_precision(a.precision, "cpu")
    print(f"precision: {prec.describe()}", flush=True)
    cfg = QUICK_SUSPECT if a.epochs is None else replace(QUICK_SUSPECT, epochs=a.epochs)
    torch.set_num_threads(a.threads)
    # "none": score nothing, only rebuild the tables from the scores saved by earlier runs
    special = {"all": sorted(DETECTORS), "none": []}
    detectors = special[a.detectors] if a.detectors in special else a.detectors.split(",")
    attacks = a.attacks.split(",")
    out = Path(a.out)
    splits = ab.load_dataset("cifar10-mini")
    results: dict[str, dict[str, dict]] = {}
    curves: dict[str, dict] = {}
    for attack_name in attacks:
        key = f"{attack_name}-t{a.target}-s{a.seed}"
        work = out / key
        work.mkdir(parents=True, exist_ok=True)
        if attack_name in TRIGGERS:  # a trigger written into the data before the tool sees it (outside:)
            own = ab.load_dataset(f"outside:{attack_name}?target={a.target},rate={a.poison_rate},seed={a.seed}")
            data, mask, triggered = own.train, own.truth.poison_mask, own.truth.triggered_test
        else:
            attack = ab.get_attack(attack_name)
            with use_precision(prec):  # the attack's own networks (IAB, SSBA, CLB, Trojan) too
                poisoned = attack.poison(splits.train, a.poison_rate, a.target, ab.seeded(a.seed))
            data, mask = poisoned.data, poisoned.poison_mask
            triggered = attack.triggered_test(splits.test, a.target)
        ctx = DefenseContext(ab.model_factory(a.model, data), seed=a.seed, workdir=work / "checkpoints", resume=True,
                             precision=prec)
        model, t_model = suspect_model(data, ctx, work / "suspect.safetensors", cfg)
        acc = ab.accuracy(model, splits.test)
        asr = ab.attack_success_rate(model, triggered)
        print(f"[{attack_name}] suspect model: ACC {100 * acc:.1f} ASR {100 * asr:.1f} ({t_model:.0f} s)", flush=True)
        cache = work / "scores.npz"
        saved = dict(np.load(cache)) if cache.exists() else {}
        results[attack_name] = {"_model": {"acc": acc, "asr": asr, "time_s": t_model}}
        curves[attack_name] = {}
        for name in detectors:
            det = get_detector(name, "quick")
            t0 = time.time()
            r = det.score(data, ctx, model=model)
            dt = time.time() - t0
            m = detection_metrics(r, mask)
            m["time_s"] = dt
            results[attack_name][name] = m
            saved[f"{name}/scores"] = r.scores.numpy()
            saved[f"{name}/isolated"] = r.isolated.numpy()
            saved[f"{name}/time"] = np.array(dt)
            fpr, tpr = roc_curve_points(r.suspicion(), mask)
            curves[attack_name][name] = (fpr, tpr, m["auc"])
            print(f"  {name:<22} TPR {pct(m['tpr']):>5} FPR {pct(m['fpr']):>5} AUC {m['auc']:.3f} "
                  f"gamma {pct(m['gamma']):>5} rho_vul {pct(m['rho_vul']):>5} ({dt:.1f} s)", flush=True)
        saved["poison_mask"] = mask.numpy()
        np.savez_compressed(cache, **saved)
        # the tables also show the detectors scored on this suspect model by earlier runs
        for name in sorted({k.split("/")[0] for k in saved if k.endswith("/scores")} - set(detectors)):
            if name not in DETECTORS:
                continue
            r = DetectionResult(torch.from_numpy(saved[f"{name}/scores"]), DETECTORS[name].higher_is_suspicious,
                                torch.from_numpy(saved[f"{name}/isolated"]))
            m = detection_metrics(r, mask)
            m["time_s"] = float(saved.get(f"{name}/time", np.nan))
            results[attack_name][name] = m
            fpr, tpr = roc_curve_points(r.suspicion(), mask)
            curves[attack_name][name] = (fpr, tpr, m["auc"])
    shown = sorted({d for att in attacks for d in results[att] if d != "_model"})
    write_tables(results, curves, shown, attacks, out, a)


def write_tables(results, curves, detectors, attacks, out: Path, a) -> None:
    lines = [f"Detectors on mini CIFAR-10, quick suspect model ({a.model}), {100 * a.poison_rate:g} % poisoned, "
             f"target {a.target}, seed {a.seed}. TPR / FPR of each detector's own rule, ROC AUC of its scores (%).",
             "", "Command: `python benchmarks/" + " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]) + "`",
             "", "| attack | suspect ACC / ASR | " + " | ".join(detectors) + " |",
             "|---|---|" + "---|" * len(detectors)]
    for att in attacks:
        r = results[att]
        cells = [f"{pct(r[d]['tpr'])} / {pct(r[d]['fpr'])} ({pct(r[d]['auc'])})" if d in r else "-"
                 for d in detectors]
        lines.append(f"| {att} | {pct(r['_model']['acc'])} / {pct(r['_model']['asr'])} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: TPR / FPR (AUC).", "", "Table 5 layout: kept share gamma / poison share of the kept set "
              "rho_vul (%).", "", "| attack | " + " | ".join(d for d in AUG if d in detectors) + " |",
              "|---|" + "---|" * len([d for d in AUG if d in detectors])]
    for att in attacks:
        r = results[att]
        lines.append(f"| {att} | " + " | ".join(f"{pct(r[d]['gamma'])} / {pct(r[d]['rho_vul'])}" if d in r else "-"
                                                  for d in AUG if d in detectors) + " |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    (out / f"detectors_t{a.target}.md").write_text(table)
    (out / f"detectors_t{a.target}.json").write_text(json.dumps(results, indent=1, default=float))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(attacks))
    rows = -(-len(attacks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.8 * rows), dpi=110, squeeze=False)
    for ax, att in zip(axes.flat, attacks, strict=False):
        for d, (fpr, tpr, auc) in curves[att].items():
            ax.plot(fpr, tpr, linewidth=1.1, label=f"{d} {auc:.2f}")
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
        ax.set_title(att, fontsize=9)
        ax.set_xlabel("FPR", fontsize=8)
        ax.set_ylabel("TPR", fontsize=8)
        ax.legend(fontsize=5.5, loc="lower right")
    for ax in list(axes.flat)[len(attacks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / f"roc_t{a.target}.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
