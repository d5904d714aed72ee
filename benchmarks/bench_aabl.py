"""The A-ABL quick-preset benchmark on the bundled mini CIFAR-10: attacks x defenses, one table.

    python benchmarks/bench_aabl.py [--attacks badnets,blend] [--defenses none,adv-train,a-abl]
                                    [--out runs/bench] [--seed 0] [--threads 2]

Each cell is an ordinary run directory (reused when it already exists). Prints a Markdown table of ACC, ASR,
RA, gamma, rho_vul, TPR, FPR and wall time per run, and writes it to OUT/aabl_quick.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from antibackdoor.experiment import make_config, run_experiment


def pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attacks", default="badnets,blend")
    p.add_argument("--defenses", default="none,adv-train,a-abl")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lines = ["| attack | defense | ACC | ASR | RA | gamma | rho_vul | TPR | FPR | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for attack in a.attacks.split(","):
        for defense in a.defenses.split(","):
            cfg = make_config({"attack": attack, "defense": defense, "out": a.out, "seed": a.seed})
            r = run_experiment(cfg, force=a.force)
            m = r.metrics
            lines.append(f"| {attack} | {defense} | {pct(m['acc'])} | {pct(m['asr'])} | {pct(m['ra'])} | "
                         f"{pct(m['gamma'])} | {pct(m['rho_vul'])} | {pct(m['tpr'])} | {pct(m['fpr'])} | "
                         f"{m['time_total_s']:.0f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aabl_quick.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
