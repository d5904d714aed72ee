"""The ASR floor: how often a model that never saw a poisoned sample sends triggered test images to the target.

    python benchmarks/asr_floor.py [--dataset cifar10-mini] [--defenses adv-train,none]
        [--attacks badnets,blend,pixels:pixels=1,pixels:pixels=4] [--targets 0,3] [--seed 0]
        [--runs runs/asr-floor] [--out benchmarks/results/asr_floor.md]

A defense's ASR mixes two things: the backdoor that survived and the triggered images the model would send to the
target class anyway (a weak or robust model confuses many images with a frequent class, and a trigger is a
perturbation of its own). This script trains each defense once on *clean* data (``--attack none``: an ordinary run
directory under ``--runs``, reused when it exists), then measures the attack success rate of every listed trigger
on that model. A defense cannot be expected to get below its clean model's figure; a target of "ASR <= 10 %" is
only meaningful where the floor lies well under it. An ``--attacks`` entry may carry parameters,
``NAME:KEY=VALUE[:KEY=VALUE]``; attacks that prepare something from the training data (a generator, a warp field)
do so on the clean training set with the run's seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import label, parse_entry, pct


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10-mini")
    p.add_argument("--defenses", default="adv-train,none", help="defenses trained on clean data")
    p.add_argument("--attacks", default="badnets,blend,pixels:pixels=1,pixels:pixels=4")
    p.add_argument("--targets", default="0,3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default="runs/asr-floor")
    p.add_argument("--out", default="benchmarks/results/asr_floor.md")
    args = p.parse_args(argv)

    import torch

    from antibackdoor.attacks import get_attack
    from antibackdoor.data import load_dataset
    from antibackdoor.experiment import make_config, run_experiment
    from antibackdoor.metrics import accuracy, attack_success_rate
    from antibackdoor.models.io import load_model

    torch.set_num_threads(args.threads)
    attacks = [parse_entry(a) for a in args.attacks.split(",") if a.strip()]
    targets = [int(t) for t in args.targets.split(",")]
    splits = load_dataset(args.dataset)
    header = ("| defense (clean data) | ACC | attack | target | floor ASR |\n|---|---|---|---|---|")
    lines = [header]
    print(header, flush=True)
    t0 = time.time()
    for defense in [d.strip() for d in args.defenses.split(",") if d.strip()]:
        cfg = make_config({"dataset": args.dataset, "attack": "none", "defense": defense, "seed": args.seed,
                           "out": args.runs, "precision": args.precision})
        run = run_experiment(cfg)
        model = load_model(run.run_dir / "model.safetensors").eval()
        acc = accuracy(model, splits.test)
        for name, params in attacks:
            attack = get_attack(name, "quick", params)
            for target in targets:
                # poison() prepares what the attack derives from the training data; its output is not used
                attack.poison(splits.train, 0.1, target, torch.Generator().manual_seed(args.seed))
                asr = attack_success_rate(model, attack.triggered_test(splits.test, target))
                lines.append(f"| {defense} | {pct(acc)} | {label(name, params)} | {target} | {pct(asr)} |")
                print(lines[-1], flush=True)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"<!-- python benchmarks/asr_floor.py {command} -->\n"
            f"Quick preset, {args.dataset}, seed {args.seed}: each defense trained once on clean data, then every "
            f"trigger applied to the test images of the other classes ({time.time() - t0:.0f} s). The floor ASR is "
            "what the defense's model scores without any backdoor.\n\n" + "\n".join(lines) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
