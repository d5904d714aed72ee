"""How strong is each attack without a defense, and where does A-ABL's split put its poison?

For every registered attack (or ``--attacks``): poison the training set, train with defense ``none`` (quick
preset), report clean accuracy (ACC) and attack success rate (ASR), then run A-ABL's stage 2 on that naive
model (iFGSM + SCE scores, Otsu threshold) and report gamma = |D_vul| / |D| and rho_vul = poison share of
D_vul, next to A-ABL's Table 1 category (A: the split isolates the poison, B: it does not).

The ``none`` quick training equals A-ABL's quick naive stage (same config, same seed), so its model is
reused for the split; if the presets ever differ, the naive model is trained separately.

    python benchmarks/attack_table.py --attacks trojan,sig,wanet,clb --threads 1

An entry of ``--attacks`` may carry parameters for its row, ``NAME:KEY=VALUE[:KEY=VALUE]`` (``wanet:s=3``),
so that an attack can appear with its defaults and with a stronger setting in the same table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _common import parse_entry, pct

#: A-ABL Table 1 (CIFAR-10): A = isolated by the split, B = left in D_vul (suppressed by adversarial training)
CATEGORY = {"badnets": "A", "trojan": "A", "clb": "A", "iab": "A", "blend": "B", "ssba": "B", "wanet": "B"}


def parse_params(items: list[str]) -> dict[str, dict[str, Any]]:
    """``attack.key=value`` (repeatable) -> {attack: {key: value}}, values parsed as YAML."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        attack, dot, param = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--param: expected ATTACK.KEY=VALUE, got {item!r}")
        out.setdefault(attack.strip(), {})[param.strip()] = yaml.safe_load(value)
    return out


def run_attack(name: str, params: dict[str, Any], splits, args) -> dict[str, Any]:
    from antibackdoor.attacks import get_attack
    from antibackdoor.defenses import DefenseContext, get_defense
    from antibackdoor.metrics import accuracy, attack_success_rate, split_metrics
    from antibackdoor.models import build_model
    from antibackdoor.stages import otsu_threshold, train_stage

    device = torch.device(args.device)
    # on the compute device before poisoning (as the experiment runner does), so prepare() trains there
    train, test = splits.train.to(device), splits.test.to(device)
    attack = get_attack(name, **params)
    rate = args.clean_rate if attack.label_mode == "clean" else args.rate
    t0 = time.time()
    poisoned = attack.poison(train, rate, args.target, torch.Generator().manual_seed(args.seed))
    t_poison = time.time() - t0
    modified = int((poisoned.data.x != train.x).flatten(1).any(1).sum())

    def factory():
        return build_model(args.model, train.num_classes, train.channels, train.image_size, train.mean,
                           train.std)

    ctx = DefenseContext(factory, device=device, seed=args.seed)
    none = get_defense("none", "quick")
    if args.epochs is not None:
        none.params = type(none.params)(train=_with_epochs(none.params.train, args.epochs))
    t0 = time.time()
    model = none.run(poisoned.data, ctx).model
    t_train = time.time() - t0
    acc = accuracy(model, test, device)
    asr = attack_success_rate(model, attack.triggered_test(test, args.target), device)

    aabl = get_defense("a-abl", "quick")
    t0 = time.time()
    if aabl.params.naive != none.params.train:
        model, _ = train_stage(ctx, poisoned.data, aabl.params.naive, "naive")
    scores = aabl.split_scores(model, poisoned.data, ctx)
    kept = scores > otsu_threshold(scores)
    split = split_metrics(kept, poisoned.poison_mask)
    t_split = time.time() - t0
    return {
        "attack": name, "label": attack.label_mode, "rate": rate, "params": params,
        "poisoned": poisoned.num_poison, "modified": modified, "rho": poisoned.num_poison / len(train),
        "acc": acc, "asr": asr, "gamma": split["gamma"], "rho_vul": split["rho_vul"], "tpr": split["tpr"],
        "category": CATEGORY.get(name, "-"), "t_poison": t_poison, "t_train": t_train, "t_split": t_split,
    }


def _with_epochs(cfg, epochs: int):
    from dataclasses import replace

    return replace(cfg, epochs=epochs)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| attack | label | poisoned (rho %) | modified | ACC % | ASR % | gamma % | rho_vul % "
            "| poison isolated % | A-ABL cat. | prepare+poison s | train s | split s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        extra = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        name = f"{r['attack']} ({extra})" if extra else r["attack"]
        cells = [name, r["label"], f"{r['poisoned']} ({pct(r['rho'])})", str(r["modified"]), pct(r["acc"]),
                 pct(r["asr"]), pct(r["gamma"]), pct(r["rho_vul"]), pct(r["tpr"]), r["category"],
                 f"{r['t_poison']:.0f}", f"{r['t_train']:.0f}", f"{r['t_split']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", help="comma-separated attack names (default: every registered attack)")
    p.add_argument("--out", default="benchmarks/results/attack_table.md", help="Markdown file to write")
    p.add_argument("--dataset", default="cifar10-mini")
    p.add_argument("--model", default="cnn")
    p.add_argument("--rate", type=float, default=0.1, help="poison rate of dirty-label attacks (A-ABL: 0.1)")
    p.add_argument("--clean-rate", type=float, default=0.5,
                   help="fraction of the target class poisoned by clean-label attacks (A-ABL's CLB: 0.5)")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="attack parameter, e.g. wanet.s=1.0 (repeatable)")
    p.add_argument("--epochs", type=int, help="override the quick training length (smoke tests only)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (e.g. 1 on a shared machine)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    from antibackdoor.attacks import ATTACKS
    from antibackdoor.data import load_dataset

    if args.attacks:
        entries = [parse_entry(a) for a in args.attacks.split(",")]
    else:
        entries = [(a, {}) for a in sorted(ATTACKS)]
    unknown = [name for name, _ in entries if name not in ATTACKS]
    if unknown:
        p.error(f"unknown attack(s) {', '.join(unknown)}; known: {', '.join(sorted(ATTACKS))}")
    params = parse_params(args.param)
    splits = load_dataset(args.dataset)
    rows = []
    for name, own in entries:
        print(f"[attack_table] {name} {own or ''}...", file=sys.stderr, flush=True)
        row = run_attack(name, {**params.get(name, {}), **own}, splits, args)
        rows.append(row)
        print(f"[attack_table] {name}: ACC {pct(row['acc'])}  ASR {pct(row['asr'])}  "
              f"gamma {pct(row['gamma'])}  rho_vul {pct(row['rho_vul'])}", file=sys.stderr, flush=True)
    table = markdown(rows)
    print(table)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"<!-- python benchmarks/attack_table.py {command} -->\n"
              f"Dataset {args.dataset}, model {args.model}, defense none (quick preset), seed {args.seed}, "
              f"target {args.target}; dirty-label rate {args.rate}, clean-label rate {args.clean_rate} of "
              f"the target class; torch threads {torch.get_num_threads()}, device {args.device}.\n"
              "ASR on non-target test images with the trigger. gamma, rho_vul: A-ABL's split of the naive "
              "model (iFGSM + SCE, Otsu); category from A-ABL Table 1 (A: isolated, B: kept).\n\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + table + "\n")
    print(f"[attack_table] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
