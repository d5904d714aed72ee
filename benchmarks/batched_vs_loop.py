"""The one PGD engine's batched per-sample passes vs a batch-of-one loop (the official codes' way), same model
and data, in one run: A-ABL's split (``split``) and AIBD's flip counting (``flip``).

    python benchmarks/batched_vs_loop.py split [--epochs 5] [--loop-samples 0] [--threads 2]
    python benchmarks/batched_vs_loop.py flip [--epochs 10] [--loop-samples 300] [--cap 255] [--threads 2]

Both train the quick model ("cnn") briefly on BadNets-poisoned mini CIFAR-10, only so that the statistics are
those of a real model, then time both implementations and check that they agree (fp32; exact equality is tested
in float64 by the test suite).

- ``split``: iFGSM eps 2/255 x 5 steps with SCE over the training set; ``--loop-samples N`` times the loop on
  the first N samples only and extrapolates linearly (reported as such).
- ``flip``: unbounded PGD, step 1/255, early stop, ``--cap`` steps at most. An early-stopped attack's cost grows
  with k, so the loop (on ``--loop-samples`` random samples) is extrapolated to all N by its cost per attack step
  (one forward + backward, summed k_i + 1) times the batched run's total steps, and also reported per sample; the
  speed-up is the ratio of the per-step costs, in wall-clock and in this process's CPU time (the latter is what
  to quote on a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import time

import torch

import antibackdoor as ab
from antibackdoor.adversarial import PGDConfig, pgd_statistics
from antibackdoor.adversarial.reference import pgd_statistics_loop
from antibackdoor.seeding import seeded_rng
from antibackdoor.stages.aibd import flip_config, flip_counts
from antibackdoor.training import TrainConfig, train


def trained_model(epochs: int, crop: int):
    """The quick model trained ``epochs`` epochs on BadNets-poisoned mini CIFAR-10 (seconds taken), eval mode."""
    splits = ab.load_dataset("cifar10-mini")
    poisoned = ab.get_attack("badnets").poison(splits.train, 0.1, 0, ab.seeded(0))
    with seeded_rng(0, "benchmark"):
        model = ab.model_factory("cnn", splits.train)()
    t = time.perf_counter()
    train(model, poisoned.data, TrainConfig(epochs=epochs, optimizer="adam", lr=1e-3, crop=crop, flip=False))
    t_train = time.perf_counter() - t
    return model.to(memory_format=torch.contiguous_format).eval(), poisoned, t_train


def split(a: argparse.Namespace) -> None:
    model, poisoned, _ = trained_model(a.epochs, crop=4)
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


def flip(a: argparse.Namespace) -> None:
    model, poisoned, t_train = trained_model(a.epochs, crop=4)
    cfg = flip_config(1 / 255, a.cap)
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
    print(f"model: cnn trained {a.epochs} epochs on BadNets-poisoned cifar10-mini ({t_train:.0f} s); "
          f"threads: {a.threads}; fp32")
    never = int((batched.flip_step < 0).sum())
    print(f"attack: unbounded PGD, step 1/255, cap {a.cap}, early stop; mean k {k_b.double().mean():.2f} "
          f"(poisoned {k_b[poisoned.poison_mask].double().mean():.2f}), never flipped {never}")
    print(f"batched (batch {a.batch_size}): {n} samples, {steps_b} attack steps in {t_batched:.2f} s = "
          f"{1e3 * t_batched / n:.3f} ms/sample, {1e6 * per_step_b:.0f} us/step")
    print(f"batch-of-one loop: {m} random samples, {steps_l} attack steps in {t_loop:.2f} s = "
          f"{1e3 * t_loop / m:.3f} ms/sample, {1e6 * per_step_l:.0f} us/step")
    print(f"loop extrapolated to all {n} samples by steps: {per_step_l * steps_b:.1f} s "
          f"(by samples: {t_loop * n / m:.1f} s)")
    print(f"speed-up per attack step: {per_step_l / per_step_b:.1f}x; per sample: "
          f"{(t_loop / m) / (t_batched / n):.1f}x (wall clock)")
    cpu_ratio = (c_loop / steps_l) / (c_batched / steps_b)
    print(f"CPU time of this process: batched {c_batched:.1f} s, loop {c_loop:.1f} s; speed-up per attack "
          f"step {cpu_ratio:.1f}x (less sensitive to other jobs on the machine)")
    print(f"k agrees on {100 * agree:.2f}% and the adversarial label on {100 * label_agree:.2f}% of the "
          f"looped samples (fp32; exact equality is tested in float64)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pass_", metavar="PASS", choices=["split", "flip"], help="split (A-ABL) or flip (AIBD)")
    p.add_argument("--epochs", type=int, help="training epochs of the model (default: split 5, flip 10)")
    p.add_argument("--loop-samples", type=int, help="samples the loop times (0 = all; default: split 0, flip 300)")
    p.add_argument("--cap", type=int, default=255, help="flip: most PGD steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    defaults = {"split": (5, 0), "flip": (10, 300)}[a.pass_]
    a.epochs = defaults[0] if a.epochs is None else a.epochs
    a.loop_samples = defaults[1] if a.loop_samples is None else a.loop_samples
    {"split": split, "flip": flip}[a.pass_](a)


if __name__ == "__main__":
    main()
