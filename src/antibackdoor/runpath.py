"""The one run-and-record path of every command that trains a model with a defense (``run``, ``defend``).

model factory -> DefenseContext -> defense.run -> evaluate (ACC; ASR where a trigger is known; RA) ->
model.safetensors, the score histogram, the defense's figures, the command's own files, history.json,
metrics.json (last), status.json done. A command hands in a :class:`Job`: plain inputs (the data the defense
sees, the images that measure the model, the truth where known: from an attack or from a dataset that carries
its own) and its own records. What both commands do happens here once, so the two cannot drift apart.

Also here, once: the run id (a hash of the resolved config, less the keys that do not change results) and the
run-directory protocol (reuse a finished run, ``--resume`` an unfinished one, status.json, log.txt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .attacks.base import PoisonedSet
from .data.imageset import ImageSet
from .defenses.base import Defense, DefenseResult
from .errors import RunStateError
from .jsonutil import write_json as _write_json
from .metrics import EvalConfig, accuracy, attack_success_rate, robust_accuracy
from .models.io import save_model
from .models.registry import build_model
from .plots import score_histogram
from .precision import Precision, use_precision
from .stages import DefenseContext

log = logging.getLogger("antibackdoor")

#: config keys that never change a run's results, for every command (each may add its own): not in the run id
NOT_IN_ID = ("out", "device", "data_root", "precision_reason")


def run_id(resolved: dict[str, Any], not_in_id: Iterable[str] = ()) -> str:
    """The first 10 hex digits of the SHA-256 of the resolved config (sorted keys), less ``NOT_IN_ID`` and the
    command's own ``not_in_id``: the same config finds the same directory, so finished work is reused."""
    skip = {*NOT_IN_ID, *not_in_id}
    blob = json.dumps({k: v for k, v in resolved.items() if k not in skip}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def slug(s: str) -> str:
    """A dataset spec as a directory-name part (``npz:/a/b.npz`` -> ``b.npz``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(s).name if ":" in s else s).strip("_")[:40] or "data"


def run_dir_for(out: str, source: str, kind: str, defense: str, rid: str) -> Path:
    """``OUT/<source>-<kind>-<defense>-<id>``: ``kind`` is the attack (``run``) or ``defend``."""
    return Path(out).expanduser() / f"{slug(source)}-{kind}-{defense}-{rid}"


def resolved_record(config: Any, model: str, precision: Precision) -> dict[str, Any]:
    """The start of config.yaml: the config's fields (``as_dict``'s order) with what the defaults resolved to;
    the command appends what it resolved besides (the attack, the defense, the data's hash)."""
    d = config.as_dict()
    d["model"] = model
    d["precision"] = precision.name  # what auto resolved to: results differ by precision
    d["precision_reason"] = precision.reason
    return d


def write_json(path: Path, data: Any) -> None:
    """Strict JSON, written atomically: undefined metrics (NaN) are ``null`` (see jsonutil)."""
    _write_json(path, data)


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    reused: bool = False
    result: DefenseResult | None = None
    poisoned: PoisonedSet | None = None


# -- the run directory --------------------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during a run (``kill``, ``timeout``, Docker, Kubernetes, a scheduler's preemption): handled
    as Ctrl-C is, so status.json says interrupted and the run can be resumed. A KeyboardInterrupt, so that
    everything that cleans up after Ctrl-C cleans up after it too."""

    signum = signal.SIGTERM

    def __str__(self) -> str:
        return "terminated by SIGTERM"


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While inside: SIGTERM raises :class:`Terminated` in the main thread (once; a second SIGTERM while the
    first is being handled is ignored, so the run's state is still written). The previous handler is restored
    on the way out. Elsewhere than in the main thread (a thread pool's worker) nothing changes: Python delivers
    signals to the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default is the nearest
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run_in_dir(run_dir: Path, config: dict[str, Any], resume: bool, force: bool,
               execute: Callable[[Path], RunResult]) -> RunResult:
    """The run-directory protocol shared by ``run`` and ``defend``.

    A finished directory (metrics.json present) is reused unless ``force``; an unfinished one needs
    ``resume`` (or ``force``, which deletes it). While ``execute(run_dir)`` works, status.json says running
    (with this process's id and host) and log.txt records the log; a failure leaves status.json saying failed
    or interrupted (Ctrl-C, or SIGTERM: :class:`Terminated`), with the error.
    """
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists() and not force:
        log.info("found finished run %s; reusing it (use --force to run again)", run_dir)
        return RunResult(run_dir, json.loads(metrics_path.read_text()), reused=True)
    if run_dir.exists() and any(run_dir.iterdir()):
        if force:
            shutil.rmtree(run_dir)
        elif not resume:
            st = run_state(run_dir)  # a failure's error was printed when it happened: the state says enough
            raise RunStateError(
                f"{run_dir}: holds an unfinished run ({st.state if st.state == 'failed' else st.text}); pass "
                "--resume to continue it or --force to start over")
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _attach_log(run_dir / "log.txt")
    try:
        with sigterm_interrupts():
            try:
                write_json(run_dir / "status.json", {"state": "running", **_this_process(), "started": time.time()})
                (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
                return execute(run_dir)
            except BaseException as exc:
                state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                write_json(run_dir / "status.json", {"state": state, "error": str(exc) or exc.__class__.__name__,
                                                     "finished": time.time()})
                log.debug("run %s: %s", state, exc)
                raise
    finally:
        logging.getLogger("antibackdoor").removeHandler(handler)
        handler.close()


# -- reading a run directory's state ------------------------------------------------------------------------
@dataclass(frozen=True)
class RunState:
    """What a run directory says about its run, as ``run_state`` reads it."""

    #: done (metrics.json present), running, interrupted, failed, or unknown (no or unreadable status.json)
    state: str
    #: why it stopped: the error (failed, interrupted), "process N is gone" (a run whose process died
    #: without a word, e.g. SIGKILL or a lost machine); None otherwise
    detail: str | None = None
    pid: int | None = None  # the process that runs or ran it
    host: str | None = None  # the host that process runs on

    @property
    def text(self) -> str:
        """``interrupted (process 4711 is gone)``, ``failed (the loss became NaN ...)``, ``running``."""
        return f"{self.state} ({self.detail})" if self.detail else self.state


def run_state(run_dir: Path) -> RunState:
    """The state of the run in ``run_dir``: metrics.json marks it done; else status.json says. A status of
    ``running`` whose process no longer exists reads ``interrupted`` with the detail "process N is gone" (the
    process was killed without a chance to say so). A process is judged only on the host (and in the process
    namespace) that recorded it; a run recorded elsewhere, or by a version that recorded no host, stays
    ``running`` with its host named."""
    if (run_dir / "metrics.json").is_file():
        return RunState("done")
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return RunState("unknown", "no readable status.json")
    if not isinstance(status, dict):
        return RunState("unknown", "no readable status.json")
    state = str(status.get("state", "unknown"))
    pid = status.get("pid") if isinstance(status.get("pid"), int) else None
    host = status.get("host") if isinstance(status.get("host"), str) else None
    if state != "running":
        error = status.get("error")
        return RunState(state, str(error) if error else None, pid, host)
    alive = _alive(status, pid)
    if alive is False:
        return RunState("interrupted", f"process {pid} is gone", pid, host)
    where = f"process {pid} on {host}" if pid is not None and host and alive is None else None
    return RunState("running", where, pid, host)


def _this_process() -> dict[str, Any]:
    """What identifies this process for ``run_state``: the pid, the host and, where the system tells, the pid
    namespace (containers on one host may share its name but not their pids) and the boot (pids are reused
    after a reboot)."""
    ident: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname()}
    for key, read in (("pid_ns", lambda: os.readlink("/proc/self/ns/pid")),
                      ("boot_id", lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip())):
        try:
            ident[key] = read()
        except OSError:
            pass
    return ident


def _alive(status: dict[str, Any], pid: int | None) -> bool | None:
    """Whether the process a running status names still exists: True, False, or None where this process
    cannot tell (another host or namespace, no pid or host recorded)."""
    if pid is None or pid <= 0:
        return None
    here = _this_process()
    if status.get("host") != here["host"]:
        return None
    if status.get("pid_ns", here.get("pid_ns")) != here.get("pid_ns"):
        return None
    if "boot_id" in status and "boot_id" in here and status["boot_id"] != here["boot_id"]:
        return False  # recorded before this machine last started: that process is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return None
    return True


def _attach_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    lg = logging.getLogger("antibackdoor")
    lg.setLevel(logging.DEBUG)
    lg.addHandler(handler)
    return handler


# -- one training, measured and recorded --------------------------------------------------------------------
@dataclass(kw_only=True)
class Inputs:
    """What a command resolved for the shared path: plain data and settings, no attack object, so that the
    truth may come from an attack or from a dataset that carries its own."""

    model: str  # the registered model name
    defense: Defense
    defense_name: str  # as the user asked for it (the log)
    preset: str
    seed: int
    train: ImageSet  # what the defense sees, on the compute device
    trusted: ImageSet | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: clean images that measure ACC and RA (None or empty: nothing is measured)
    test: ImageSet | None = None
    #: images with the trigger, labelled with the target: ASR (None: no trigger is known)
    triggered: ImageSet | None = None
    #: the truth over ``train``, never shown to the defense: which samples are poisoned, their labels before
    #: poisoning (None: unknown); the score histogram and the defense's figures draw it
    poison_mask: torch.Tensor | None = None
    true_labels: torch.Tensor | None = None
    stage_cache: Any = None  # a bench.stage_cache.StageCache shared with other runs (None: train every stage)
    model_meta: dict[str, Any] = field(default_factory=dict)  # extra facts for model.safetensors' header
    title: str = ""  # of the score histogram


@dataclass(frozen=True)
class Evaluation:
    acc: float
    asr: float | None  # None: no trigger known
    ra: float
    size: int  # images ACC was measured on


@dataclass
class Trained:
    """What the shared path hands to the command's ``record``."""

    result: DefenseResult
    #: False when no stage trained the returned model (a split-only run): it is neither measured nor saved
    trained: bool
    evaluation: Evaluation | None  # None: not trained, or nothing to measure on
    time_defense_s: float


class Job(ABC):
    """One command's part of the path: what to train on, and what it records besides the shared files."""

    @abstractmethod
    def inputs(self) -> Inputs:
        """Resolve the data (called in the run directory, under the run's precision: an attack that trains a
        network while poisoning computes in it too)."""

    @abstractmethod
    def record(self, run_dir: Path, out: Trained) -> dict[str, Any]:
        """Write the command's own files; return its metrics (its keys in its order, ``time_defense_s``
        last), to which the path adds ``time_total_s`` (and ``stage_cache``) before writing metrics.json."""


def evaluate(model: torch.nn.Module, test: ImageSet, cfg: EvalConfig, device: torch.device, precision: Precision,
             seed: int, triggered: ImageSet | None = None) -> Evaluation:
    """ACC on ``test``, ASR on ``triggered`` (when given) and RA on the first ``cfg.ra_samples`` of ``test``."""
    acc = accuracy(model, test, device, precision)
    asr = attack_success_rate(model, triggered, device, precision) if triggered is not None else None
    ra_set = test.subset(torch.arange(min(cfg.ra_samples, len(test)))) if cfg.ra_samples else test
    ra = robust_accuracy(model, ra_set, cfg.pgd(), device, seed=seed, precision=precision)
    return Evaluation(acc, asr, ra, len(test))


def train_and_record(job: Job, run_dir: Path, resume: bool, device: torch.device, precision: Precision) -> RunResult:
    """The path itself (``execute`` of ``run_in_dir``): see the module's docstring."""
    t0 = time.time()
    log.info("precision: %s", precision.describe())
    with use_precision(precision):
        inp = job.inputs()
        train = inp.train

        def factory():
            return build_model(inp.model, train.num_classes, train.channels, train.image_size, train.mean, train.std)

        ctx = DefenseContext(factory, device=device, seed=inp.seed, workdir=run_dir / "checkpoints", resume=resume,
                             precision=precision, trusted=inp.trusted, stage_cache=inp.stage_cache)
        log.info("defense: %s (%s preset, model %s, device %s)", inp.defense_name, inp.preset, inp.model, device)
        result = inp.defense.run(train, ctx)
        t_defense = time.time() - t0
        trained = ctx.is_trained(result.model)
        evaluation = None
        if not trained:  # a split-only run: its freshly initialised model would describe random weights
            log.info("no stage trained the final model (split only): ACC, ASR and RA are not applicable")
        elif inp.test is not None and len(inp.test):
            log.info("evaluating")
            evaluation = evaluate(result.model.eval(), inp.test, inp.eval, device, precision, inp.seed, inp.triggered)
        out = Trained(result, trained, evaluation, round(t_defense, 1))
        if trained:  # an untrained model is not the run's model: no weights file claims it is
            save_model(result.model, run_dir / "model.safetensors", inp.model, train, **inp.model_meta)
        _figures(run_dir, inp, result)
        metrics = job.record(run_dir, out)
    metrics["time_total_s"] = round(time.time() - t0, 1)
    if inp.stage_cache is not None:  # which stages were loaded instead of trained, and the seconds saved
        metrics["stage_cache"] = inp.stage_cache.take_events()
    write_json(run_dir / "history.json", result.history)
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "status.json", {"state": "done", "finished": time.time()})
    return RunResult(run_dir, metrics, result=result)


def _figures(run_dir: Path, inp: Inputs, result: DefenseResult) -> None:
    """The score histogram (clean vs poisoned where the truth is known) and the defense's own figures (only
    with the truth: they show what it got right)."""
    if result.scores is not None:
        score_histogram(result.scores.cpu(), inp.poison_mask, run_dir / "scores_hist.png",
                        xlabel=result.score_name or "score", threshold=result.info.get("threshold"), title=inp.title)
    if inp.poison_mask is not None:
        inp.defense.write_plots(result, inp.poison_mask, run_dir, true_labels=inp.true_labels)


__all__ = ["NOT_IN_ID", "Evaluation", "Inputs", "Job", "RunResult", "RunState", "Terminated", "Trained", "evaluate",
           "resolved_record", "run_dir_for", "run_id", "run_in_dir", "run_state", "sigterm_interrupts", "slug",
           "train_and_record", "write_json"]
