"""A run directory's state, as ``bench --status``, the plan and the report read it.

Stand-in for ``runpath.read_state`` (the one reader of a run directory's state, shared with ``run`` and
``defend``): when that lands, ``runner.py`` imports it from there instead and this module goes.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path


def read_state(run_dir: Path) -> str:
    """``done``, ``failed``, ``running``, ``interrupted``, ``interrupted (process N is gone)`` (status.json says
    running, but the process that wrote it no longer exists on this machine) or ``pending`` (never started)."""
    if (run_dir / "metrics.json").is_file():
        return "done"
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return "pending"
    state = status.get("state") if isinstance(status, dict) else None
    if state == "running":
        pid, host = status.get("pid"), status.get("host")
        same_host = host is None or host == socket.gethostname()
        if isinstance(pid, int) and same_host and not _alive(pid):
            return f"interrupted (process {pid} is gone)"
        return "running"
    return state if state in ("failed", "interrupted") else "pending"  # "done" without metrics.json: unfinished


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True
