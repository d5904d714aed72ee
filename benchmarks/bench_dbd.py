"""DBD on the bundled mini CIFAR-10: ACC / ASR and how clean its labelled set is, round by round.

    python benchmarks/bench_dbd.py [--attacks badnets,blend,none] [--preset quick] [--target 0] [--seed 0]
                                   [--out runs/dbd] [--threads 2] [--defense-param KEY=VALUE ...]

Each attack is one ordinary run (`antibackdoor run --defense dbd`), reused when it exists. Besides the run's
metrics it reports the poison share of the labelled set after the SCE warm-up and in every round (the split
DBD relies on; the defense never sees the poison mask, only this script does). Writes OUT/dbd_<preset>.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from antibackdoor.cli import _nest
from antibackdoor.defenses.dbd import lowest
from antibackdoor.experiment import Experiment, make_config


def pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}"


def warmup_split(run_dir: Path, epsilon: float) -> str:
    """TPR / FPR (AUC) of the split after the warm-up (the detector dbd-sce), from the run's checkpoint and the
    ground truth in isolation.csv."""
    import csv

    from antibackdoor.detectors.evaluate import roc_auc
    from antibackdoor.metrics import split_metrics

    ckpt = run_dir / "checkpoints" / "dbd_finetune.ckpt"
    if not ckpt.exists():
        return "-"
    scores = torch.load(ckpt, map_location="cpu", weights_only=True)["warmup_scores"]  # = sample_stats warmup_sce
    with open(run_dir / "isolation.csv") as f:
        mask = torch.tensor([bool(int(r["is_poison"])) for r in csv.DictReader(f)])
    if not mask.any():
        return "-"
    m = split_metrics(lowest(scores, epsilon), mask)
    return f"{pct(m['tpr'])} / {pct(m['fpr'])} ({pct(roc_auc(scores, mask))})"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attacks", default="badnets,blend,none")
    p.add_argument("--preset", default="quick")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/dbd")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--defense-param", action="append", default=[])
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (see antibackdoor doctor)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lines = ["| attack | ACC | ASR | poison share of labelled: after warm-up / last round | labelled | "
             "warm-up split as a detector (dbd-sce): TPR / FPR (AUC) | time (s) |", "|---|---|---|---|---|---|---|"]
    for attack in a.attacks.split(","):
        cfg = make_config({"attack": attack, "defense": "dbd", "preset": a.preset, "out": a.out, "seed": a.seed,
                           "target": a.target, "precision": a.precision,
                           "defense_params": _nest(a.defense_param, "--defense-param")})
        exp = Experiment(cfg)
        epsilon = exp.resolve().defense.params.epsilon
        t0 = time.time()
        r = exp.run()
        m = r.metrics
        run_dir = r.run_dir
        side = run_dir / "dbd_rounds.json"
        if not r.reused:
            mask = r.poisoned.poison_mask
            stats = r.result.sample_stats
            rounds = sorted((k for k in stats if k.startswith("labelled_round_")), key=lambda k: int(k.split("_")[-1]))
            shares = [float(mask[stats[k]].float().mean()) for k in rounds]
            warm = float(mask[lowest(stats["warmup_sce"], epsilon)].float().mean())
            side.write_text(json.dumps({"after_warmup": warm, "rounds": shares, "wall_s": time.time() - t0}))
        info = json.loads(side.read_text()) if side.exists() else {"after_warmup": None, "rounds": []}
        last = info["rounds"][-1] if info["rounds"] else None
        warm = warmup_split(run_dir, epsilon)
        lines.append(f"| {attack} | {pct(m['acc'])} | {pct(m['asr'])} | {pct(info['after_warmup'])} / {pct(last)} | "
                     f"{m['defense_info']['labelled']} | {warm} | {m['time_total_s']:.0f} |")
        print(lines[-1], "rounds:", [round(100 * s, 1) for s in info["rounds"]], flush=True)
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"dbd_{a.preset}.md").write_text(table)


if __name__ == "__main__":
    main()
