"""Batched A-ABL split pass (iFGSM-5 + SCE over the training set) vs a batch-of-one loop, same model and data.

    python benchmarks/bench_split.py [--epochs 5] [--loop-samples 0] [--threads 2]

Trains the quick model briefly on BadNets-poisoned mini CIFAR-10 (only so that the statistics are those of
a real model), then times both implementations and checks that they agree. ``--loop-samples N`` times
the loop on the first N samples only and extrapolates linearly (reported as such).
"""

from __future__ import annotations

import argparse
import time

import torch

import antibackdoor as ab
from antibackdoor.adversarial import PGDConfig, pgd_statistics
from antibackdoor.adversarial.reference import pgd_statistics_loop
from antibackdoor.training import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--loop-samples", type=int, default=0, help="0 = all samples")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    splits = ab.load_dataset("cifar10-mini")
    poisoned = ab.get_attack("badnets").poison(splits.train, 0.1, 0, ab.seeded(0))
    torch.manual_seed(0)
    model = ab.model_factory("cnn", splits.train)()
    train(model, poisoned.data, TrainConfig(epochs=a.epochs, optimizer="adam", lr=1e-3, flip=False))
    model = model.to(memory_format=torch.contiguous_format).eval()
    cfg = PGDConfig.ifgsm(2 / 255, 5, loss="sce")
    x, y = poisoned.data.x, poisoned.data.y
    n = len(y)
    t = time.perf_counter()
    batched = pgd_statistics(model, x, y, cfg, batch_size=a.batch_size)
    t_batched = time.perf_counter() - t
    m = a.loop_samples or n
    t = time.perf_counter()
    loop = pgd_statistics_loop(model, x[:m], y[:m], cfg)
    t_loop = (time.perf_counter() - t) * n / m
    agree = float((batched.flip_step[:m] == loop.flip_step).float().mean())
    max_diff = float((batched.loss[:m] - loop.loss).abs().max())
    print(f"samples: {n}, threads: {a.threads}, model: cnn, iFGSM eps 2/255 x 5 steps, SCE")
    print(f"batched (batch {a.batch_size}): {t_batched:.2f} s  ({n / t_batched:.0f} samples/s)")
    extra = "" if m == n else f" (timed on {m}, extrapolated to {n})"
    print(f"batch-of-one loop: {t_loop:.2f} s{extra}")
    print(f"speed-up: {t_loop / t_batched:.1f}x; flip steps agree on {100 * agree:.2f}%, max |loss diff| "
          f"{max_diff:.2e} (fp32)")


if __name__ == "__main__":
    main()
