"""Where grid cells run: local worker processes (default), a Ray cluster, or Slurm job arrays (submitit).

Every executor takes the cells' payloads (see cell.run_cell) and calls ``on_start(i)`` / ``on_result(i,
result)`` in the bench process as cells begin and end. A cell's own errors come back as results; an
executor only produces a failure itself when a worker dies (killed, out of memory) or a job is lost.
Ray and submitit are optional extras (``pip install antibackdoor[ray]`` / ``[slurm]``); the local executor
needs neither.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .cell import run_cell, set_threads
from .slurm_job import cell_job

log = logging.getLogger("antibackdoor")

OnResult = Callable[[int, dict[str, Any]], None]
OnStart = Callable[[int], None]


def available_cores() -> int:
    """Cores this process may use (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def split_threads(workers: int, threads: int | None = None, cores: int | None = None) -> int:
    """Torch threads per worker so that workers x threads <= cores (at least 1); ``threads`` given: that."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads}: must be >= 1 (left out: cores / workers)")
        return int(threads)
    return max(1, (cores or available_cores()) // max(1, workers))


def _failure(error: str) -> dict[str, Any]:
    return {"state": "failed", "error": error, "seconds": 0.0}


# -- local ---------------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM to this worker when the bench process dies (even by SIGKILL),
    so no orphan keeps training a cell that the next bench would start again."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop_on_sigterm() -> None:
    """SIGTERM (the bench stopping its workers, ``kill``, a group signal from ``timeout`` or Slurm) raises
    KeyboardInterrupt once, as Ctrl-C would: the cell's run records itself as interrupted and resumes from its
    checkpoints next time. A second SIGTERM while it does so is ignored; the bench uses SIGKILL if it hangs."""
    fired = []

    def handler(signum: int, frame: Any) -> None:
        if not fired:
            fired.append(signum)
            raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)


def _worker_main(conn: Connection, threads: int) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the bench's to handle: it stops the workers
    _stop_on_sigterm()
    set_threads(threads)
    index, result = None, None
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg is None:
                return
            index, payload = msg
            result = run_cell({**payload, "threads": threads})
            conn.send((index, result))
            index, result = None, None
    except KeyboardInterrupt as exc:  # stopped: say which cell was cut off (if any), then end
        if index is not None:
            if result is None:
                result = {"state": "interrupted", "error": str(exc) or "interrupted", "seconds": 0.0}
            with contextlib.suppress(OSError, ValueError):
                conn.send((index, result))


@contextlib.contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    """OpenMP/MKL thread counts for processes started inside the block (read when torch loads there)."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: str(threads) for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class LocalExecutor:
    """``workers`` processes on this machine with ``threads`` torch threads each (default: cores / workers).

    Workers are started once and handed one cell at a time, so the bench always knows which cell each runs:
    a worker that dies is recorded as that cell's failure and replaced. Ctrl-C or the bench's death stops
    every worker (their cells resume from checkpoints next time).
    """

    name = "local"
    local = True  # cells run on this machine: a process that is gone will not come back
    #: seconds a stopped worker has to record its cell as interrupted before it is killed
    grace_s = 10.0

    def __init__(self, workers: int = 1, threads: int | None = None):
        if workers < 1:
            raise ConfigError(f"--workers {workers}: must be >= 1")
        self.workers = workers
        self.threads = split_threads(workers, threads)

    def describe(self) -> str:
        return f"local: {self.workers} worker(s) x {self.threads} thread(s)"

    def connect(self) -> None:
        """Nothing to reach (Ray's connects to its cluster here)."""

    def close(self) -> None:
        """Nothing to release."""

    def run(self, payloads: list[dict[str, Any]], on_result: OnResult, on_start: OnStart | None = None) -> None:
        ctx = mp.get_context("spawn")
        queue = deque(range(len(payloads)))
        workers: dict[int, dict[str, Any]] = {}

        def start(wid: int) -> None:
            parent, child = ctx.Pipe()
            with _thread_env(self.threads):
                proc = ctx.Process(target=_worker_main, args=(child, self.threads), daemon=True,
                                   name=f"antibackdoor-worker-{wid}")
                proc.start()
            child.close()
            workers[wid] = {"proc": proc, "conn": parent, "cell": None, "retiring": False}

        for wid in range(min(self.workers, len(queue))):
            start(wid)
        try:
            while queue or any(w["cell"] is not None for w in workers.values()):
                for w in workers.values():
                    if w["cell"] is None and queue and w["proc"].is_alive() and not w["retiring"]:
                        i = queue.popleft()
                        w["conn"].send((i, payloads[i]))
                        w["cell"] = i
                        if on_start:
                            on_start(i)
                waitables = [w["conn"] for w in workers.values()] + [w["proc"].sentinel for w in workers.values()]
                wait_any(waitables, timeout=1.0)
                for wid, w in list(workers.items()):
                    self._collect(wid, w, on_result)
                    if w["retiring"] and w["cell"] is None:
                        w["proc"].join(timeout=self.grace_s)  # stopped by SIGTERM: it is ending
                    if not w["proc"].is_alive() and w["cell"] is None:
                        w["conn"].close()
                        del workers[wid]
                        if queue:
                            start(wid)
        finally:
            self._stop(workers)

    def _collect(self, wid: int, w: dict[str, Any], on_result: OnResult) -> None:
        conn = w["conn"]
        try:
            while conn.poll():
                i, result = conn.recv()
                w["cell"] = None
                w["retiring"] = w["retiring"] or result.get("state") == "interrupted"
                on_result(i, result)
        except (EOFError, OSError):
            pass
        if w["cell"] is not None and not w["proc"].is_alive():
            code = w["proc"].exitcode
            i, w["cell"] = w["cell"], None
            on_result(i, _failure(f"worker process died (exit code {code}); the cell resumes from its "
                                  "checkpoints when the bench is run again"))

    def _stop(self, workers: dict[int, dict[str, Any]]) -> None:
        """Idle workers are told to end; busy ones get SIGTERM, record their cell as interrupted and end; one
        that has not ended after ``grace_s`` is killed."""
        for w in workers.values():
            with contextlib.suppress(OSError, BrokenPipeError):
                if w["cell"] is None:
                    w["conn"].send(None)
        for w in workers.values():
            if w["cell"] is not None and w["proc"].is_alive():
                w["proc"].terminate()
        deadline = time.time() + self.grace_s
        for w in workers.values():
            w["proc"].join(timeout=max(0.1, deadline - time.time()))
            if w["proc"].is_alive():
                w["proc"].kill()
                w["proc"].join(timeout=5)
            with contextlib.suppress(OSError):
                w["conn"].close()


# -- Ray -----------------------------------------------------------------------------------------------------
def _ray_cell(payload: dict[str, Any]) -> dict[str, Any]:

    return run_cell(payload)


class RayExecutor:
    """One Ray task per cell with ``cpus`` CPUs and ``gpus`` GPUs (fractions allowed, e.g. 0.25 = four cells
    per GPU), retried up to ``retries`` times when its worker dies. ``address``: an existing cluster
    (``ray://host:10001`` or ``auto``); None starts a local one with ``workers`` x ``cpus`` CPUs. Run
    directories must be on a file system that every node sees.

    ``connect`` fails at once, in one line, where Ray would wait silently: an address where nothing answers
    (Ray retries for minutes), a connection that does not come up within ``connect_timeout_s``, and a cluster
    that lacks what one cell asks for (a task asking for a GPU on a cluster without one never starts)."""

    name = "ray"
    local = False  # a cell may run on another node: its process cannot be looked up here
    connect_timeout_s = 30.0

    def __init__(self, address: str | None = None, workers: int | None = None, cpus: float = 1.0,
                 gpus: float = 0.0, retries: int = 2):
        if not cpus > 0 or not gpus >= 0 or not math.isfinite(cpus + gpus):
            raise ConfigError("--cpus-per-cell must be > 0 and --gpus-per-cell >= 0")
        if retries < 0:
            raise ConfigError(f"--retries {retries}: must be >= 0")
        self.address, self.workers, self.cpus, self.gpus, self.retries = address, workers, cpus, gpus, retries
        self._ray: Any = None
        self._started = False

    def describe(self) -> str:
        where = self.address or "a local Ray instance"
        return f"ray: {where}, {self.cpus:g} CPU + {self.gpus:g} GPU per cell, {self.retries} retries"

    def threads(self) -> int:
        return max(1, int(self.cpus))

    def connect(self) -> None:
        """Join the cluster (or start a local instance) and check that one cell fits it."""
        if self._ray is not None:
            return
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray: Ray is not installed (pip install 'antibackdoor[ray]')") from None
        if not ray.is_initialized():
            if self.address:
                _probe(self.address, min(10.0, self.connect_timeout_s))
            self._init(ray)
            self._started = True
        self._ray = ray
        try:
            self._check_resources(ray.cluster_resources())
        except ConfigError:
            self.close()
            raise

    def _init(self, ray: Any) -> None:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "logging_level": logging.WARNING}
        if self.address:
            kwargs["address"] = self.address
        else:
            kwargs["num_cpus"] = int(max(1, (self.workers or available_cores()) * self.cpus))
            env = {k: os.environ[k] for k in ("PYTHONPATH", "ANTIBACKDOOR_DATA") if k in os.environ}
            if env:
                kwargs["runtime_env"] = {"env_vars": env}
        what = f"--ray-address {self.address}" if self.address else "--executor ray (a local instance)"
        outcome: dict[str, BaseException] = {}

        def init() -> None:
            try:
                ray.init(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the bench's thread below
                outcome["error"] = exc

        if self.address:
            # joining a cluster, in a daemon thread: Ray's own retries cannot keep the bench waiting past the
            # timeout, nor alive after it
            t = threading.Thread(target=init, name="antibackdoor-ray-init", daemon=True)
            t.start()
            t.join(self.connect_timeout_s)
            if t.is_alive():
                raise ConfigError(f"{what}: no connection to Ray within {self.connect_timeout_s:g} s")
        else:  # a local instance: nothing to wait for, started where Ray expects (the main thread)
            init()
        if "error" in outcome:
            exc = outcome["error"]
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise ConfigError(f"{what}: Ray did not start: {first}")

    def _check_resources(self, resources: dict[str, float]) -> None:
        have = {k: float(resources.get(k, 0.0)) for k in ("CPU", "GPU")}
        summary = f"the cluster has {have['CPU']:g} CPU and {have['GPU']:g} GPU in all"
        if self.gpus > have["GPU"]:
            raise ConfigError(f"--gpus-per-cell {self.gpus:g}: {summary}, so no cell could ever start "
                              "(--gpus-per-cell 0 runs on CPUs)")
        if self.cpus > have["CPU"]:
            raise ConfigError(f"--cpus-per-cell {self.cpus:g}: {summary}, so no cell could ever start")

    def close(self) -> None:
        if self._ray is not None and self._started:
            self._ray.shutdown()
        self._ray, self._started = None, False

    def run(self, payloads: list[dict[str, Any]], on_result: OnResult, on_start: OnStart | None = None) -> None:
        own = self._ray is None
        self.connect()
        ray = self._ray
        try:
            task = ray.remote(_ray_cell).options(num_cpus=self.cpus, num_gpus=self.gpus,
                                                 max_retries=self.retries, retry_exceptions=False)
            refs = {}
            for i, p in enumerate(payloads):
                refs[task.remote({**p, "threads": self.threads()})] = i
                if on_start:
                    on_start(i)
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1, timeout=5.0)
                for ref in done:
                    i = refs.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a lost task (worker died past its retries)
                        result = _failure(f"ray task failed after {self.retries} retries: "
                                          f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    on_result(i, result)
        finally:
            if own:
                self.close()


def _probe(address: str, timeout: float) -> None:
    """Whether anything listens at a Ray address (``host:port``, ``ray://host[:port]``), in ``timeout``
    seconds: where nothing does, Ray itself retries for minutes without a word. ``auto`` and ``local`` are
    Ray's to resolve."""
    if address in ("auto", "local"):
        return
    client = address.startswith("ray://")
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, "10001" if client else "6379"  # Ray's default client and GCS ports
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"--ray-address {address}: expected HOST:PORT, ray://HOST:PORT or auto") from None
    try:
        with socket.create_connection((host.strip("[]"), number), timeout=timeout):
            pass
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or exc.__class__.__name__).lower()
        raise ConfigError(f"--ray-address {address}: nothing answers at {host}:{number} ({why} within "
                          f"{timeout:g} s); is the cluster up?") from None


# -- Slurm (submitit) ----------------------------------------------------------------------------------------
def parse_time(text: str | int | None) -> int:
    """Minutes from ``90``, ``"90"``, ``"1:30:00"`` or ``"2-00:00:00"`` (Slurm's forms)."""
    if text is None:
        return 60
    if isinstance(text, int):
        return text
    s = str(text).strip()
    days = 0
    if "-" in s:
        d, s = s.split("-", 1)
        days = int(d)
    parts = [int(p) for p in s.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    elif len(parts) == 2:
        minutes = parts[0] * 60 + parts[1]  # H:MM
    elif len(parts) == 3:
        minutes = parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
    else:
        raise ValueError(text)
    return days * 24 * 60 + minutes


class SlurmExecutor:
    """A submitit job array, one job per cell. A job that is preempted or reaches ``--time`` is requeued by
    submitit and its cell resumes from the checkpoints written after every epoch. ``cluster="local"`` uses
    submitit's local executor (tests, a machine without Slurm)."""

    name = "slurm"
    local = False  # jobs go on when the bench stops: their cells' states are theirs to write

    def __init__(self, folder: Path, partition: str | None = None, gpus_per_task: int = 0, time: str | int = 60,
                 cpus_per_task: int = 2, parallelism: int | None = None, cluster: str | None = "slurm",
                 mem_gb: float | None = None, poll_s: float = 5.0):
        self.folder, self.partition, self.gpus = Path(folder), partition, int(gpus_per_task)
        try:
            self.time_min = parse_time(time)
        except ValueError:
            raise ConfigError(f"--time {time!r}: expected minutes or [D-]H:MM:SS") from None
        self.cpus, self.parallelism, self.cluster, self.mem_gb = int(cpus_per_task), parallelism, cluster, mem_gb
        self.poll_s = poll_s

    def describe(self) -> str:
        part = f"partition {self.partition}, " if self.partition else ""
        return (f"slurm ({self.cluster}): {part}{self.cpus} CPU + {self.gpus} GPU per task, {self.time_min} min, "
                f"logs in {self.folder}")

    def connect(self) -> None:
        """Nothing to reach before the jobs are submitted (submitit's presence is checked with the options)."""

    def close(self) -> None:
        """The jobs are Slurm's: nothing to release."""

    def run(self, payloads: list[dict[str, Any]], on_result: OnResult, on_start: OnStart | None = None) -> None:
        try:
            import submitit
        except ImportError:
            raise ConfigError("--executor slurm: submitit is not installed (pip install 'antibackdoor[slurm]')") \
                from None

        ex = submitit.AutoExecutor(folder=str(self.folder), cluster=self.cluster)
        params: dict[str, Any] = {"timeout_min": self.time_min, "gpus_per_node": self.gpus, "tasks_per_node": 1,
                                  "nodes": 1, "cpus_per_task": self.cpus, "name": "antibackdoor-bench"}
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.parallelism:
            params["slurm_array_parallelism"] = self.parallelism
        ex.update_parameters(**params)
        job_payloads = [{**p, "threads": self.cpus} for p in payloads]
        jobs = ex.map_array(cell_job(), job_payloads)
        log.info("submitted %d job(s): %s", len(jobs), ", ".join(j.job_id for j in jobs[:5]))
        pending = dict(enumerate(jobs))
        for i in pending:
            if on_start:
                on_start(i)
        while pending:
            for i, job in list(pending.items()):
                if not job.done():
                    continue
                pending.pop(i)
                try:
                    result = job.result()
                except Exception as exc:  # noqa: BLE001 - the job itself failed (not the cell)
                    first = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
                    result = _failure(f"slurm job {job.job_id} failed: {first}")
                on_result(i, result)
            if pending:
                time.sleep(self.poll_s)
