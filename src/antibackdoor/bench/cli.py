"""The ``bench`` and ``suites`` commands (registered by antibackdoor.cli)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..jsonutil import write_json
from . import estimate as est
from .executors import LocalExecutor, RayExecutor, SlurmExecutor
from .grid import Grid
from .runner import (
    Plan,
    Planned,
    cell_state,
    check_methods,
    estimate_plan,
    interleave,
    load_grid,
    make_plan,
    print_skipped,
    print_status,
    restrict,
    write_manifest,
)
from .stage_cache import cache_hits, default_stage_cache_dir, saved_seconds
from .suites import SUITES


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_parsers(sub: Any) -> None:
    b = sub.add_parser("bench", help="run a grid of experiments (a named suite or a grid YAML file)",
                       description="Run every cell of a suite or grid that is not done yet under --out; "
                                   "finished cells are reused, failed ones retried, interrupted ones resumed.")
    b.add_argument("spec", metavar="SUITE|GRID.yaml", help="a suite (antibackdoor suites lists them) or a grid file")
    b.add_argument("--preset", choices=["quick", "paper"], help="suite size / experiment preset (default quick)")
    b.add_argument("--seeds", type=_int_list, help="comma-separated seeds (default: the suite's, 0)")
    b.add_argument("--targets", type=_int_list, help="comma-separated target classes (default: the suite's, 0,3,7)")
    for axis in ("attacks", "defenses", "datasets", "models"):
        b.add_argument(f"--{axis}", type=_str_list, metavar="A,B",
                       help=f"run only these {axis} of the grid (names or labels; attack 'none' is clean data)")
    b.add_argument("--out", default="runs", help="folder of run directories (default runs); bench/ holds manifests")
    b.add_argument("--executor", choices=["local", "ray", "slurm"], default="local", help="where cells run")
    b.add_argument("--workers", type=int, default=1,
                   help="cells at a time (local processes; Ray: a local cluster's size; Slurm: array parallelism)")
    b.add_argument("--threads", type=int, help="torch threads per local worker (default: cores / workers)")
    b.add_argument("--status", action="store_true", help="print done / failed / pending cells and exit")
    b.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate; run nothing")
    b.add_argument("--skip-failed", action="store_true", help="do not retry cells that failed before")
    b.add_argument("--stage-cache", metavar="DIR",
                   help="trained stage models shared by cells (default <data root>/cache/stages)")
    b.add_argument("--no-stage-cache", action="store_true", help="train every stage in every cell")
    g = b.add_argument_group("ray")
    g.add_argument("--ray-address", help="an existing Ray cluster (e.g. auto, ray://host:10001); default: start one")
    g.add_argument("--cpus-per-cell", type=float, default=1.0, help="Ray CPUs per cell (default 1)")
    g.add_argument("--gpus-per-cell", type=float, default=0.0, help="Ray GPUs per cell, fractions allowed (0.25)")
    g.add_argument("--retries", type=int, default=2, help="Ray retries of a cell whose worker died (default 2)")
    s = b.add_argument_group("slurm")
    s.add_argument("--slurm-partition", help="Slurm partition")
    s.add_argument("--gpus-per-task", type=int, default=0, help="GPUs per cell's job (default 0)")
    s.add_argument("--cpus-per-task", type=int, default=2, help="CPUs per cell's job (default 2)")
    s.add_argument("--time", default="4:00:00", help="time limit per job, minutes or [D-]H:MM:SS (default 4:00:00)")
    s.add_argument("--slurm-cluster", choices=["slurm", "local", "debug"], default="slurm",
                   help=argparse.SUPPRESS)  # submitit's local executor, for tests and machines without Slurm

    sub.add_parser("suites", help="list the named bench suites (the papers' tables)")


def check_options(args: argparse.Namespace) -> None:
    """The bench's numeric options and that the executor is installed: checked before the plan, so a bad value
    never leaves a manifest or a run directory behind."""
    def need(ok: bool, option: str, value: Any, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{option} {value:g}: {rule}" if isinstance(value, float) else
                              f"{option} {value}: {rule}")

    need(args.workers >= 1, "--workers", args.workers, "must be >= 1")
    need(args.threads is None or args.threads >= 1, "--threads", args.threads, "must be >= 1 (left out: cores / "
                                                                                "workers)")
    need(args.retries >= 0, "--retries", args.retries, "must be >= 0")
    need(math.isfinite(args.cpus_per_cell) and args.cpus_per_cell > 0, "--cpus-per-cell", args.cpus_per_cell,
         "must be a number > 0")
    need(math.isfinite(args.gpus_per_cell) and args.gpus_per_cell >= 0, "--gpus-per-cell", args.gpus_per_cell,
         "must be a number >= 0")
    need(args.gpus_per_task >= 0, "--gpus-per-task", args.gpus_per_task, "must be >= 0")
    need(args.cpus_per_task >= 1, "--cpus-per-task", args.cpus_per_task, "must be >= 1")
    module = {"ray": "ray", "slurm": "submitit"}.get(args.executor)
    if module is not None and sys.modules.get(module) is None and importlib.util.find_spec(module) is None:
        raise ConfigError(f"--executor {args.executor}: {module} is not installed "
                          f"(pip install 'antibackdoor[{args.executor}]')")


def make_executor(args: argparse.Namespace, out: Path) -> Any:
    check_options(args)
    if args.executor == "ray":
        return RayExecutor(args.ray_address, args.workers, args.cpus_per_cell, args.gpus_per_cell, args.retries)
    if args.executor == "slurm":
        return SlurmExecutor(out / "bench" / "slurm", args.slurm_partition, args.gpus_per_task, args.time,
                             args.cpus_per_task, args.workers, args.slurm_cluster)
    return LocalExecutor(args.workers, args.threads)


def _threads(executor: Any) -> int:
    t = getattr(executor, "threads", 2)
    return t() if callable(t) else int(getattr(executor, "cpus", t) or 2)


def cmd_suites(args: argparse.Namespace) -> int:

    for s in SUITES.values():
        print(f"  {s.name:<10} {s.source:<14} {s.title}")

        for preset in s.grids:
            grid = Grid.from_dict(s.grid_dict(preset))
            cells = grid.cells()
            kept, missing = check_methods(cells, preset)
            note = "; missing: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in missing.items()) if missing else ""
            print(f"  {'':<10} {preset:<6} {len(kept)} of {len(cells)} cells runnable{note}")
    return 0


class Stopped(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, Docker, Kubernetes, Slurm preemption), handled as Ctrl-C is."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the bench runs, SIGTERM raises ``Stopped`` (a KeyboardInterrupt) in the main thread, once: the
    workers are stopped, their cells recorded as interrupted and the resume hint printed, as for Ctrl-C. A
    second SIGTERM during that cleanup is ignored (SIGKILL still ends the process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum: int, frame: Any) -> None:
        if not fired:
            fired.append(signum)
            raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process ended by it: 130 Ctrl-C, 143 SIGTERM."""
    return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)


def cmd_bench(args: argparse.Namespace) -> int:
    with sigterm_as_interrupt():
        try:
            return _bench(args)
        except KeyboardInterrupt as exc:  # before any cell started (planning); _execute handles the rest
            print("antibackdoor: bench interrupted before any cell ran; run the same command again to start it",
                  file=sys.stderr)
            return _exit_code(exc)


def _bench(args: argparse.Namespace) -> int:
    grid, suite = load_grid(args.spec, args.preset)
    grid = restrict(grid, args.seeds, args.targets, {"attacks": args.attacks, "defenses": args.defenses,
                                                     "datasets": args.datasets, "models": args.models})
    out = Path(args.out).expanduser()
    executor = make_executor(args, out)
    plan = make_plan(grid, suite, out, _threads(executor))
    if args.status:
        print_status(plan)
        return 0
    title = f"{suite.source}: {suite.title}" if suite else f"grid {grid.name}"
    todo = [p for p in plan.cells if p.state in ("pending", "running", "interrupted")
            or (p.state == "failed" and not args.skip_failed)]
    if todo and not args.dry_run:
        executor.connect()  # Ray: reach the cluster and check its resources, or one line and exit 2
    try:
        return _run_plan(args, plan, todo, executor, out, title)
    finally:
        executor.close()


def _run_plan(args: argparse.Namespace, plan: Plan, todo: list[Planned], executor: Any, out: Path,
              title: str) -> int:
    print(f"bench {plan.name} ({plan.preset}) - {title}", file=sys.stderr)
    print(f"  {len(plan.cells)} cells: {plan.count('done')} done, {plan.count('failed')} failed before, "
          f"{len(todo)} to run; out: {out}", file=sys.stderr)
    print_skipped(plan, sys.stderr)
    seconds, how = estimate_plan(plan, todo, args.workers)
    print(f"  estimate: about {est.fmt_duration(seconds)} with {executor.describe()} ({how})", file=sys.stderr)
    if args.dry_run:  # writes nothing: no manifest, no run directory
        for p in todo:
            print(f"  would run: {_label(p)}  -> {p.run_dir}")
        return 0
    if not todo:
        done = plan.count("done")
        what = ("every cell is done" if done == len(plan.cells) else
                f"{done} cell(s) done, {plan.count('failed')} failed and left alone (--skip-failed)")
        write_manifest(out, plan)
        print(f"  nothing to run: {what} (antibackdoor report {out})", file=sys.stderr)
        return 0
    write_manifest(out, plan)
    cache = None if args.no_stage_cache else (args.stage_cache or str(_default_cache()))
    todo = interleave(todo)
    results, stopped = _execute(executor, todo, cache)
    for i, r in results.items():
        p = todo[i]
        p.state = {"busy": "running", "done": "done", "interrupted": "interrupted"}.get(r.get("state"), "failed")
        p.error = r.get("error") if p.state == "failed" else None
        if r.get("run_dir"):
            p.run_dir = Path(r["run_dir"])
    if stopped is not None:
        return _stopped(executor, plan, todo, results, out, stopped)
    write_manifest(out, plan)
    failed = [p for p in todo if p.state == "failed"]
    busy = [p for p in todo if p.state == "running"]
    cut = [p for p in todo if p.state == "interrupted"]
    hits = [e for r in results.values() for e in cache_hits(r)]
    saved = saved_seconds(hits)
    print(f"bench {plan.name}: {len(todo) - len(failed) - len(busy) - len(cut)} of {len(todo)} cells done, "
          f"{len(failed)} failed" + (f", {len(cut)} interrupted" if cut else "")
          + (f", {len(busy)} busy elsewhere" if busy else "")
          + (f"; stage cache: {len(hits)} stage(s) loaded instead of trained, {est.fmt_duration(saved)} saved"
             if cache else ""), file=sys.stderr)
    for p in failed:
        print(f"  failed: {_label(p)}: {p.error}", file=sys.stderr)
    for p in cut:
        print(f"  interrupted: {_label(p)} (its worker was stopped; the same command resumes it)", file=sys.stderr)
    print(f"  report: antibackdoor report {out}", file=sys.stderr)
    return 1 if failed or cut else 0


def _stopped(executor: Any, plan: Plan, todo: list[Planned], results: dict[int, dict[str, Any]], out: Path,
             exc: KeyboardInterrupt) -> int:
    """Ctrl-C or SIGTERM: the workers are stopped; a cell whose run directory still says running for a process
    that is gone is recorded as interrupted (its worker could not say so itself), the manifest is written and
    the resume hint printed."""
    for i, p in enumerate(todo):
        if i in results:
            continue
        if executor.local:  # cells of Ray or Slurm may go on elsewhere: their state is theirs to write
            _record(p.run_dir, "interrupted", "the bench was stopped")
        st = cell_state(p.run_dir) if p.run_dir.is_dir() else None
        if st is not None:
            p.state, p.shown = st.state, st.shown
    write_manifest(out, plan)
    how = "stopped by SIGTERM" if isinstance(exc, Stopped) else "interrupted"
    print(f"antibackdoor: bench {how} after {len(results)} of {len(todo)} cells; run the same command again to "
          "continue (finished cells are kept, interrupted ones resume from their checkpoints)", file=sys.stderr)
    return _exit_code(exc)


def _default_cache() -> Path:

    return default_stage_cache_dir()


def _label(p: Planned) -> str:
    a = p.cell.axes
    parts = [a["dataset"], a["attack"], a["defense"], str(a["model"])]
    if a["attack_name"] != "none":
        parts.append(f"rate {a['poison_rate']:g}")
        parts.append(f"target {a['target']}")
    parts.append(f"seed {a['seed']}")
    return " / ".join(parts)


def summary_line(m: dict[str, Any]) -> str:
    """A finished cell's headline numbers (%); ACC/ASR/RA read n/a where no stage trained the final model
    (split-only cells: their untrained model's numbers would mean nothing). gamma and rho_vul only where the
    defense isolated samples: for one that does not split (``none``, NAD) they would just restate the data
    (100 % kept, the poison rate)."""
    parts = []
    split = (m.get("isolated") or 0) > 0
    for k in ("acc", "asr", "ra", "gamma", "rho_vul"):
        v = m.get(k)
        if k in ("acc", "asr", "ra") and m.get("model_trained") is False:
            parts.append(f"{k.upper()} n/a")
        elif isinstance(v, float) and (split or k not in ("gamma", "rho_vul")):
            parts.append(f"{k.upper()} {100 * v:.1f}")
    return " ".join(parts)


class _Progress:
    """A bar over cells with an ETA (on a terminal), and one line per finished cell."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.time()
        self.bar = None
        if sys.stderr.isatty() and os.environ.get("ANTIBACKDOOR_PROGRESS", "1") != "0":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="cells", unit="cell", file=sys.stderr, dynamic_ncols=True)

    def finish(self, p: Planned, r: dict[str, Any]) -> None:
        self.done += 1
        elapsed = time.time() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        shown = summary_line(r.get("metrics") or {})
        state = r.get("state", "failed")
        what = shown if state == "done" else (r.get("error") or "")
        line = (f"[{self.done}/{self.total}] {state} {_label(p)} ({r.get('seconds', 0):.0f} s) {what} | "
                f"elapsed {est.fmt_duration(elapsed)}, ETA {est.fmt_duration(eta)}")
        if self.bar is not None:
            self.bar.write(line)
            self.bar.update(1)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _execute(executor: Any, todo: list[Planned], cache: str | None,
             ) -> tuple[dict[int, dict[str, Any]], KeyboardInterrupt | None]:
    """Run the cells; returns their results and, when the bench was stopped (Ctrl-C, SIGTERM), how."""
    payloads = [{"config": {**p.cell.config, "out": str(p.run_dir.parent)}, "run_dir": str(p.run_dir),
                 "stage_cache": cache} for p in todo]
    results: dict[int, dict[str, Any]] = {}
    progress = _Progress(len(todo))

    def on_result(i: int, r: dict[str, Any]) -> None:
        results[i] = r
        if r.get("state") == "failed":
            _record(todo[i].run_dir, "failed", r.get("error") or "failed")
        progress.finish(todo[i], r)

    try:
        executor.run(payloads, on_result)
    except KeyboardInterrupt as exc:
        progress.close()
        return results, exc
    progress.close()
    return results, None


def _record(run_dir: Path, state: str, error: str) -> None:
    """A failure or an interruption the cell could not record itself (its worker died or was stopped, its job
    was lost) goes into its status.json, so that --status and the report show it. What the cell wrote itself
    (done, failed, interrupted) and a cell running in a live process are left as they are."""
    if not run_dir.is_dir():
        return
    shown = cell_state(run_dir).shown
    if shown == "pending" or shown.startswith("interrupted (process"):
        write_json(run_dir / "status.json", {"state": state, "error": error})


__all__ = ["Plan", "add_parsers", "cmd_bench", "cmd_suites"]
