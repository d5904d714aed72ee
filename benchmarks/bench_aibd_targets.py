"""AIBD beyond target 0 (issue 18): attack x target table of the target guess, its confidence, and TPR, FPR,
ASR, ACC under AIBD's default (quick) settings.

    python benchmarks/bench_aibd_targets.py [--dataset cifar10-mini | npz:/path/gtsrb250.npz]
        [--attacks badnets,blend,wanet,trojan,own-patch,own-blend] [--targets 0,3,7] [--rate 0.1]
        [--preset quick] [--seed 0] [--out runs/aibd-targets] [--threads 2] [--force] [--dry-run]
        [--defense-param KEY=VALUE ...]

Every cell is an ordinary ``antibackdoor run`` directory (reused when it already exists).

- Built-in attacks (badnets, blend, wanet, trojan) run as ``--attack NAME --target T``; the runner measures
  ACC, ASR, TPR and FPR itself.
- ``own-patch`` and ``own-blend`` are triggers no attack module implements, written into the data outside the
  tool and run with ``--attack none`` (``own_triggers.py``, which also computes their TPR, FPR and ASR).

Columns: the guessed target (``-`` when no class had a significant surplus, then the filter declines), its
Bonferroni-adjusted p-value (``p``: the best class's, also when it is not called), whether the filter was
applied, the chosen q, TPR, FPR, ASR, ACC and the ROC AUC of the amplified k against the poison. ``guess now`` is
the current code's target guess on the run's saved k (a reused run directory recorded its guess with the code
of its day; where the two differ the table says which cells to rerun with ``--force``). ``alt`` is
a measurement, not used by the tool: the same
surplus test on per-class normalised scores (each score divided by its class's 25th percentile plus the
overall median, so that a class whose clean samples are all hard to flip is scaled down), to compare the two
(issue 18 asks to measure rather than assume which separates better). The table goes to stdout and to
``OUT/aibd_targets-<dataset>.md``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch
from own_triggers import OWN, evaluate, read_isolation, write_own

from antibackdoor.cli import _nest
from antibackdoor.data.registry import load_dataset
from antibackdoor.defenses.aibd import TARGET_FRACTIONS, guess_target, rank_desc
from antibackdoor.detectors.evaluate import roc_auc
from antibackdoor.experiment import make_config, run_experiment
from antibackdoor.surplus import class_surplus

BUILTIN = ("badnets", "blend", "wanet", "trojan")


def pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}"


def class_normalised_guess(scores: np.ndarray, y: np.ndarray, classes: list[str]) -> tuple[int | None, float]:
    """The surplus test on scores divided by their class's 25th percentile (+ the overall median)."""
    base = np.median(scores)
    norm = scores.copy()
    for c in np.unique(y):
        norm[y == c] = scores[y == c] / (np.quantile(scores[y == c], 0.25) + base + 1e-12)
    order = np.lexsort((np.arange(len(norm)), -norm))
    s = class_surplus(y, order, np.zeros(len(y), bool), classes, fractions=TARGET_FRACTIONS)
    return s.target, s.p


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="cifar10-mini")
    p.add_argument("--attacks", default=",".join(BUILTIN + OWN))
    p.add_argument("--targets", default="0,3,7")
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--preset", default="quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/aibd-targets")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--defense-param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra AIBD parameters for every cell (e.g. target_filter=false)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the cells and their configs; run nothing")
    a = p.parse_args()
    attacks = [s for s in a.attacks.split(",") if s]
    unknown = [s for s in attacks if s not in BUILTIN + OWN]
    if unknown:
        p.error(f"--attacks: unknown {', '.join(unknown)}; known: {', '.join(BUILTIN + OWN)}")
    targets = [int(t) for t in a.targets.split(",")]
    out = Path(a.out)
    overrides = _nest(a.defense_param, "--defense-param")  # the CLI's own parsing (YAML values, dotted keys)
    torch.set_num_threads(a.threads)
    base = {"defense": "aibd", "preset": a.preset, "out": str(out), "seed": a.seed,
            "defense_params": overrides, "precision": "fp32"}

    cells = []
    for attack in attacks:
        for t in targets:
            if attack in BUILTIN:
                cfg = {**base, "dataset": a.dataset, "attack": attack, "target": t, "poison_rate": a.rate}
            else:
                cfg = {**base, "dataset": f"npz:<OUT>/data/{attack}-t{t}.npz", "attack": "none"}
            cells.append((attack, t, cfg))
    if a.dry_run:
        for attack, t, cfg in cells:
            if attack in BUILTIN:
                make_config(cfg)  # validates the config as a run would
            print(f"{a.dataset} | {attack} | target {t} | {cfg}")
        print(f"{len(cells)} cells")
        return

    lines = [f"Dataset {a.dataset}, {a.preset} preset, poison rate {a.rate}, seed {a.seed}, AIBD "
             f"{overrides or 'defaults'}.", "",
             "| attack | target | guess | p | filter | q | TPR | FPR | ASR | ACC | AUC of k | guess now (p) | "
             "alt guess (p) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    stale = []
    for attack, t, cfg in cells:
        own = None
        if attack in OWN:
            own = write_own(a.dataset, attack, t, a.rate, a.seed, out)
            cfg = {**cfg, "dataset": f"npz:{own.path}"}
        r = run_experiment(make_config(cfg), force=a.force)
        m, info = r.metrics, r.metrics["defense_info"]
        scores, kept, is_poison = read_isolation(r.run_dir)
        if own is None:
            tpr, fpr, asr = m["tpr"], m["fpr"], m["asr"]
            y_true = load_dataset(a.dataset).train.y.numpy()
            y = np.where(is_poison, t, y_true)  # dirty-label attacks: a poisoned sample carries the target label
            classes = list(load_dataset(a.dataset).train.classes)
        else:
            ev = evaluate(r.run_dir, own)
            tpr, fpr, asr, is_poison = ev["tpr"], ev["fpr"], ev["asr"], own.poison
            data = load_dataset(f"npz:{own.path}").train
            y, classes = data.y.numpy(), list(data.classes)
        alt, alt_p = class_normalised_guess(scores, y, classes)
        now = guess_target(rank_desc(torch.from_numpy(scores)), torch.from_numpy(y), classes,
                           tuple(overrides.get("target_fractions", TARGET_FRACTIONS)))
        if now.target != info.get("target"):
            stale.append(f"{attack} t{t} ({r.run_dir})")
        auc = roc_auc(torch.from_numpy(scores), torch.from_numpy(is_poison.astype(bool)))
        guess = "-" if info.get("target") is None else str(info["target"])
        lines.append(f"| {attack} | {t} | {guess} | {info.get('target_p', float('nan')):.2g} | "
                     f"{'yes' if info.get('target_filter_applied') else 'no'} | {info['q']:.2f} | {pct(tpr)} | "
                     f"{pct(fpr)} | {pct(asr)} | {pct(m['acc'])} | {auc:.3f} | "
                     f"{'-' if now.target is None else now.target} ({now.p:.2g}) | "
                     f"{'-' if alt is None else alt} ({alt_p:.2g}) |")
        print(lines[-1], flush=True)
    if stale:
        lines += ["", "Recorded by an earlier version of the target guess, which the current code answers "
                  "differently (rerun these cells with --force): " + "; ".join(stale)]
    table = "\n".join(lines)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"aibd_targets-{re.sub(r'[^A-Za-z0-9]+', '-', a.dataset).strip('-')}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
