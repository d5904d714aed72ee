"""What A-ABL's purge sees in a finished run: the final model's agreement with the given labels of the kept samples.

    python benchmarks/probe_purge.py RUN_DIR [RUN_DIR ...]

For an ``a-abl`` / ``a-abl+`` run directory (of ``antibackdoor run`` or a bench) this rebuilds the poisoned training
set from the run's config (same attack, target and seed; the ground truth the defense never saw) and reports, for
the samples the split kept: per class, how often the run's final model disagrees with the given label; whether
the class-surplus test, run on the ranking by that model's loss, names a target class; and what a purge of the true
target class would drop (samples, of them poisoned) and leave. It answers "could the purge have found and removed
this poison with this model?" where the split's own ranking showed no surplus (docs/a-abl.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import yaml


def probe(run_dir: Path) -> None:
    from antibackdoor.attacks import get_attack
    from antibackdoor.data import load_dataset
    from antibackdoor.defenses.base import DefenseContext
    from antibackdoor.defenses.stages import agrees_with_label, sample_losses
    from antibackdoor.models.io import load_model
    from antibackdoor.precision import PLAIN
    from antibackdoor.surplus import class_surplus

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    splits = load_dataset(cfg["dataset"], cfg.get("data_root"))
    attack = get_attack(cfg["attack"], cfg["preset"], cfg.get("attack_params") or {})
    target = int(cfg["target"])
    poisoned = attack.poison(splits.train, cfg["poison_rate"], target, torch.Generator().manual_seed(cfg["seed"]))
    table = np.genfromtxt(run_dir / "isolation.csv", delimiter=",", names=True)
    kept, poison = table["kept"] == 1, poisoned.poison_mask.cpu().numpy()
    if not np.array_equal(table["is_poison"] == 1, poison):
        raise SystemExit(f"{run_dir}: the rebuilt poison does not match isolation.csv")
    model = load_model(run_dir / "model.safetensors").eval()
    data = poisoned.data
    y = data.y.cpu().numpy()
    ctx = DefenseContext(lambda: model, precision=PLAIN)  # fp32 on the CPU, whatever the CPU kind
    agree = agrees_with_label(model, data, ctx).numpy()
    loss = sample_losses(model, data, ctx).cpu().numpy()
    print(f"{run_dir.name}: {cfg['attack']} -> class {target}, {int(kept.sum())} kept, "
          f"{int((kept & poison).sum())} of them poisoned")
    rates = [1 - agree[kept & (y == c)].mean() if (kept & (y == c)).any() else float("nan")
             for c in range(data.num_classes)]
    print("  disagreement with the given label, kept samples, per class: "
          + ", ".join(f"{c}: {r:.2f}" for c, r in enumerate(rates)))
    print(f"  kept poison the model agrees with (predicts the target for): {agree[kept & poison].mean():.2f}; "
          f"kept clean samples of class {target} it agrees with: {agree[kept & ~poison & (y == target)].mean():.2f}")
    idx = np.flatnonzero(kept)
    surplus = class_surplus(y[idx], np.argsort(-loss[idx]), np.zeros(len(idx), bool), data.classes)
    print(f"  surplus test on the kept samples ranked by the model's loss: target {surplus.target} "
          f"(best class {surplus.best}, adjusted p {surplus.p:.2g})")
    drop = kept & (y == target) & ~agree
    left = kept & ~drop
    share = 100 * (left & poison).sum() / left.sum()
    print(f"  a purge of class {target} would drop {int(drop.sum())} ({int((drop & poison).sum())} poisoned) and "
          f"leave {int((left & poison).sum())} poisoned of {int(left.sum())} ({share:.1f} %)")


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        raise SystemExit(__doc__.split("\n\n")[1])
    torch.set_num_threads(2)
    for path in args:
        probe(Path(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
