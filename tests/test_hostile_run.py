"""Hostile and careless input to ``run`` and ``defend``: SIGTERM handled like Ctrl-C (a real subprocess), a
run whose process died read as interrupted, config values that are the wrong kind or out of range stopped with
one line before a run directory exists, and the top-level command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import antibackdoor
from antibackdoor.cli import main
from antibackdoor.errors import RunStateError
from antibackdoor.runpath import RunState, run_in_dir, run_state, sigterm_interrupts

SRC = Path(antibackdoor.__file__).resolve().parents[1]
TINY = ["--model", "cnn-small", "--defense", "none", "--defense-param", "train.epochs=3", "--ra-samples", "4"]

#: runs the command line in a fresh interpreter; the first checkpoint's save then touches READY and waits,
#: so that the test's SIGTERM arrives while the run is surely inside its training
PAUSING_CLI = """
import sys, time
from pathlib import Path
from antibackdoor import training
from antibackdoor.cli import main

real = training.save_checkpoint

def save_then_wait(path, payload):
    real(path, payload)
    Path(sys.argv[1]).touch()
    time.sleep(300)

training.save_checkpoint = save_then_wait
sys.exit(main(sys.argv[2:]))
"""


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if not ln.startswith("[antibackdoor]")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def no_run_dir(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


# -- SIGTERM ------------------------------------------------------------------------------------------------
def test_sigterm_to_a_real_run_is_an_interruption_that_resumes(tmp_path, tiny_npz, capsys):
    out = tmp_path / "runs"
    args = ["run", "--dataset", f"npz:{tiny_npz}", "--out", str(out), *TINY]
    script, ready = tmp_path / "pausing_cli.py", tmp_path / "ready"
    script.write_text(PAUSING_CLI)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(script), str(ready), *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), log.read_text()
        (run_dir,) = out.iterdir()
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "running" and status["pid"] == proc.pid
        assert status["host"] == socket.gethostname()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = log.read_text()
    # handled like Ctrl-C: one line with the resume hint, exit 143 (128 + SIGTERM), the state recorded
    assert proc.returncode == 143, stderr
    assert stderr.splitlines()[-1] == "antibackdoor: terminated (SIGTERM); continue with the same command plus --resume"
    assert "Traceback" not in stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["error"]) == ("interrupted", "terminated by SIGTERM")
    assert run_state(run_dir).text == "interrupted (terminated by SIGTERM)"
    # the same command refuses to mix with it, naming the state; --resume continues from the checkpoint
    assert main(args) == 2
    assert "holds an unfinished run (interrupted (terminated by SIGTERM)); pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    assert "train: resumed from" in (run_dir / "log.txt").read_text()
    assert len(json.loads((run_dir / "history.json").read_text())["train"]) == 3
    assert run_state(run_dir) == RunState("done")


def test_sigterm_during_defend_is_an_interruption_and_the_old_handler_comes_back(tmp_path, tiny_npz, monkeypatch,
                                                                                 capsys):
    from antibackdoor import training

    real = training.save_checkpoint

    def save_then_sigterm(path, payload):
        real(path, payload)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises before this ends

    monkeypatch.setattr(training, "save_checkpoint", save_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "runs"
    code = main(["defend", f"npz:{tiny_npz}", "--out", str(out), *TINY])
    assert code == 143
    assert capsys.readouterr().err.splitlines()[-1].startswith("antibackdoor: terminated (SIGTERM);")
    (run_dir,) = out.iterdir()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_handler_is_only_installed_inside_a_run():
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_interrupts():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


# -- the state of a run directory -----------------------------------------------------------------------------
def gone_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_status(run_dir: Path, **status) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").write_text(json.dumps(status))
    (run_dir / "config.yaml").write_text("seed: 0\n")
    return run_dir


def test_a_running_status_whose_process_is_gone_reads_interrupted(tmp_path):
    host = socket.gethostname()
    pid = gone_pid()
    dead = write_status(tmp_path / "dead", state="running", pid=pid, host=host)
    assert run_state(dead) == RunState("interrupted", f"process {pid} is gone", pid, host)
    assert run_state(dead).text == f"interrupted (process {pid} is gone)"
    # a live process (this one) is running; one recorded on another host is not judged here
    assert run_state(write_status(tmp_path / "live", state="running", pid=os.getpid(), host=host)).state == "running"
    other = run_state(write_status(tmp_path / "other", state="running", pid=pid, host=host + "-elsewhere"))
    assert other.state == "running" and other.text == f"running (process {pid} on {host}-elsewhere)"
    # a status written before hosts were recorded is not judged either
    assert run_state(write_status(tmp_path / "old", state="running", pid=pid)).state == "running"
    failed = run_state(write_status(tmp_path / "failed", state="failed", error="the loss became NaN"))
    assert failed.text == "failed (the loss became NaN)"
    assert run_state(tmp_path / "nothing").state == "unknown"


def test_a_run_recorded_before_the_machine_started_is_gone(tmp_path, monkeypatch):
    """After a reboot a pid may belong to any process: the boot the status recorded decides."""
    from antibackdoor import runpath

    host = socket.gethostname()
    monkeypatch.setattr(runpath, "_this_process", lambda: {"pid": os.getpid(), "host": host, "boot_id": "now"})
    before = write_status(tmp_path / "before", state="running", pid=os.getpid(), host=host, boot_id="before")
    assert run_state(before).text == f"interrupted (process {os.getpid()} is gone)"
    same = write_status(tmp_path / "same", state="running", pid=os.getpid(), host=host, boot_id="now")
    assert run_state(same).state == "running"


def test_refusing_a_dead_run_says_its_process_is_gone(tmp_path):
    pid = gone_pid()
    run_dir = write_status(tmp_path / "r", state="running", pid=pid, host=socket.gethostname())
    gone = rf"unfinished run \(interrupted \(process {pid} is gone\)\); pass --resume"
    with pytest.raises(RunStateError, match=gone):
        run_in_dir(run_dir, {}, resume=False, force=False, execute=lambda d: None)


# -- config values: one line, exit 2, no run directory ---------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("defense_params: 5\n", "defense_params: expected a mapping of key: value, got 5"),
        ("defense_params: [1, 2]\n", "defense_params: expected a mapping of key: value, got [1, 2]"),
        ("attack_params: 5\n", "attack_params: expected a mapping of key: value, got 5"),
        ("1: 2\n", "unknown key(s) 1; known:"),
        ("eval: {ra_samples: -1}\n", "eval.ra_samples (--ra-samples): -1 must be >= 0"),
        ("eval: {ra_eps: 8}\n", "eval.ra_eps: 8.0 must lie in [0, 1] (pixel units"),
        ("eval: {ra_step: .nan}\n", "eval.ra_step: nan must lie in (0, 1]"),
        ("eval: {ra_steps: -2}\n", "eval.ra_steps: -2 must be >= 0"),
        ("defense: none\ndefense_params: {train: {lr: .inf}}\n", "--defense-param train.lr: inf must be a finite"),
        ("defense_params: {naive: {momentum: 1.5}}\n", "--defense-param naive.momentum: 1.5 must be in [0, 1)"),
        ("defense_params: {naive: {weight_decay: .inf}}\n", "--defense-param naive.weight_decay: inf must be"),
        ("defense_params: {naive: {lr_gamma: 0}}\n", "--defense-param naive.lr_gamma: 0.0 must be a finite number"),
        ("defense_params: {naive: {crop: -1}}\n", "--defense-param naive.crop: -1 must be >= 0"),
        ("defense_params: {final: {adversary: {eps: 8}}}\n",
         "--defense-param final.adversary.eps: 8.0 must be in [0, 1] or inf"),
        ("defense_params: {final: {adversary: {step: 0}}}\n", "--defense-param final.adversary.step: 0.0 must be"),
        ("defense_params: {final: {adversary: {steps: -1}}}\n", "--defense-param final.adversary.steps: -1 must be"),
        ("defense_params: {final: {adversary: {sce_beta: .nan}}}\n", "final.adversary.sce_beta: nan must be"),
    ],
)
def test_bad_config_values_stop_before_the_run(tmp_path, tiny_npz, capsys, text, message):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(text)
    out = tmp_path / "runs"
    code = main(["run", "--config", str(cfg), "--dataset", f"npz:{tiny_npz}", "--out", str(out)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("antibackdoor: error: ") and message in line, line
    assert no_run_dir(out)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("dataset: caf\u00e9\n".encode("latin-1"))
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "runs")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"antibackdoor: error: {cfg}: not a UTF-8 text file (byte 12 is not UTF-8); a config file is " \
                   "YAML text saved as UTF-8"


@pytest.mark.parametrize("command", ["run", "defend"])
def test_negative_ra_samples_stop_before_the_run(tmp_path, tiny_npz, capsys, command):
    out = tmp_path / "runs"
    data = ["--dataset", f"npz:{tiny_npz}"] if command == "run" else [f"npz:{tiny_npz}"]
    assert main([command, *data, "--out", str(out), *TINY[:-2], "--ra-samples", "-1"]) == 2
    assert "--ra-samples): -1 must be >= 0" in one_error_line(capsys.readouterr().err)
    assert no_run_dir(out)


# -- the command line itself ---------------------------------------------------------------------------------
def test_no_command_prints_the_commands_and_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default run would write runs/ here
    assert main([]) == 2
    out = capsys.readouterr()
    assert "usage: antibackdoor" in out.out and "run" in out.out and "defend" in out.out
    assert out.err.splitlines() == ["antibackdoor: error: no command given; 'antibackdoor run' runs the default "
                                    "experiment"]
    assert not (tmp_path / "runs").exists()


def test_version_and_a_help_text_without_markup(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"antibackdoor {antibackdoor.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert "``" not in text and description.rstrip().endswith(".")
    assert "antibackdoor run" in description


def test_detectors_listing_names_every_key_a_detector_accepts(capsys):
    """Nested settings (a suspect model's TrainConfig, ABL's isolation stage, the rule) under the dotted names
    ``detector_params.KEY`` takes, each one accepted by the detector's parameters."""
    from antibackdoor.config import describe_fields
    from antibackdoor.detectors import DETECTORS, get_detector

    assert main(["detectors"]) == 0
    blocks: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines()[2:]:
        if line and not line.startswith(" "):
            blocks[line.split(" ", 1)[0].rstrip(":")] = []
        elif line.strip():
            blocks[list(blocks)[-1]].append(line.strip().split(":", 1)[0])
    assert set(blocks) == set(DETECTORS)
    for name, cls in DETECTORS.items():
        keys = [f.name for f in describe_fields(cls.presets["quick"])]
        assert set(keys) <= set(blocks[name]), name
        nested = [k for k in keys if "." in k]
        assert nested, name  # every detector has at least its rule's keys
        value = dict((f.name, f.value) for f in describe_fields(cls.presets["quick"]))[nested[0]]
        get_detector(name, overrides=_dotted(nested[0], value))  # the listed name is a key it accepts


def _dotted(key: str, value):
    out: dict = {}
    d = out
    *heads, last = key.split(".")
    for k in heads:
        d = d.setdefault(k, {})
    d[last] = value
    return out
