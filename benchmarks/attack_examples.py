"""One poisoned training example per attack: clean image, poisoned image, amplified difference (grey = 0).

Each row is one attack (every registered one, or ``--attacks``). The poisoned image is what the training set
holds (for CLB: PGD perturbation + corner patches; for clean-label attacks a target-class image), produced by
the attack's own ``poison`` on a small slice after ``prepare`` has run on the full training set, so trained
attacks (CLB, IAB, SSBA, optimised Trojan) reuse the models cached by earlier runs (else they train them).

    python benchmarks/attack_examples.py --threads 1   # writes docs/attack_examples.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def example(name: str, train, target: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(clean, poisoned) uint8 C x H x W of one poisoned sample, and the attack's label mode."""
    from antibackdoor.attacks import get_attack

    att = get_attack(name)
    gen = torch.Generator().manual_seed(seed)
    att.prepare(train, target, gen)
    is_target = (train.y == target).nonzero().squeeze(1)[:10]
    others = (train.y != target).nonzero().squeeze(1)[:30]
    idx = torch.cat([is_target, others]).sort().values
    subset = train.subset(idx)
    rate = 0.5 if att.label_mode == "clean" else 0.1
    ps = att.poison(subset, rate, target, gen)
    # a typical sample: the poisoned one with the median number of changed pixels (sample-specific triggers
    # vary; IAB's mask net leaves about 0.1% of images almost untouched)
    idx = ps.poison_mask.nonzero().squeeze(1)
    changed = (ps.data.x[idx] != subset.x[idx]).any(1).flatten(1).sum(1)
    i = int(idx[changed.sort(stable=True).indices[(len(idx) - 1) // 2]])
    return subset.x[i], ps.data.x[i], att.label_mode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attacks", help="comma-separated attack names (default: every registered attack)")
    p.add_argument("--out", default="docs/attack_examples.png")
    p.add_argument("--dataset", default="cifar10-mini")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (e.g. 1 on a shared machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from antibackdoor.attacks import ATTACKS
    from antibackdoor.data import load_dataset

    names = [a.strip() for a in args.attacks.split(",")] if args.attacks else sorted(ATTACKS)
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        p.error(f"unknown attack(s) {', '.join(unknown)}; known: {', '.join(sorted(ATTACKS))}")
    train = load_dataset(args.dataset).train
    fig, axes = plt.subplots(len(names), 3, figsize=(6.3, 2.1 * len(names)), squeeze=False)
    for row, name in zip(axes, names, strict=True):
        print(f"[attack_examples] {name}", file=sys.stderr, flush=True)
        clean, poisoned, mode = example(name, train, args.target, args.seed)
        diff = poisoned.float() - clean.float()
        peak = float(diff.abs().max())
        # signed difference around grey, the bulk of the change (90th percentile of changed pixels) scaled
        # to full contrast, so faint changes (WaNet's warp, CLB's PGD noise beside its patches) stay
        # visible; stronger pixels saturate
        changed = diff.abs()[diff != 0]
        gain = min(50.0, 127.0 / float(changed.quantile(0.9))) if changed.numel() else 1.0
        panels = [(clean, "clean"), (poisoned, f"{name} ({mode} label)"),
                  ((128 + gain * diff).clamp(0, 255), f"difference x{gain:.0f} (max {peak:.0f}/255)")]
        for ax, (img, title) in zip(row, panels, strict=True):
            arr = img.permute(1, 2, 0).cpu().numpy().round().astype("uint8")
            gray = arr.shape[-1] == 1
            ax.imshow(arr[..., 0] if gray else arr, cmap="gray" if gray else None, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    print(f"[attack_examples] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
