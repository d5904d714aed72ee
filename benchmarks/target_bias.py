"""How much of a run's ASR is its model's bias toward the target class: the share of *clean* test images of the
other classes that the model sends to the target, beside the ASR (the same images with the trigger).

A defense whose model is weak or skewed (VaB's and ASD's at quick scale) can send a third of clean images to the
target class; its ASR then says little about a surviving backdoor. A backdoor is what the ASR adds to this floor.

    python benchmarks/target_bias.py RUN_DIR [RUN_DIR ...]  [--out FILE.md]

Reads each run's config.yaml, metrics.json and model.safetensors (the deployed model: PDB's wrapper included);
the target of data that came poisoned (``outside:``) is the one its ground truth names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from _common import pct

import antibackdoor as ab
from antibackdoor.metrics import predict


def target_of(config: dict, metrics: dict) -> int:
    truth = metrics.get("truth") or {}
    return int(truth["target"]) if config.get("attack") == "none" and "target" in truth else int(config["target"])


def clean_to_target(model: torch.nn.Module, test, target: int) -> float:
    """Share of clean test images whose class is not ``target`` that ``model`` predicts as ``target``."""
    pred = predict(model, test)[test.y.cpu() != target]
    return float((pred == target).float().mean()) if len(pred) else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    lines = ["| run | defense | target | ACC | ASR | clean -> target |", "|---|---|---|---|---|---|"]
    tests: dict[str, object] = {}
    for run in args.runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        spec = config["dataset"]
        if spec not in tests:
            tests[spec] = ab.load_dataset(spec).test
        target = target_of(config, metrics)
        model = ab.load_model(run / "model.safetensors").eval()
        rate = clean_to_target(model, tests[spec], target)
        lines.append(f"| {run.name} | {config['defense']} | {target} | {pct(metrics.get('acc'))} | "
                     f"{pct(metrics.get('asr'))} | {pct(rate)} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(f"<!-- python benchmarks/target_bias.py {' '.join(map(str, args.runs))} -->\n{text}")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
