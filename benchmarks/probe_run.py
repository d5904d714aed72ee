"""Probes of finished runs: what a run directory holds beyond its metrics, read with the ground truth.

    python benchmarks/probe_run.py purge RUN_DIR [RUN_DIR ...]
    python benchmarks/probe_run.py aibd-alt RUN_DIR [RUN_DIR ...]
    python benchmarks/probe_run.py dbd-warmup RUN_DIR [RUN_DIR ...]
    python benchmarks/probe_run.py pool NAIVE_RUN_DIR,ROBUST_RUN_DIR [...]
    python benchmarks/probe_run.py stamped RUN_DIR [RUN_DIR ...]

A run directory is any of ``antibackdoor run`` or ``bench`` (e.g. of the grids in benchmarks/grids/); the
training data and its poison are rebuilt from its config (the attack with the run's seed, or an ``outside:``
data set's own ground truth).

- ``purge`` (an ``a-abl`` / ``a-abl+`` run): for the samples the split kept, per class, how often the run's final
  model disagrees with the given label; whether the class-surplus test, run on the ranking by that model's loss,
  names a target class; and what a purge of the true target class would drop and leave. It answers "could the
  purge have found this poison with this model?" where the split's own ranking showed no surplus (docs/a-abl.md).
- ``aibd-alt`` (an ``aibd`` run): the surplus test on per-class normalised scores (each k divided by its class's
  25th percentile plus the overall median), beside the guess the run recorded: the ``alt`` column of
  docs/aibd.md, a measurement the tool does not use.
- ``pool`` (a ``none`` run, whose model is A-ABL's naive model, and an ``adv-train`` run on the same data, whose
  model stands for the robust one): how many poisoned samples a class-balanced defensive pool (10 to 50 % of the data)
  holds when each class's most trusted samples are drawn by each ranking ``a-abl-pdb`` offers, and by a few others
  (docs/every-trigger.md, "Which samples the pool can trust").
- ``stamped`` (a run of a defense that plants a defensive backdoor: ``pdb``, ``pdb-iso``, ``a-abl-pdb``): the clean
  test accuracy of the deployed model (every input stamped, the answer mapped back) beside that of its network
  alone on unstamped inputs, and how the deployed model's answers spread over the classes: what the defensive
  trigger costs in accuracy (docs/every-trigger.md).
- ``dbd-warmup`` (a ``dbd`` run): the poison share of the labelled set right after the SCE warm-up, and that
  split read as a detector (``dbd-sce``: TPR / FPR, ROC AUC), from the run's checkpoint (docs/dbd.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from _common import pct, read_isolation, rebuild


def purge(run_dir: Path) -> None:
    from antibackdoor.models.io import load_model
    from antibackdoor.precision import PLAIN
    from antibackdoor.stages import DefenseContext, agrees_with_label, sample_losses
    from antibackdoor.surplus import class_surplus

    r = rebuild(run_dir)
    _, kept, in_csv = read_isolation(run_dir)
    poison, target = r.poison, r.target
    if not np.array_equal(in_csv, poison):
        raise SystemExit(f"{run_dir}: the rebuilt poison does not match isolation.csv")
    model = load_model(run_dir / "model.safetensors").eval()
    data = r.data
    y = data.y.cpu().numpy()
    ctx = DefenseContext(lambda: model, precision=PLAIN)  # fp32 on the CPU, whatever the CPU kind
    agree = agrees_with_label(model, data, ctx).numpy()
    loss = sample_losses(model, data, ctx).cpu().numpy()
    print(f"{run_dir.name}: {r.config['attack']} on {r.config['dataset']} -> class {target}, {int(kept.sum())} kept, "
          f"{int((kept & poison).sum())} of them poisoned")
    rates = [1 - agree[kept & (y == c)].mean() if (kept & (y == c)).any() else float("nan")
             for c in range(data.num_classes)]
    print("  disagreement with the given label, kept samples, per class: "
          + ", ".join(f"{c}: {v:.2f}" for c, v in enumerate(rates)))
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


def aibd_alt(run_dir: Path) -> None:
    from antibackdoor.stages.aibd import TARGET_FRACTIONS
    from antibackdoor.surplus import class_surplus

    r = rebuild(run_dir)
    scores, _, _ = read_isolation(run_dir)
    y, classes = r.data.y.cpu().numpy(), list(r.data.classes)
    base = np.median(scores)
    norm = scores.copy()
    for c in np.unique(y):
        norm[y == c] = scores[y == c] / (np.quantile(scores[y == c], 0.25) + base + 1e-12)
    order = np.lexsort((np.arange(len(norm)), -norm))
    alt = class_surplus(y, order, np.zeros(len(y), bool), classes, fractions=TARGET_FRACTIONS)
    info = json.loads((run_dir / "metrics.json").read_text()).get("defense_info") or {}
    guess = "-" if info.get("target") is None else info["target"]
    print(f"{run_dir.name}: true target {r.target}; guess {guess} (p {info.get('target_p', float('nan')):.2g}); "
          f"alt {'-' if alt.target is None else alt.target} (p {alt.p:.2g})")


def dbd_warmup(run_dir: Path) -> None:
    import yaml

    from antibackdoor.metrics import roc_auc, split_metrics
    from antibackdoor.stages.dbd import lowest

    ckpt = run_dir / "checkpoints" / "dbd_finetune.ckpt"
    if not ckpt.exists():
        raise SystemExit(f"{run_dir}: no checkpoints/dbd_finetune.ckpt (not a finished dbd run)")
    epsilon = yaml.safe_load((run_dir / "config.yaml").read_text())["defense_resolved"]["epsilon"]
    scores = torch.load(ckpt, map_location="cpu", weights_only=True)["warmup_scores"]  # = sample_stats warmup_sce
    _, _, poison = read_isolation(run_dir)
    mask = torch.from_numpy(poison)
    labelled = lowest(scores, epsilon)
    share = float(mask[labelled].float().mean())
    if mask.any():
        m = split_metrics(labelled, mask)
        split = f"{pct(m['tpr'])} / {pct(m['fpr'])} (AUC {pct(roc_auc(scores, mask))})"
    else:
        split = "- (no poison)"
    print(f"{run_dir.name}: poison share of the labelled set after the warm-up {pct(share)} %; the warm-up split "
          f"as a detector, TPR / FPR: {split}")


def pool(pair: Path) -> None:
    from antibackdoor.models.io import load_model
    from antibackdoor.precision import PLAIN
    from antibackdoor.stages import DefenseContext, agrees_with_label, sample_losses
    from antibackdoor.stages.aabl import ifgsm_scores
    from antibackdoor.stages.defensive import least_suspicious

    naive_dir, robust_dir = (Path(p) for p in str(pair).split(","))
    r = rebuild(naive_dir)
    if not np.array_equal(rebuild(robust_dir).poison, r.poison):
        raise SystemExit(f"{pair}: the two runs were not trained on the same poisoned data")
    data, poison = r.data, torch.from_numpy(r.poison)
    naive, robust = (load_model(d / "model.safetensors").eval() for d in (naive_dir, robust_dir))
    ctx = DefenseContext(lambda: naive, precision=PLAIN)  # fp32 on the CPU, whatever the CPU kind
    agree_n, agree_r = agrees_with_label(naive, data, ctx), agrees_with_label(robust, data, ctx)
    loss_n, loss_r = sample_losses(naive, data, ctx).double(), sample_losses(robust, data, ctx).double()
    sce = ifgsm_scores(naive, data, ctx, 2 / 255, 5).double()
    both = agree_n & agree_r
    ratios = (0.1, 0.2, 0.3, 0.5)
    random = torch.rand(len(data), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rankings = {  # name: (trust, eligible)
        "random, naive agrees": (random, agree_n),
        "high iFGSM SCE (A-ABL's vulnerable end), naive agrees": (sce, agree_n),
        "naive-loss: high naive loss, naive agrees": (loss_n, agree_n),
        "low naive loss, naive agrees": (-loss_n, agree_n),
        "random, both agree": (random, both),
        "robust-loss: low robust loss, both agree": (-loss_r, both),
        "loss-gain: naive minus robust loss, both agree": (loss_n - loss_r, both),
    }
    print(f"{naive_dir.name} + {robust_dir.name}: target {r.target}, {int(poison.sum())} poisoned; the robust "
          f"model agrees with {pct(float(agree_r[poison].float().mean()))} % of the poison, the naive one with "
          f"{pct(float(agree_n[poison].float().mean()))} %")
    print("| ranking | " + " | ".join(f"pool {int(100 * q)} %: size (poisoned)" for q in ratios) + " |")
    print("|---|" + "---|" * len(ratios))
    for name, (trust, eligible) in rankings.items():
        cells = []
        for q in ratios:
            chosen = least_suspicious(-trust, data.y, eligible, int(len(data) * q / data.num_classes),
                                      data.num_classes)
            cells.append(f"{int(chosen.sum())} ({int((chosen & poison).sum())})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    # the same loss gain read the other way: the least trusted samples as suspects, for the class-surplus test
    from antibackdoor.surplus import class_surplus

    gain = (loss_n - loss_r).numpy()
    y = data.y.cpu().numpy()
    surplus = class_surplus(y, np.argsort(gain, kind="stable"), np.zeros(len(y), bool), list(data.classes))
    print(f"surplus test on the loss gain, lowest first: target {surplus.target} (best {surplus.best}, adjusted p "
          f"{surplus.p:.2g})")
    t = r.target
    in_t = np.flatnonzero(y == t)
    order = in_t[np.argsort(gain[in_t], kind="stable")]
    p_np = poison.numpy()
    for q in (0.25, 0.4, 0.5, 0.6):
        drop = order[:int(q * len(order))]
        left = np.setdiff1d(np.arange(len(y)), drop)
        print(f"  dropping the lowest {int(100 * q)} % of class {t} by gain ({len(drop)}): {int(p_np[drop].sum())} "
              f"poisoned among them, {int(p_np[left].sum())} left ({pct(p_np[left].mean())} % of {len(left)})")
    agree_r_np = agree_r.numpy()
    drop = in_t[~agree_r_np[in_t]]
    print(f"  dropping the samples of class {t} the robust model disagrees with ({len(drop)}): "
          f"{int(p_np[drop].sum())} poisoned among them, {int(p_np.sum() - p_np[drop].sum())} left")


def stamped(run_dir: Path) -> None:
    import yaml

    from antibackdoor.data import load_dataset
    from antibackdoor.metrics import predict
    from antibackdoor.models.io import load_model

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    test = load_dataset(cfg["dataset"], cfg.get("data_root")).test
    deployed = load_model(run_dir / "model.safetensors").eval()
    if not hasattr(deployed, "net"):
        raise SystemExit(f"{run_dir}: its model plants no defensive backdoor")
    y = test.y.cpu()
    on = predict(deployed, test)
    off = predict(deployed.net, test)
    print(f"{run_dir.name}: ACC deployed (stamped) {pct(float((on == y).float().mean()))} %, network alone "
          f"(unstamped) {pct(float((off == y).float().mean()))} %; deployed answers per class "
          f"{torch.bincount(on, minlength=len(test.classes)).tolist()}")


PROBES = {"pool": pool, "stamped": stamped, "purge": purge, "aibd-alt": aibd_alt, "dbd-warmup": dbd_warmup}


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) < 2 or args[0] not in PROBES:
        raise SystemExit(__doc__.split("\n\n")[1])
    torch.set_num_threads(2)
    for path in args[1:]:
        PROBES[args[0]](Path(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
