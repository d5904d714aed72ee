"""Triggers that no attack module implements, written into the data outside the tool as a user's poisoned data
set would be, and the evaluation only the benchmark may do (it alone knows the poison).

Shared by ``bench_aibd_targets.py``, ``bench_baselines.py`` and ``bench_detectors.py`` (attack names
``own-patch`` and ``own-blend``): a 3-colour plus-shaped patch near the top-right corner, and smooth coloured noise
(an 8 x 8 Gaussian field upsampled to the image) blended at alpha 0.12. ``rate`` of the training samples outside
the target class get the trigger and the target label (dirty label); the result is saved as
``OUT/data/<dataset>-<trigger>-t<T>.npz`` and run with ``--dataset npz:... --attack none``. The runner cannot
evaluate isolation or ASR there (with ``--attack none`` it knows of no poison), so ``evaluate`` computes TPR/FPR
from the run's ``isolation.csv`` (column ``kept``, rows in training order) and ASR from its
``model.safetensors``; ACC is the runner's (the npz keeps the clean test split).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from antibackdoor.data.imageset import ImageSet
from antibackdoor.data.registry import load_dataset
from antibackdoor.metrics import attack_success_rate
from antibackdoor.models.io import load_model

OWN = ("own-patch", "own-blend")


def own_patch(x: np.ndarray) -> np.ndarray:
    """A plus sign of three colours near the top-right corner (NHWC uint8), its size scaled with the image."""
    out = x.copy()
    h, w = x.shape[1:3]
    s = max(5, round(w * 5 / 32)) // 2 * 2 + 1  # odd arm length
    r0, c0 = max(1, h // 16), w - s - max(1, w // 16)
    colours = np.array([[255, 40, 40], [40, 255, 40], [40, 40, 255]], np.uint8)[:, : x.shape[3]]
    mid = s // 2
    for i in range(s):
        out[:, r0 + mid, c0 + i] = colours[i % 3]
        out[:, r0 + i, c0 + mid] = colours[(i + 1) % 3]
    return out


def own_blend(x: np.ndarray, alpha: float = 0.12, seed: int = 1234) -> np.ndarray:
    """Smooth coloured noise: an 8 x 8 Gaussian field per channel, bilinearly upsampled, blended at ``alpha``."""
    h, w, c = x.shape[1:]
    field = torch.from_numpy(np.random.default_rng(seed).normal(0.5, 0.3, (1, c, 8, 8)).astype(np.float32))
    pattern = torch.nn.functional.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)
    pattern = pattern.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255.0
    return np.clip((1 - alpha) * x.astype(np.float32) + alpha * pattern, 0, 255).round().astype(np.uint8)


TRIGGERS = {"own-patch": own_patch, "own-blend": own_blend}


@dataclass
class OwnData:
    """A poisoned npz written here, with what only the evaluation may know."""

    path: Path
    poison: np.ndarray  # bool over the training samples
    triggered: ImageSet  # test images outside the target class with the trigger, labelled with the target

    @property
    def dataset(self) -> str:
        """The run's ``--dataset``."""
        return f"npz:{self.path}"


def nhwc(s: ImageSet) -> np.ndarray:
    return s.x.cpu().permute(0, 2, 3, 1).numpy()


def write_own(dataset: str, trigger: str, target: int, rate: float, seed: int, out: Path) -> OwnData:
    """Poison ``rate`` of the training data (drawn outside the target class) with ``trigger``, dirty label."""
    splits = load_dataset(dataset)
    train, test = splits.train, splits.test
    x, y = nhwc(train), train.y.cpu().numpy().copy()
    rng = np.random.default_rng([seed, target, sum(map(ord, trigger))])
    pool = np.flatnonzero(y != target)
    chosen = rng.choice(pool, size=round(rate * len(y)), replace=False)
    apply = TRIGGERS[trigger]
    x[chosen] = apply(x[chosen])
    y[chosen] = target
    poison = np.zeros(len(y), bool)
    poison[chosen] = True
    path = out / "data" / f"{re.sub(r'[^A-Za-z0-9]+', '-', dataset).strip('-')}-{trigger}-t{target}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x_train=x, y_train=y, x_test=nhwc(test), y_test=test.y.cpu().numpy())
        tmp.replace(path)
    keep = (test.y != target).cpu()
    tx = torch.from_numpy(apply(nhwc(test)[keep.numpy()])).permute(0, 3, 1, 2).contiguous()
    triggered = ImageSet(tx, torch.full((len(tx),), target, dtype=torch.long), test.classes, test.mean, test.std,
                         f"{dataset} + {trigger}")
    return OwnData(path, poison, triggered)


def _isolation_table(run_dir: Path) -> tuple[list[str], np.ndarray]:
    """isolation.csv as (header, rows as a string array), rows in training order."""
    with open(run_dir / "isolation.csv") as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], dtype=object)


def read_isolation(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, kept, is_poison) from isolation.csv, in training order (scores NaN where the defense has none)."""
    _, body = _isolation_table(run_dir)
    scores = np.array([float(v) if v != "" else np.nan for v in body[:, 1]])
    return scores, body[:, 2].astype(int).astype(bool), body[:, 3].astype(int).astype(bool)


def read_flags(run_dir: Path) -> dict[str, np.ndarray]:
    """The per-sample flag columns of isolation.csv (after the fixed ones and ``new_label``), as bool arrays."""
    header, body = _isolation_table(run_dir)
    return {name: body[:, j].astype(int).astype(bool) for j, name in enumerate(header)
            if j >= 5 and name != "new_label"}


def tpr_fpr(kept: np.ndarray, poison: np.ndarray) -> tuple[float, float]:
    iso = ~kept
    tpr = float((iso & poison).sum() / max(poison.sum(), 1))
    fpr = float((iso & ~poison).sum() / max((~poison).sum(), 1))
    return tpr, fpr


def evaluate(run_dir: Path, own: OwnData) -> dict:
    """A finished run on ``own``'s data: its metrics with TPR, FPR and ASR filled in from the ground truth.

    A defense that asks for trusted data (NAD) gets its slice from this data, which the runner takes for clean:
    ``trusted_poison`` counts the poisoned samples in it (the user handing in poisoned data has no clean slice).
    """
    m = json.loads((run_dir / "metrics.json").read_text())
    _, kept, _ = read_isolation(run_dir)
    poison = own.poison
    trusted = run_dir / "trusted.json"
    if trusted.is_file():  # the runner took a "trusted" slice out of the data first: here it may hold poison
        in_slice = np.zeros(len(poison), bool)
        in_slice[json.loads(trusted.read_text())["index"]] = True
        m["trusted_poison"] = int((in_slice & poison).sum())
        poison = poison[~in_slice]
    m["tpr"], m["fpr"] = tpr_fpr(kept, poison)
    m["isolated"], m["isolated_poison"] = int((~kept).sum()), int((~kept & poison).sum())
    for name, flagged in read_flags(run_dir).items():  # e.g. a-abl+'s purge: how many of its samples are poison
        m.setdefault("sample_flags", {})[name] = {"samples": int(flagged.sum()),
                                                  "poison": int((flagged & poison).sum())}
    m["asr"] = attack_success_rate(load_model(run_dir / "model.safetensors"), own.triggered)
    return m


__all__ = ["OWN", "TRIGGERS", "OwnData", "evaluate", "own_blend", "own_patch", "read_flags", "read_isolation",
           "tpr_fpr", "write_own"]
