"""The callable a Slurm (submitit) job runs: one grid cell, requeued on preemption or timeout.

submitit is an optional dependency (the ``slurm`` extra), so the job's class is made when the slurm executor
asks for one (``cell_job``), not when the package is imported. ``checkpoint`` is what submitit calls when the job
is about to be stopped: it resubmits the same cell, which resumes from its per-epoch checkpoints.
"""

from __future__ import annotations

from typing import Any

from .cell import run_cell


def cell_job() -> Any:
    """A submitit job that runs one cell (its payload) and requeues itself when stopped."""
    import submitit  # the optional dependency: only the slurm executor needs it

    class CellJob(submitit.helpers.Checkpointable):
        def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
            return run_cell(payload)

        def checkpoint(self, payload: dict[str, Any]) -> submitit.helpers.DelayedSubmission:
            return submitit.helpers.DelayedSubmission(CellJob(), payload)

    return CellJob()
