"""The callable a Slurm (submitit) job runs: one grid cell, requeued on preemption or timeout.

Imported only by the slurm executor, since it needs submitit. ``checkpoint`` is what submitit calls when
the job is about to be stopped: it resubmits the same cell, which resumes from its per-epoch checkpoints.
"""

from __future__ import annotations

from typing import Any

import submitit

from .cell import run_cell


class CellJob(submitit.helpers.Checkpointable):
    def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        return run_cell(payload)

    def checkpoint(self, payload: dict[str, Any]) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(CellJob(), payload)
