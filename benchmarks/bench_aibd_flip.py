"""AIBD flip counting (unbounded PGD, step 1/255, early stop) batched vs a batch-of-one loop, same model and
data, in one run.

    python benchmarks/bench_aibd_flip.py [--epochs 10] [--loop-samples 300] [--cap 255] [--threads 2]

Trains the quick model ("cnn", A-ABL/AIBD quick recipe: Adam 1e-3, crop 4, no flip) on BadNets-poisoned
mini CIFAR-10 so that the flip counts are those of a real infected model, then attacks all N training
samples in batches and a random subset of ``--loop-samples`` of them one at a time (the official code's
way). The cost of an early-stopped attack grows with k, so the loop's cost is extrapolated to all N by its
cost per attack step (one forward + backward, summed k_i + 1 over the timed samples) times the batched run's
total steps, and also reported per sample; the speed-up is the ratio of the per-step costs, in wall-clock
and in this process's CPU time (the latter is what to quote on a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import time

import torch

import antibackdoor as ab
from antibackdoor.adversarial import pgd_statistics
from antibackdoor.adversarial.reference import pgd_statistics_loop
from antibackdoor.defenses.aibd import AIBDParams, flip_config, flip_counts
from antibackdoor.training import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--loop-samples", type=int, default=300)
    p.add_argument("--cap", type=int, default=255)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    splits = ab.load_dataset("cifar10-mini")
    poisoned = ab.get_attack("badnets").poison(splits.train, 0.1, 0, ab.seeded(0))
    torch.manual_seed(0)
    model = ab.model_factory("cnn", splits.train)()
    t = time.perf_counter()
    train(model, poisoned.data, TrainConfig(epochs=a.epochs, optimizer="adam", lr=1e-3, crop=4, flip=False))
    t_train = time.perf_counter() - t
    model = model.to(memory_format=torch.contiguous_format).eval()
    cfg = flip_config(AIBDParams(pgd_cap=a.cap))
    x, y = poisoned.data.x, poisoned.data.y
    n = len(y)

    t, c = time.perf_counter(), time.process_time()
    batched = pgd_statistics(model, x, y, cfg, batch_size=a.batch_size)
    t_batched, c_batched = time.perf_counter() - t, time.process_time() - c
    k_b = flip_counts(batched, a.cap)
    steps_b = int((k_b + 1).sum())

    m = min(a.loop_samples or n, n)
    idx = torch.randperm(n, generator=ab.seeded(1))[:m]
    t, c = time.perf_counter(), time.process_time()
    loop = pgd_statistics_loop(model, x[idx], y[idx], cfg)
    t_loop, c_loop = time.perf_counter() - t, time.process_time() - c
    k_l = flip_counts(loop, a.cap)
    steps_l = int((k_l + 1).sum())

    agree = float((k_b[idx] == k_l).float().mean())
    label_agree = float((batched.flip_label[idx] == loop.flip_label).float().mean())
    per_step_b, per_step_l = t_batched / steps_b, t_loop / steps_l
    t_loop_all = per_step_l * steps_b
    print(f"model: cnn trained {a.epochs} epochs on BadNets-poisoned cifar10-mini ({t_train:.0f} s); "
          f"threads: {a.threads}; fp32")
    never = int((batched.flip_step < 0).sum())
    print(f"attack: unbounded PGD, step 1/255, cap {a.cap}, early stop; mean k {k_b.double().mean():.2f} "
          f"(poisoned {k_b[poisoned.poison_mask].double().mean():.2f}), never flipped {never}")
    print(f"batched (batch {a.batch_size}): {n} samples, {steps_b} attack steps in {t_batched:.2f} s = "
          f"{1e3 * t_batched / n:.3f} ms/sample, {1e6 * per_step_b:.0f} us/step")
    print(f"batch-of-one loop: {m} random samples, {steps_l} attack steps in {t_loop:.2f} s = "
          f"{1e3 * t_loop / m:.3f} ms/sample, {1e6 * per_step_l:.0f} us/step")
    print(f"loop extrapolated to all {n} samples by steps: {t_loop_all:.1f} s "
          f"(by samples: {t_loop * n / m:.1f} s)")
    print(f"speed-up per attack step: {per_step_l / per_step_b:.1f}x; per sample: "
          f"{(t_loop / m) / (t_batched / n):.1f}x (wall clock)")
    cpu_ratio = (c_loop / steps_l) / (c_batched / steps_b)
    print(f"CPU time of this process: batched {c_batched:.1f} s, loop {c_loop:.1f} s; speed-up per attack "
          f"step {cpu_ratio:.1f}x (less sensitive to other jobs on the machine)")
    print(f"k agrees on {100 * agree:.2f}% and the adversarial label on {100 * label_agree:.2f}% of the "
          f"looped samples (fp32; exact equality is tested in float64)")


if __name__ == "__main__":
    main()
