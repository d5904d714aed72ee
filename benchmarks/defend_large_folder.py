"""Peak memory and time of loading a large image folder the way ``antibackdoor defend`` does.

    python benchmarks/defend_large_folder.py [--n 50000] [--dir /tmp/defend-large] [--keep] [--workers N]

Writes N 32x32 PNGs (the mini CIFAR-10 training images, tiled: flipped and shifted copies beyond the first
5,170) as class folders, then in fresh processes: imports the package (the baseline), loads the folder
with an empty cache (parallel decoding, cache written beside the data) and loads it again (from the cache).
Each load builds the training ImageSet as defend does. Reports wall time and peak RSS of the loading process
(and of its decoding workers), next to the size of the uint8 image array. Deletes the folder unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

MINI = Path(__file__).resolve().parents[1] / "src" / "antibackdoor" / "data" / "assets" / "cifar10_mini.npz"

PROBE = """
import json, resource, sys, time
t0 = time.time()
from antibackdoor.data.userdata import load_user_data
t1 = time.time()
if sys.argv[1] != "import":
    d = load_user_data("folder:" + sys.argv[2])
    n = len(d.train)
t2 = time.time()
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "peak_mib": self_kb / 1024,
                  "workers_peak_mib": child_kb / 1024}))
"""


def write_pngs(root: Path, n: int) -> float:
    t0 = time.time()
    with np.load(MINI) as f:
        x, y = f["x_train"], f["y_train"]
    for i in range(n):
        j = i % len(x)
        img = x[j]
        k = i // len(x)
        if k:
            img = np.roll(img[:, ::-1] if k % 2 else img, k, axis=(0, 1))
        d = root / f"class{y[j]}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img)).save(d / f"{i:06d}.png")
    return time.time() - t0


def probe(mode: str, root: Path, env_workers: str | None) -> dict:
    import os

    env = dict(os.environ, ANTIBACKDOOR_PROGRESS="0")
    if env_workers:
        env["ANTIBACKDOOR_DECODE_WORKERS"] = env_workers
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(root)], capture_output=True, text=True, env=env,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["wall_s"] = time.time() - t0
    return r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dir", default="/tmp/defend-large")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--workers", default=None, help="ANTIBACKDOOR_DECODE_WORKERS for the loads (default: CPUs)")
    a = p.parse_args()
    root = Path(a.dir)
    if root.exists():
        shutil.rmtree(root)
    try:
        t_write = write_pngs(root, a.n)
        size_mib = a.n * 32 * 32 * 3 / 2**20
        base = probe("import", root, a.workers)
        first = probe("load", root, a.workers)
        cache = next(root.glob("antibackdoor-cache-*.npz"))
        second = probe("load", root, a.workers)
        lines = [
            f"{a.n} PNGs of 32x32 written in {t_write:.0f} s; uint8 image array {size_mib:.0f} MiB; "
            f"cache file {cache.stat().st_size / 2**20:.0f} MiB",
            "| load | wall (s) | load (s) | peak RSS (MiB) | minus import | workers' peak RSS (MiB) |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in (("import only", base), ("first (decode + cache)", first), ("again (cache)", second)):
            lines.append(f"| {name} | {r['wall_s']:.1f} | {r['load_s']:.1f} | {r['peak_mib']:.0f} | "
                         f"{r['peak_mib'] - base['peak_mib']:.0f} | {r['workers_peak_mib']:.0f} |")
        print("\n".join(lines))
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
