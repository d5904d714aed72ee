"""Running one grid cell in a worker (a local process, a Ray task or a Slurm job).

A cell is an ordinary run: same config, same run directory, same content hash as ``antibackdoor run``.
It always runs with ``resume``: a cell interrupted by a killed worker, a preemption or a crash continues
from its checkpoints. Errors never escape: the worker returns them, so one failing cell does not stop the
others. A lock on the run directory makes a second worker that is handed the same cell (two benches on one
``--out``, a requeued Slurm job whose first copy still runs) report it as busy instead of running it twice.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from pathlib import Path
from typing import Any

from ..experiment import make_config, run_experiment
from ..locking import try_lock
from .stage_cache import StageCache

#: metrics copied into a cell's result for the progress lines
SUMMARY = ("acc", "asr", "ra", "gamma", "rho_vul", "tpr", "fpr", "isolated", "model_trained")


def set_threads(threads: int | None) -> None:
    """Use ``threads`` torch threads in this process (None: leave torch's default)."""
    if not threads:
        return
    import torch

    torch.set_num_threads(int(threads))
    with contextlib.suppress(RuntimeError):  # only allowed before the first parallel work
        torch.set_num_interop_threads(max(1, int(threads)))


def run_cell(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one cell; returns ``{"state": "done"|"failed"|"busy", ...}`` and never raises (but on Ctrl-C).

    ``payload``: ``config`` (ExperimentConfig dict incl. ``out``), ``run_dir`` (where it will be),
    ``threads``, ``stage_cache`` (a folder or None).
    """
    os.environ.setdefault("ANTIBACKDOOR_PROGRESS", "0")
    set_threads(payload.get("threads"))
    t0 = time.time()
    run_dir = Path(payload["run_dir"])
    lock_path = run_dir.parent / ".locks" / f"{run_dir.name}.lock"
    with try_lock(lock_path) as held:
        if held is False:
            return {"state": "busy", "run_dir": str(run_dir), "seconds": 0.0,
                    "error": "another worker is running this cell"}
        try:
            return _run(payload, t0)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a cell's failure is data, not a crash of the bench
            return {"state": "failed", "run_dir": str(run_dir), "seconds": round(time.time() - t0, 1),
                    "error": _describe(exc), "traceback": traceback.format_exc(limit=8)}


def _run(payload: dict[str, Any], t0: float) -> dict[str, Any]:

    cfg = make_config(dict(payload["config"]), where="cell")
    cache = StageCache(payload["stage_cache"]) if payload.get("stage_cache") else None
    result = run_experiment(cfg, resume=True, stage_cache=cache)
    m = result.metrics
    return {"state": "done", "run_dir": str(result.run_dir), "seconds": round(time.time() - t0, 1),
            "reused": result.reused, "metrics": {k: m.get(k) for k in SUMMARY},
            "stage_cache": m.get("stage_cache", [])}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
