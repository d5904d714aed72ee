"""`antibackdoor bench` end to end on tiny cells (cnn-small, 1-2 epochs on a 240-image npz): local workers,
reuse, a failing cell, a bench killed midway and re-run, a worker that dies, submitit's local executor and
(when installed) a real local Ray instance."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_npz

from antibackdoor.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _grid(tmp_path, epochs: int = 1, **extra) -> Path:
    npz = write_npz(tmp_path / "tiny.npz")
    grid = {
        "name": "tiny", "datasets": [f"npz:{npz}"], "attacks": ["none", "badnets"], "models": ["cnn-small"],
        "defenses": [{"name": "none", "params": {"train": {"epochs": epochs}}},
                     {"name": "a-abl", "params": {"naive": {"epochs": epochs},
                                                  "final": {"epochs": 1, "adversary": {"steps": 1}}}}],
        "targets": [0, 1], "eval": {"ra_steps": 1}, **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _strict(path: Path):
    return json.loads(path.read_text(), parse_constant=lambda t: (_ for _ in ()).throw(ValueError(t)))


def _bench(args, capsys):
    code = main(["bench", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_bench_runs_every_cell_once_and_reuses_them(tmp_path, capsys):
    grid = _grid(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "stages"
    args = [str(grid), "--out", str(out), "--stage-cache", str(cache)]
    code, _, err = _bench([*args, "--workers", "2", "--threads", "1"], capsys)
    assert code == 0, err
    assert "estimate: about" in err and "6 to run" in err
    assert err.count("] done ") == 6
    runs = sorted((out / "runs").glob("*/metrics.json"))
    assert len(runs) == 6
    for m in runs:
        _strict(m)  # strict JSON: clean-data cells have null TPR / ASR, never NaN
    clean = [_strict(m) for m in runs if "-none-" in m.parent.name.split("tiny.npz")[1][:7]]
    assert clean and all(m["tpr"] is None and m["asr"] is None for m in clean)
    # each A-ABL cell loaded its naive stage from the `none` cell of the same poisoned data
    assert "stage cache: 3 stage(s) loaded instead of trained" in err
    manifest = _strict(out / "bench" / "tiny-quick.json")
    assert len(manifest["cells"]) == 6 and all(c["state"] == "done" for c in manifest["cells"])
    # again: nothing runs
    code, _, err = _bench(args, capsys)
    assert code == 0 and "6 done" in err and "nothing to run" in err
    code, text, _ = _bench([*args, "--status"], capsys)
    assert code == 0 and "6 done, 0 failed" in text


@pytest.mark.slow
def test_split_only_cells_report_no_model_metrics(tmp_path, capsys):
    """A cell that stops after its split (A-ABL with final.epochs 0, as aabl-t1 runs it) has no trained final
    model: ACC/ASR/RA are null and read n/a in the progress line, `antibackdoor run`'s table and the report
    (they once printed an untrained model's 'ACC 8.4 ASR 0.0 RA 0.0'); its split metrics are reported."""
    npz = write_npz(tmp_path / "tiny.npz")
    grid = {"name": "split", "datasets": [f"npz:{npz}"], "attacks": ["badnets"], "models": ["cnn-small"],
            "defenses": [{"name": "a-abl", "label": "split only",
                          "params": {"naive": {"epochs": 1}, "final": {"epochs": 0}}}],
            "targets": [1], "eval": {"ra_steps": 1}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    code, _, err = _bench([str(path), "--out", str(out), "--no-stage-cache", "--workers", "1"], capsys)
    assert code == 0, err
    line = next(ln for ln in err.splitlines() if "] done " in ln)
    assert "ACC n/a ASR n/a RA n/a" in line and "RHO_VUL" in line, line
    (run,) = (out / "runs").glob("*/metrics.json")
    m = _strict(run)
    assert m["model_trained"] is False and m["acc"] is None and m["asr"] is None and m["ra"] is None
    assert m["gamma"] is not None and 0 < m["gamma"] <= 1 and m["tpr"] is not None
    assert not (run.parent / "model.safetensors").exists()  # no weights file claims to be the run's model
    code, text, _ = _bench([str(path), "--out", str(out), "--status"], capsys)
    assert "1 done" in text
    assert main(["report", str(out)]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["acc"], r["asr"], r["ra"], r["model_trained"]) for r in rows] == [("", "", "", "False")]
    md = (out / "report.md").read_text()
    acc_row = next(ln for ln in md.splitlines() if ln.startswith("| BadNets") and "n/a" in ln)
    assert acc_row.count("n/a") == 3 and "8.4" not in acc_row
    from antibackdoor.cli import print_table

    print_table(m, run.parent)
    assert capsys.readouterr().out.count("n/a (split only") == 3


@pytest.mark.slow
def test_failing_cell_is_recorded_and_the_others_finish(tmp_path, capsys):
    # a learning rate of 1e30 passes the config checks (finite, > 0), then the first SGD updates overflow
    # the weights to inf/NaN (IEEE arithmetic, not rounding): those cells fail when they run, with the
    # training loop's error
    grid = _grid(tmp_path)
    spec = yaml.safe_load(grid.read_text())
    spec["defenses"] = [spec["defenses"][0], {"name": "none", "label": "diverges", "params": {
        "train": {"epochs": 1, "lr": 1e30, "optimizer": "sgd"}}}]
    grid.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    code, _, err = _bench([str(grid), "--out", str(out), "--no-stage-cache"], capsys)
    assert code == 1
    assert err.count("] done ") == 3 and err.count("] failed ") == 3
    assert "the loss became nan" in err
    code, text, _ = _bench([str(grid), "--out", str(out), "--status"], capsys)
    assert "3 done, 3 failed" in text and "the loss became nan" in text
    code, _, err = _bench([str(grid), "--out", str(out), "--skip-failed"], capsys)
    assert code == 0 and "nothing to run" in err


def test_a_cell_the_attack_rejects_stops_the_bench_before_anything_runs(tmp_path, capsys):
    # a poison rate of 0.001 selects no sample of the tiny set: the attack's check rejects it while planning
    grid = _grid(tmp_path, poison_rates=[0.1, 0.001])
    out = tmp_path / "out"
    code, _, err = _bench([str(grid), "--out", str(out), "--defenses", "none"], capsys)
    assert code == 2 and "selects no sample" in err and "rate=0.001" in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("antibackdoor: error: cell ")
    assert not (out / "runs").exists()


@pytest.mark.slow
def test_bench_killed_midway_reruns_only_the_missing_cells(tmp_path, capsys):
    grid = _grid(tmp_path, epochs=3)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "ANTIBACKDOOR_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "antibackdoor.cli", "bench", str(grid), "--out", str(out), "--no-stage-cache",
           "--defenses", "none", "--workers", "1", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not list((out / "runs").glob("*/metrics.json")):
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no chance to clean up; the worker must die with it
    proc.wait(30)
    done_before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")}
    assert 1 <= len(done_before) < 3
    time.sleep(3)  # an orphaned worker would finish its cell meanwhile
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")} == done_before
    code, _, err = _bench([str(grid), "--out", str(out), "--no-stage-cache", "--defenses", "none"], capsys)
    assert code == 0, err
    assert f"{len(done_before)} done" in err and f"{3 - len(done_before)} to run" in err
    assert err.count("] done ") == 3 - len(done_before)
    assert all(p.stat().st_mtime_ns == t for p, t in done_before.items())  # finished cells untouched
    assert len(list((out / "runs").glob("*/metrics.json"))) == 3


@pytest.mark.slow
def test_local_worker_death_fails_its_cell_only(tmp_path):
    from antibackdoor.bench.executors import LocalExecutor

    npz = write_npz(tmp_path / "tiny.npz")
    payloads = []
    for target in (0, 1):
        cfg = {"dataset": f"npz:{npz}", "model": "cnn-small", "defense": "none", "target": target,
               "defense_params": {"train": {"epochs": 300 if target == 0 else 1}},
               "eval": {"ra_steps": 1}, "out": str(tmp_path / "runs")}
        payloads.append({"config": cfg, "run_dir": str(tmp_path / "runs" / f"cell{target}"), "stage_cache": None})
    results = {}

    def kill_soon(i):
        if i == 0:
            def kill():
                time.sleep(2)  # the worker is starting or training cell 0 (300 epochs: it cannot finish first)
                import multiprocessing as mp

                for child in mp.active_children():
                    if child.name.startswith("antibackdoor-worker"):
                        os.kill(child.pid, signal.SIGKILL)

            threading.Thread(target=kill, daemon=True).start()

    LocalExecutor(workers=1, threads=1).run(payloads, lambda i, r: results.__setitem__(i, r), on_start=kill_soon)
    assert results[0]["state"] == "failed" and "worker process died" in results[0]["error"]
    assert results[1]["state"] == "done"  # a fresh worker took the next cell


def _wait_running(run_root: Path, timeout: float = 180) -> Path:
    """The run directory whose status.json says running (a cell has started training), once one does."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for status in run_root.glob("*/status.json"):
            try:
                if json.loads(status.read_text()).get("state") == "running":
                    return status.parent
            except ValueError:  # being written
                pass
        time.sleep(0.2)
    raise AssertionError("no cell started")


@pytest.mark.slow
def test_sigterm_stops_the_bench_like_ctrl_c(tmp_path, capsys):
    """SIGTERM (kill, timeout, Docker, Kubernetes, Slurm preemption) once left status.json at running with a dead
    pid, exit 143 and nothing printed, and --status then counted the cell as running. Now: the worker is
    stopped, the cell reads interrupted, the resume hint is printed, and the same command resumes it."""
    grid = _grid(tmp_path, epochs=200)  # cannot finish before the signal
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "ANTIBACKDOOR_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "antibackdoor.cli", "bench", str(grid), "--out", str(out), "--no-stage-cache",
           "--defenses", "none", "--attacks", "badnets", "--workers", "1", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_dir = _wait_running(out / "runs")
        worker = json.loads((run_dir / "status.json").read_text())["pid"]
        assert worker != proc.pid  # the cell runs in a worker process
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "bench stopped by SIGTERM after 0 of 2 cells; run the same command again to continue" in err
    assert "Traceback" not in err
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted"
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)  # the worker is gone too
    manifest = json.loads((out / "bench" / "tiny-quick.json").read_text())
    assert sorted(c["state"] for c in manifest["cells"]) == ["interrupted", "pending"]
    code, text, _ = _bench([str(grid), "--out", str(out), "--defenses", "none", "--attacks", "badnets", "--status"],
                           capsys)
    assert code == 0 and "0 running, 1 interrupted, 1 pending" in text


@pytest.mark.slow
def test_a_worker_stopped_by_sigterm_records_its_cell_as_interrupted(tmp_path):
    """SIGTERM to a local worker alone (kill PID, a group signal): its cell's run records itself as interrupted
    (status.json, from the worker) and the bench goes on with a fresh worker, instead of a cell stuck at running
    reported as 'worker process died'."""
    from antibackdoor.bench.executors import LocalExecutor

    npz = write_npz(tmp_path / "tiny.npz")
    payloads = []
    for target in (0, 1):
        cfg = {"dataset": f"npz:{npz}", "model": "cnn-small", "defense": "none", "target": target,
               "defense_params": {"train": {"epochs": 300 if target == 0 else 1}},
               "eval": {"ra_steps": 1}, "out": str(tmp_path / "runs")}
        payloads.append({"config": cfg, "run_dir": str(tmp_path / "runs" / f"cell{target}"), "stage_cache": None})
    results = {}

    def stop_soon(i):
        if i == 0:
            def stop():
                status = _wait_running(tmp_path / "runs") / "status.json"
                os.kill(json.loads(status.read_text())["pid"], signal.SIGTERM)

            threading.Thread(target=stop, daemon=True).start()

    LocalExecutor(workers=1, threads=1).run(payloads, lambda i, r: results.__setitem__(i, r), on_start=stop_soon)
    assert results[0]["state"] == "interrupted" and "SIGTERM" in results[0]["error"]
    assert results[1]["state"] == "done"  # a fresh worker took the next cell
    (cut,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/status.json")
              if json.loads(p.read_text())["state"] != "done"]
    assert cut["state"] == "interrupted"


def test_a_cell_being_run_elsewhere_is_reported_busy(tmp_path):
    from antibackdoor.bench.cell import run_cell
    from antibackdoor.locking import try_lock

    run_dir = tmp_path / "runs" / "x-none-none-0123456789"
    with try_lock(run_dir.parent / ".locks" / f"{run_dir.name}.lock") as held:
        assert held is True
        r = run_cell({"config": {"out": str(tmp_path / "runs")}, "run_dir": str(run_dir)})
    assert r["state"] == "busy"


@pytest.mark.slow
def test_slurm_executor_with_submitits_local_executor(tmp_path, capsys):
    pytest.importorskip("submitit")
    grid = _grid(tmp_path)
    out = tmp_path / "out"
    code, _, err = _bench([str(grid), "--out", str(out), "--executor", "slurm", "--slurm-cluster", "local",
                           "--time", "0:10:00", "--cpus-per-task", "1", "--attacks", "badnets", "--defenses", "none",
                           "--stage-cache", str(tmp_path / "stages")], capsys)
    assert code == 0, err
    assert err.count("] done ") == 2
    assert len(list((out / "runs").glob("*/metrics.json"))) == 2
    assert list((out / "bench" / "slurm").glob("*_log.out"))  # submitit's job logs


def test_parse_time():
    from antibackdoor.bench.executors import parse_time

    assert parse_time("90") == 90 and parse_time("1:30:00") == 90 and parse_time("2-00:00:00") == 2880
    assert parse_time(15) == 15 and parse_time("0:10:30") == 11


@pytest.mark.slow
@pytest.mark.ray
def test_ray_executor_on_a_real_local_instance(tmp_path, capsys):
    pytest.importorskip("ray")
    grid = _grid(tmp_path)
    out = tmp_path / "out"
    t0 = time.time()
    code, _, err = _bench([str(grid), "--out", str(out), "--executor", "ray", "--workers", "2", "--attacks",
                           "badnets", "--stage-cache", str(tmp_path / "stages")], capsys)
    assert code == 0, err
    assert err.count("] done ") == 4
    assert len(list((out / "runs").glob("*/metrics.json"))) == 4
    print(f"ray bench of 4 tiny cells: {time.time() - t0:.1f} s")


def test_plan_counts_each_cells_training_and_groups_equal_poisoned_data(tmp_path):
    """The estimate counts every training stage of the resolved defense (epochs x images x (1 + PGD steps)),
    the naive stage shared by `none` and A-ABL once, and cells on the same poisoned data share a group."""
    from antibackdoor.bench.grid import Grid
    from antibackdoor.bench.runner import make_plan

    grid = Grid.from_dict(yaml.safe_load(_grid(tmp_path, epochs=2).read_text()))
    plan = make_plan(grid, None, tmp_path / "out")
    n_train = 240  # write_npz: 240 training images
    by = {(p.cell.axes["attack_name"], p.cell.axes["defense_name"], p.cell.axes["target"]): p for p in plan.cells}
    none, aabl = by[("badnets", "none", 0)], by[("badnets", "a-abl", 0)]
    assert none.passes >= 2 * n_train and aabl.passes >= 2 * n_train + 1 * n_train * (1 + 1)
    assert [k for k, _ in none.shared] == [k for k, _ in aabl.shared] and len(none.shared) == 1  # the naive stage
    assert none.group == aabl.group != by[("badnets", "none", 1)].group


def test_bench_runs_an_outside_data_set_and_the_report_shows_its_columns(tmp_path, capsys):
    """A grid naming a data set that comes poisoned: its cell runs with attack none, records the ground truth's
    numbers, and the manifest's columns become the report's per-run table."""
    npz = write_npz(tmp_path / "tiny.npz")
    grid = tmp_path / "outside.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "outside", "datasets": [f"npz:{npz}", f"outside:own-patch?target=1,rate=0.2,base=npz:{npz}"],
        "attacks": ["none"], "models": ["cnn-small"], "precision": "fp32",
        "defenses": [{"name": "none", "label": "none", "params": {"train": {"epochs": 1}}}],
        "eval": {"ra_steps": 1, "ra_samples": 8},
        "columns": ["asr", "poisoned", {"path": "truth.trigger", "label": "trigger"}]}))
    out = tmp_path / "out"
    code, _, err = _bench([str(grid), "--out", str(out), "--no-stage-cache", "--threads", "1"], capsys)
    assert code == 0, err
    assert "own-patch / none / cnn-small / rate 0.2 / target 1" in err  # labelled by what the data holds
    manifest = _strict(out / "bench" / "outside-quick.json")
    assert manifest["columns"][:2] == ["asr", "poisoned"]
    assert main(["report", str(out)]) == 0
    capsys.readouterr()
    part = (out / "report.md").read_text().split("### Per run")[1].split("###")[0]
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in part.splitlines() if ln.startswith("|")]
    assert rows[0] == ["attack", "target", "defense", "asr", "poisoned", "trigger"]
    (clean,) = [r for r in rows[2:] if r[0] == "clean"]
    (patch,) = [r for r in rows[2:] if r[0] == "own-patch"]
    assert clean[1:] == ["0", "none", "–", "0", "–"]
    assert patch[1:3] == ["1", "none"] and patch[4:] == ["48", "own-patch"] and 0 <= float(patch[3]) <= 100
