"""The papers' baselines (ABL, NAD, CBD, D-BR, D-ST) next to none, adv-train, A-ABL and AIBD, quick preset.

    python benchmarks/bench_baselines.py [--attacks badnets,blend,none] [--targets 0,3,7]
        [--defenses abl,nad,cbd,d-br,d-st,none,adv-train,a-abl,aibd] [--out runs/bench] [--seed 0]
        [--threads 2] [--table benchmarks/results/baselines_quick.md] [--append]

Every cell is an ordinary ``run_experiment`` call (mini CIFAR-10, model cnn, 10 % poisoning; a finished run
directory is reused). Variants: ``nad-ft`` is NAD with all betas 0 (fine-tuning on the trusted set only),
``cbd-nomi`` CBD without the MI term (the official code's default), ``abl-sample`` ABL with the bound on each
sample's loss. Prints and writes a Markdown table of ACC, ASR, RA, isolation TPR/FPR (where the defense
isolates) and wall time (defense + evaluation). ``own-patch`` and ``own-blend`` as attacks are triggers written
into the data outside the tool (``own_triggers.py``): the cell runs with ``--attack none`` on that npz and the
script computes TPR, FPR and ASR from the ground truth it kept.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from own_triggers import OWN, evaluate, write_own

from antibackdoor.experiment import make_config, run_experiment

VARIANTS = {
    "nad-ft": ("nad", {"betas": [0.0, 0.0, 0.0]}),
    "cbd-nomi": ("cbd", {"mi": False}),
    "abl-sample": ("abl", {"per_sample": True}),
}
ISOLATING = {"abl", "abl-sample", "d-br", "d-st", "a-abl", "a-abl+", "aibd"}
HEADER = ["| attack | target | defense | ACC | ASR | RA | TPR | FPR | isolated (poison) | time (s) |",
          "|---|---|---|---|---|---|---|---|---|---|"]


def pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def row(attack: str, target: int, defense: str, m: dict) -> str:
    iso = defense in ISOLATING
    tpr = pct(m["tpr"]) if iso and attack != "none" else "–"
    fpr = pct(m["fpr"]) if iso else "–"
    isolated = f"{m['isolated']} ({m['isolated_poison']})" if iso else "–"
    purged = (m.get("sample_flags") or {}).get("purged")
    if purged is not None:  # a-abl+: kept samples dropped after the split (of them poisoned)
        isolated += f"; purged {purged['samples']} ({purged['poison']})"
    return (f"| {attack} | {target} | {defense} | {pct(m['acc'])} | {pct(m['asr'])} | {pct(m['ra'])} | {tpr} | "
            f"{fpr} | {isolated} | {m['time_total_s']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attacks", default="badnets,blend,none")
    p.add_argument("--targets", default="0,3,7")
    p.add_argument("--defenses", default="abl,nad,cbd,d-br,d-st,none,adv-train,a-abl,aibd")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table", default="benchmarks/results/baselines_quick.md")
    p.add_argument("--append", action="store_true", help="add the rows to an existing table")
    p.add_argument("--force", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    table = Path(a.table)
    lines = table.read_text().splitlines() if a.append and table.exists() else list(HEADER)
    for target in (int(t) for t in a.targets.split(",")):
        for attack in a.attacks.split(","):
            # an outside trigger's data and ground truth: written (and its triggered test set built) once per attack
            own = write_own("cifar10-mini", attack, target, 0.1, a.seed, Path(a.out)) if attack in OWN else None
            for spec in a.defenses.split(","):
                defense, params = VARIANTS.get(spec, (spec, {}))
                cell = {"attack": attack, "defense": defense, "defense_params": params, "out": a.out,
                        "seed": a.seed, "target": target}
                if own is not None:
                    cell = {**cell, "attack": "none", "dataset": own.dataset}
                r = run_experiment(make_config(cell), force=a.force)
                lines.append(row(attack, target, spec, r.metrics if own is None else evaluate(r.run_dir, own)))
                print(lines[-1], f"({r.run_dir})", flush=True)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(text)


if __name__ == "__main__":
    main()
