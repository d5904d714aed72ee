"""A-ABL lever by lever: the paper's A-ABL (quick preset) next to its options, per attack and target.

    python benchmarks/bench_aabl_levers.py [--attacks badnets,blend,pixels:pixels=1,pixels:pixels=4]
        [--targets 0,3] [--dataset cifar10-mini]
        [--variants a-abl,split_log,takeback,purge,split_log+purge,a-abl+,adv-train] [--set KEY=VALUE ...]
        [--runs runs/bench-levers] [--out benchmarks/results/aabl_levers.md] [--seed 0] [--threads 2] [--dry-run]
        [--stage-cache DIR]

An entry of ``--attacks`` may carry attack parameters, ``NAME:KEY=VALUE[:KEY=VALUE]`` (``pixels:pixels=4``).
A variant is a defense with option values (``VARIANTS``); ``--set KEY=VALUE`` adds a defense parameter to every
A-ABL variant but the paper's ``a-abl`` (e.g. ``--set takeback_epochs=10``; dotted keys set nested ones,
``--set naive.crop=0``). ``--dataset`` runs on another dataset (e.g. ``npz:PATH``). Each cell is an ordinary run
directory under ``--runs`` (reused when it exists). Prints one Markdown row per cell as it finishes -- ACC, ASR,
RA, gamma, rho_vul, TPR, FPR of the split, how many isolated samples were taken back (of them poisoned), how many
kept samples the purge dropped (of them poisoned), the poison share of what the final model trained on, wall
time -- and writes the table to ``--out``. ``--dry-run``
prints the cells only. ``--stage-cache DIR`` lets the variants of one attack share the stages they train alike
(the naive stage, and stage 3 where the split is the same, as ``antibackdoor bench`` does); the time column is
then the cell's own wall time plus the training seconds its cache hits saved, i.e. what the cell costs alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

#: variant name -> (defense, defense parameters)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "a-abl": ("a-abl", {}),  # the paper's algorithm, quick preset
    "split_log": ("a-abl", {"split_log": True}),
    "takeback": ("a-abl", {"takeback_epochs": 5}),
    "purge": ("a-abl", {"purge": True}),
    "split_log+purge": ("a-abl", {"split_log": True, "purge": True}),
    "a-abl+": ("a-abl+", {}),  # as registered
    "adv-train": ("adv-train", {}),  # the accuracy reference: adversarial training on all the data
}


def parse_entry(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE[:KEY=VALUE]`` -> (name, {key: value}), values parsed as YAML."""
    name, *items = text.strip().split(":")
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--attacks: expected NAME:KEY=VALUE, got {text!r}")
        params[key] = yaml.safe_load(value)
    return name, params


def parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set: expected KEY=VALUE, got {item!r}")
        *parents, leaf = key.split(".")  # dotted keys set nested parameters: naive.crop=0
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def label(name: str, params: dict[str, Any]) -> str:
    return name + "".join(f" {k}={v}" for k, v in params.items())


def pct(v: Any) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}"


def cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (attack, target, variant) cell as an experiment config."""
    attacks = [parse_entry(a) for a in args.attacks.split(",") if a.strip()]
    targets = [int(t) for t in args.targets.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    extra = parse_sets(args.set)
    out = []
    for name, attack_params in attacks:
        for target in targets:
            for variant in variants:
                defense, params = VARIANTS[variant]
                if defense.startswith("a-abl") and variant != "a-abl":  # the paper's A-ABL stays as it is
                    params = {**params, **extra}
                out.append({"variant": variant, "attack_label": label(name, attack_params), "config": {
                    "dataset": args.dataset, "attack": name, "attack_params": attack_params, "target": target,
                    "defense": defense, "defense_params": params, "seed": args.seed, "out": args.runs,
                    "precision": args.precision}})
    return out


HEADER = ("| attack | target | variant | ACC | ASR | RA | gamma | rho_vul | TPR | FPR | taken back (poison) | "
          "purged (poison) | poison in final set | time (s) |\n" + "|---" * 14 + "|")


def row(cell: dict[str, Any], m: dict[str, Any]) -> str:
    c = cell["config"]
    back = m.get("sample_flags", {}).get("taken_back")
    kept = m["train_size"] - m["isolated"] if m.get("isolated") is not None else m["train_size"]
    kept_poison = m["poisoned"] - (m.get("isolated_poison") or 0)
    final_n, final_p, taken, purged = kept, kept_poison, "-", "-"
    if back is not None:
        final_n, final_p = final_n + back["samples"], final_p + back["poison"]
        taken = f"{back['samples']} ({back['poison']})"
    dropped = m.get("sample_flags", {}).get("purged")
    if dropped is not None:
        final_n, final_p = final_n - dropped["samples"], final_p - dropped["poison"]
        purged = f"{dropped['samples']} ({dropped['poison']})"
    elif "purge_target" in (m.get("defense_info") or {}):
        purged = "no surplus"
    share = final_p / final_n if final_n else None
    return (f"| {cell['attack_label']} | {c['target']} | {cell['variant']} | {pct(m['acc'])} | {pct(m['asr'])} | "
            f"{pct(m['ra'])} | {pct(m['gamma'])} | {pct(m['rho_vul'])} | {pct(m['tpr'])} | {pct(m['fpr'])} | "
            f"{taken} | {purged} | {pct(share)} | {standalone_seconds(m):.0f} |")


def standalone_seconds(m: dict[str, Any]) -> float:
    """The cell's wall time as if it had trained every stage itself (stage-cache hits added back)."""
    from antibackdoor.bench.stage_cache import cache_hits, saved_seconds

    return m["time_total_s"] + saved_seconds(cache_hits(m))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="badnets,blend,pixels:pixels=1,pixels:pixels=4")
    p.add_argument("--targets", default="0,3")
    p.add_argument("--dataset", default="cifar10-mini", help="any dataset name of `antibackdoor datasets`")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="defense parameter for every A-ABL variant but a-abl itself (repeatable)")
    p.add_argument("--runs", default="runs/bench-levers", help="where the run directories go")
    p.add_argument("--out", default="benchmarks/results/aabl_levers.md", help="Markdown file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="rerun cells whose run directory exists")
    p.add_argument("--dry-run", action="store_true", help="print the cells and exit")
    p.add_argument("--stage-cache", default=None, metavar="DIR", help="share identical stages between cells")
    args = p.parse_args(argv)
    todo = cells(args)
    if args.dry_run:
        for cell in todo:
            c = cell["config"]
            print(f"{cell['attack_label']:<24} target {c['target']}  {cell['variant']:<10} --defense {c['defense']} "
                  + " ".join(f"--defense-param {k}={yaml.safe_dump(v).splitlines()[0]}"
                            for k, v in c["defense_params"].items()))
        print(f"{len(todo)} cells", file=sys.stderr)
        return 0

    import torch

    from antibackdoor.bench.stage_cache import StageCache
    from antibackdoor.experiment import make_config, run_experiment

    torch.set_num_threads(args.threads)
    cache = StageCache(args.stage_cache) if args.stage_cache else None
    lines = [HEADER]
    print(HEADER, flush=True)
    t0 = time.time()
    for cell in todo:
        result = run_experiment(make_config(cell["config"]), force=args.force, stage_cache=cache)
        lines.append(row(cell, result.metrics))
        print(lines[-1], flush=True)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"<!-- python benchmarks/bench_aabl_levers.py {command} -->\n"
            f"Quick preset, dataset {args.dataset}, seed {args.seed}, torch threads "
            f"{torch.get_num_threads()}, {len(todo)} cells in {time.time() - t0:.0f} s. gamma, rho_vul, TPR, FPR "
            "describe A-ABL's split; 'taken back (poison)': isolated samples re-included by the take back (of them "
            "poisoned); 'purged (poison)': kept samples the purge dropped (of them poisoned), 'no surplus' where it "
            "found no target class; 'poison in final set': poison share of what the final model trained on.\n\n"
            + "\n".join(lines) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
