"""``antibackdoor defend`` on image folders poisoned by triggers of our own that no attack module implements.

    python benchmarks/defend_folders.py [--cases clean,patch@3,blend@7] [--defenses a-abl,aibd]
                                        [--work /tmp/defend-bench] [--rate 0.1] [--seed 0] [--threads 2]

Builds, from the bundled mini CIFAR-10 training images, one folder of PNGs per case (class sub-folders named
by the CIFAR-10 classes): ``clean``; ``patch@T``: a 4x4 two-colour sticker at the lower left, the poisoned
images relabelled to class T; ``blend@T``: a faint diagonal colour grating blended in at alpha 0.12, relabelled
to T. Then runs the CLI exactly as a user would, ``antibackdoor defend folder:DIR --test cifar10-mini
--poison-mask poison.txt --holdout 0`` (the tool never sees the trigger; the mask is evaluation only), each
run a separate process timed with its peak memory. The script itself then loads the returned model with
``antibackdoor.load_model``, applies the trigger to the test images of the other classes and measures the
trigger's success rate (ASR), and reads suspicious.csv for the precision of the top-100 and top-500 ranks.
Prints a Markdown table and writes it to WORK/defend_folders.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import pct
from PIL import Image

import antibackdoor

MINI = Path(antibackdoor.__file__).parent / "data" / "assets" / "cifar10_mini.npz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ALPHA = 0.12


def sticker(x: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 uint8 -> the same with a 4x4 yellow/blue sticker at rows 22-25, columns 5-8."""
    x = x.copy()
    x[:, 22:26, 5:9] = (255, 230, 0)
    x[:, 23:25, 6:8] = (0, 40, 255)
    return x


def grating(size: int = 32) -> np.ndarray:
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    phase = 2 * np.pi * (i + j) / 5.0
    return np.stack([127.5 + 127.5 * np.sin(phase + k * 2 * np.pi / 3) for k in range(3)], -1)


def blend(x: np.ndarray) -> np.ndarray:
    """A faint diagonal rainbow grating blended in: (1 - a) x + a g."""
    return np.clip(np.rint((1 - ALPHA) * x.astype(np.float64) + ALPHA * grating()), 0, 255).astype(np.uint8)


TRIGGERS = {"patch": sticker, "blend": blend}


def build(case: str, work: Path, rate: float, seed: int) -> tuple[Path, Path, int | None]:
    """The folder of one case and its poison list (files relative to the folder)."""
    root = work / case.replace("@", "-t")
    mask_path = work / f"{case.replace('@', '-t')}.poison.txt"
    kind, _, t = case.partition("@")
    target = int(t) if t else None
    if (root / "done").is_file():
        return root, mask_path, target
    with np.load(MINI) as f:
        x, y = f["x_train"], f["y_train"]
    poison = np.zeros(len(y), bool)
    if kind != "clean":
        rng = np.random.default_rng(seed)
        candidates = np.flatnonzero(y != target)
        poison[rng.choice(candidates, int(round(rate * len(y))), replace=False)] = True
        x = x.copy()
        x[poison] = TRIGGERS[kind](x[poison])
        y = np.where(poison, target, y)
    files = []
    for i in range(len(y)):
        d = root / CLASSES[y[i]]
        d.mkdir(parents=True, exist_ok=True)
        name = f"{i:05d}.png"
        Image.fromarray(x[i]).save(d / name)
        if poison[i]:
            files.append(f"{CLASSES[y[i]]}/{name}")
    mask_path.write_text("".join(f"{f}\n" for f in files))
    (root / "done").write_text("")
    return root, mask_path, target


def run_cli(args: list[str], log: Path) -> tuple[dict, float, float]:
    """Run ``antibackdoor ARGS --json`` in its own process: (its metrics, wall s, peak RSS MiB of that process)."""
    t0 = time.time()
    js = log.with_suffix(".json")
    with open(js, "w") as out, open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "antibackdoor.cli", *args, "--json"], stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"defend failed, see {log}")
    return json.loads(js.read_text()), time.time() - t0, usage.ru_maxrss / 1024


def precision_at(rows: list[dict], poisoned: set[str], k: int) -> float:
    return float(np.mean([r["file"] in poisoned for r in rows[:k]])) if len(rows) >= k else float("nan")


@torch.no_grad()
def trigger_success(model, kind: str, target: int) -> float:
    with np.load(MINI) as f:
        x, y = f["x_test"], f["y_test"]
    keep = y != target
    xt = torch.from_numpy(TRIGGERS[kind](x[keep])).permute(0, 3, 1, 2).float() / 255
    pred = torch.cat([model(xt[s:s + 512]).argmax(1) for s in range(0, len(xt), 512)])
    return float((pred == target).float().mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="clean,patch@3,blend@7")
    p.add_argument("--defenses", default="a-abl,aibd")
    p.add_argument("--work", default="/tmp/defend-bench")
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extra", default="", help="more defend arguments, space-separated")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env_note = f"threads {a.threads}, torch {torch.__version__}"
    lines = ["| data | defense | isolated | TPR | FPR | prec@100 | prec@500 | AUC | target found (p) | ACC | RA | "
             "ASR | wall (s) | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    results = []
    for case in a.cases.split(","):
        root, mask, target = build(case, work, a.rate, a.seed)
        poisoned = set(mask.read_text().split())
        for defense in a.defenses.split(","):
            out = work / "runs"
            args = ["defend", f"folder:{root}", "--defense", defense, "--test", "cifar10-mini", "--holdout", "0",
                    "--out", str(out), "--seed", str(a.seed), "--force"]
            if poisoned:
                args += ["--poison-mask", str(mask)]
            args += a.extra.split()
            log = work / f"{root.name}-{defense}.log"
            metrics, wall, rss = run_cli(args, log)
            run_dir = _run_dir(out, root.name, defense)
            rows = list(csv.DictReader(open(run_dir / "suspicious.csv")))
            model = antibackdoor.load_model(run_dir / "model.safetensors")
            m = metrics.get("mask") or {}
            s = metrics["surplus"]
            found = "-" if s["target"] is None else f"{CLASSES[s['target']]} ({s['p']:.1g})"
            kind = case.partition("@")[0]
            asr = trigger_success(model, kind, target) if target is not None else None
            row = {"case": case, "defense": defense, "isolated": metrics["isolated"], "tpr": m.get("tpr"),
                   "fpr": m.get("fpr") if poisoned else metrics["isolated"] / metrics["train_size"],
                   "p100": precision_at(rows, poisoned, 100) if poisoned else None,
                   "p500": precision_at(rows, poisoned, 500) if poisoned else None, "auc": m.get("auc"),
                   "found": found, "acc": metrics["acc"], "ra": metrics["ra"], "asr": asr, "wall": wall,
                   "rss": rss, "precision": metrics.get("precision"), "run_dir": str(run_dir)}
            results.append(row)
            lines.append(f"| {case} | {defense} | {row['isolated']} | {pct(row['tpr'])} | {pct(row['fpr'])} | "
                         f"{pct(row['p100'])} | {pct(row['p500'])} | "
                         f"{'-' if row['auc'] is None else format(row['auc'], '.3f')} | "
                         f"{found} | {pct(row['acc'])} | {pct(row['ra'])} | {pct(asr)} | {wall:.0f} | {rss:.0f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    env_note += ", precision " + "/".join(sorted({str(r["precision"]) for r in results}))
    print(f"\n{table}\n\n({env_note})")
    (work / "defend_folders.md").write_text(table + f"\n\n({env_note})\n")
    (work / "defend_folders.json").write_text(json.dumps(results, indent=2))


def _run_dir(out: Path, name: str, defense: str) -> Path:
    """The newest run directory of this folder and defense (each run is --force'd, so it is this one)."""
    dirs = [d for d in out.iterdir() if d.name.startswith(f"{name}-defend-{defense}-")]
    return max(dirs, key=lambda d: (d / "metrics.json").stat().st_mtime)


if __name__ == "__main__":
    main()
