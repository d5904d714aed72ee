"""A rough time estimate for a grid, printed before it starts.

The cost of a cell is counted in *sample passes* (one forward + backward pass of one training image):
every training stage its resolved defense config lists costs epochs x images x (1 + PGD steps of its
adversary), plus an allowance for scoring passes and the robust-accuracy evaluation, plus what the defense
says its loops do beyond that (``Defense.extra_passes``: semi-supervised steps over several views, scoring
every epoch). A pass of model M costs ``REF_SECONDS`` x MACs(M) / MACs(cnn). REF_SECONDS is the quick `cnn`
measured on the project's 2-core CPU (A-ABL's naive stage, 40 epochs x 5,170 images, ~85 s with 2 threads);
when cells of the grid have already finished, their measured times calibrate the estimate instead, per
defense where that defense has finished cells (``runner.estimate_plan``). Stages shared through the stage
cache (same poisoned data, same recipe; ``Defense.cached_stages`` names them) are counted once.
"""

from __future__ import annotations

import functools
import json
import statistics
from collections.abc import Mapping
from typing import Any

from ..models import build_model

#: seconds per sample pass of the quick `cnn` (32x32) with 2 threads (see the module docstring)
REF_SECONDS = 4.1e-4
REF_THREADS = 2


@functools.lru_cache(maxsize=64)
def model_macs(name: str, channels: int = 3, size: int = 32, classes: int = 10) -> float:
    """Multiply-accumulates of one forward pass (conv and linear layers), counted with hooks."""
    import torch
    from torch import nn


    model = build_model(name, classes, channels, size).eval()
    total = [0.0]

    def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total[0] += float(out.numel()) * k
        elif isinstance(mod, nn.Linear):
            total[0] += float(out.numel()) * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, channels, size, size))
    for h in handles:
        h.remove()
    return total[0]


def _train_configs(d: Any, prefix: str = "") -> list[tuple[str, dict]]:
    """(key, config) for every nested mapping that looks like a TrainConfig."""
    out: list[tuple[str, dict]] = []
    if isinstance(d, dict):
        if {"epochs", "batch_size", "optimizer"} <= set(d):
            return [(prefix, d)]
        for k, v in d.items():
            out += _train_configs(v, k)
    return out


def cell_passes(defense: dict[str, Any], n_train: int, n_test: int, ra_steps: int = 10,
                cached: Mapping[str, str] | None = None) -> tuple[float, list[tuple[str, float]]]:
    """Sample passes of one cell, and its shareable stages as (key, passes) pairs: the TrainConfigs that
    ``cached`` (``Defense.cached_stages``) names, keyed by the data they train on and their recipe."""
    total, shared, cached = 0.0, [], cached or {}
    for key, cfg in _train_configs(defense):
        adv = cfg.get("adversary") or {}
        cost = float(cfg.get("epochs", 0)) * n_train * (1 + float(adv.get("steps", 0)))
        if key in cached:
            # the stage cache matches data and recipe, not stage names: `none`'s "train" is A-ABL's "naive"
            shared.append((cached[key] + json.dumps(cfg, sort_keys=True, default=str), cost))
        total += cost
    total += 10 * n_train  # scoring passes (iFGSM split, flip counting): a rough allowance
    total += (1 + ra_steps) * n_test  # ACC, ASR and PGD-10 robust accuracy on the test set
    return total, shared


def seconds_per_pass(model: str, channels: int, size: int, classes: int, threads: int) -> float:
    ratio = model_macs(model, channels, size, classes) / model_macs("cnn", 3, 32, 10)
    return REF_SECONDS * ratio * REF_THREADS / max(1, threads)


def calibration(measured: list[tuple[float, float]]) -> float | None:
    """Median of measured / estimated seconds over finished cells (None when there are none)."""
    ratios = [m / e for m, e in measured if e > 0 and m > 0]
    return statistics.median(ratios) if ratios else None


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
