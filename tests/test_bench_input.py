"""`antibackdoor bench` on careless and hostile input: every mistake in a user's grid file or in the bench's
options ends with one line `antibackdoor: error: ...` and exit code 2 before anything is written; a named suite
may skip methods that are missing, and says so; a Ray cluster that cannot serve a cell fails at once (a fake
`ray` module stands in for Ray, which is not installed here); a cell whose process is gone reads interrupted."""

from __future__ import annotations

import subprocess
import sys
import threading
import types

import pytest
import yaml
from conftest import write_npz

from antibackdoor.cli import main


def _grid(tmp_path, **over) -> str:
    npz = write_npz(tmp_path / "tiny.npz")
    grid = {"name": "g", "datasets": [f"npz:{npz}"], "attacks": ["badnets"], "models": ["cnn-small"],
            "defenses": [{"name": "none", "params": {"train": {"epochs": 1}}}], "targets": [1],
            "eval": {"ra_steps": 1}, **over}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return str(path)


def _error(args, capsys) -> str:
    """Run the bench, expecting the one-line error; returns it."""
    code = main(["bench", *args])
    out = capsys.readouterr()
    assert code == 2, out.err
    assert out.err.startswith("antibackdoor: error: ") and out.err.count("\n") == 1, out.err
    assert "Traceback" not in out.err and not out.out
    return out.err


@pytest.mark.parametrize("defense, says", [
    ({"name": "none", "params": {"train": {"epochz": 1}}}, "defense none: params.train: unknown key(s) epochz"),
    ({"name": "a-abl", "params": {"naive": {"epochs": "x"}}}, "defense a-abl: params.naive.epochs"),
    ("no-such-defense", "defense no-such-defense: 'no-such-defense' is not a registered defense; known: "),
    ({"name": "isolate-then-train", "params": {"detector": "no-such-detector"}},
     "'no-such-detector' is not a registered detector"),
    ({"name": "isolate-then-train", "params": {"detector": "ifgsm-sce", "detector_params": {"rulez": 1}}},
     "defense isolate-then-train: detector ifgsm-sce: params.detector_params.rulez: unknown parameter"),
])
def test_a_typo_in_a_grid_file_is_an_error_not_a_skipped_cell(tmp_path, capsys, defense, says):
    """Once such a defense was 'skipped', the bench printed 'nothing to run: every cell is done' for 0 cells
    and exited 0; --dry-run even wrote a manifest."""
    grid = _grid(tmp_path, defenses=[defense])
    out = tmp_path / "out"
    for extra in ([], ["--dry-run"], ["--status"]):
        err = _error([grid, "--out", str(out), *extra], capsys)
        assert grid in err and says in err, err
    assert not out.exists()


def test_a_grid_whose_dataset_does_not_load_is_an_error(tmp_path, capsys):
    grid = _grid(tmp_path, datasets=[f"npz:{tmp_path / 'missing.npz'}"])
    err = _error([grid, "--out", str(tmp_path / "out")], capsys)
    assert f"{grid}: dataset npz:{tmp_path / 'missing.npz'}: " in err and "no such file" in err
    assert not (tmp_path / "out").exists()


def test_a_grid_without_cells_is_an_error_never_every_cell_is_done(tmp_path, capsys):
    grid = _grid(tmp_path, exclude=[{"attack": "badnets"}])
    err = _error([grid, "--out", str(tmp_path / "out")], capsys)
    assert "no cell to run" in err and "every cell is done" not in err
    assert not (tmp_path / "out").exists()


def test_dry_run_writes_nothing(tmp_path, capsys):
    grid = _grid(tmp_path)
    out = tmp_path / "out"
    assert main(["bench", grid, "--out", str(out), "--dry-run"]) == 0
    assert "would run: " in capsys.readouterr().out
    assert not out.exists()  # no manifest, no run directory


def test_a_suite_skips_missing_methods_and_says_so(tmp_path, capsys, monkeypatch):
    """A named suite may name methods that are not in this installation yet: it runs the rest and says how many
    cells it leaves out and why (a user's grid file may not, above)."""
    from antibackdoor.bench import suites
    from antibackdoor.bench.suites import Suite

    npz = write_npz(tmp_path / "tiny.npz")
    grid = {"datasets": [f"npz:{npz}"], "attacks": [{"name": "badnets", "label": "BadNets"}],
            "models": ["cnn-small"], "eval": {"ra_steps": 1},
            "defenses": [{"name": "none", "label": "No defense"}, {"name": "not-yet", "label": "Not yet"}]}
    monkeypatch.setitem(suites.SUITES, "tiny-suite", Suite("tiny-suite", "a tiny suite", "tests", "", {"quick": grid},
                                                           ()))
    out = tmp_path / "out"
    assert main(["bench", "tiny-suite", "--out", str(out), "--targets", "1", "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert "NOTE: 1 of the suite's 2 cells are skipped and will not run:" in cap.err
    assert "defenses not available yet: not-yet" in cap.err and cap.out.count("would run: ") == 1
    assert not out.exists()


@pytest.mark.parametrize("option, says", [
    (["--retries", "-3"], "--retries -3: must be >= 0"),
    (["--threads", "0"], "--threads 0: must be >= 1"),
    (["--workers", "0"], "--workers 0: must be >= 1"),
    (["--cpus-per-cell", "nan"], "--cpus-per-cell nan: must be a number > 0"),
    (["--gpus-per-cell", "-1"], "--gpus-per-cell -1: must be a number >= 0"),
    (["--executor", "ray"], "--executor ray: ray is not installed"),
])
def test_bad_bench_options_stop_it_before_the_plan(tmp_path, capsys, monkeypatch, option, says):
    """Checked first: the grid's data set does not exist, so an error about the option proves that the option
    was checked before the plan (which would load the data) -- and nothing is written."""
    if option == ["--executor", "ray"]:
        monkeypatch.setitem(sys.modules, "ray", None)  # not installed, even where it is
    grid = _grid(tmp_path, datasets=[f"npz:{tmp_path / 'missing.npz'}"])
    err = _error([grid, "--out", str(tmp_path / "out"), *option], capsys)
    assert says in err, err
    assert not (tmp_path / "out").exists()


def test_threads_zero_is_not_silently_two():
    from antibackdoor.bench.executors import LocalExecutor, split_threads
    from antibackdoor.errors import ConfigError

    assert split_threads(2, None, cores=8) == 4 and split_threads(2, 3) == 3
    with pytest.raises(ConfigError, match="--threads 0"):
        LocalExecutor(1, 0)


# -- Ray, faked ----------------------------------------------------------------------------------------------
def _fake_ray(monkeypatch, resources=None, init=None) -> types.SimpleNamespace:
    """A stand-in ``ray`` module: records init/shutdown, reports ``resources``; runs no task."""
    calls = types.SimpleNamespace(init=[], shutdown=0, remote=0)
    mod = types.ModuleType("ray")
    state = {"up": False}

    def _init(**kwargs):
        calls.init.append(kwargs)
        if init is not None:
            init(**kwargs)
        state["up"] = True

    def _shutdown():
        calls.shutdown += 1
        state["up"] = False

    def _remote(*a, **k):
        calls.remote += 1
        raise AssertionError("no task may be submitted")

    mod.init, mod.shutdown, mod.remote = _init, _shutdown, _remote
    mod.is_initialized = lambda: state["up"]
    mod.cluster_resources = lambda: dict(resources or {"CPU": 4.0})
    monkeypatch.setitem(sys.modules, "ray", mod)
    return calls


def test_ray_without_the_gpus_a_cell_asks_for_fails_at_once(tmp_path, capsys, monkeypatch):
    """A task asking for a GPU on a cluster without one never starts, and Ray says nothing: the bench compares
    the request with the cluster's resources and stops before submitting anything."""
    calls = _fake_ray(monkeypatch, {"CPU": 16.0})
    out = tmp_path / "out"
    err = _error([_grid(tmp_path), "--out", str(out), "--executor", "ray", "--gpus-per-cell", "1"], capsys)
    assert "--gpus-per-cell 1: the cluster has 16 CPU and 0 GPU in all, so no cell could ever start" in err
    assert len(calls.init) == 1 and calls.shutdown == 1 and calls.remote == 0  # the local instance it started
    assert not (out / "runs").exists() and not (out / "bench").exists()
    calls = _fake_ray(monkeypatch, {"CPU": 2.0, "GPU": 1.0})
    err = _error([_grid(tmp_path), "--out", str(out), "--executor", "ray", "--cpus-per-cell", "4"], capsys)
    assert "--cpus-per-cell 4: the cluster has 2 CPU and 1 GPU in all" in err


def test_ray_address_where_nothing_listens_fails_at_once(tmp_path, capsys, monkeypatch):
    import socket

    calls = _fake_ray(monkeypatch)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _error([_grid(tmp_path), "--out", str(tmp_path / "out"), "--executor", "ray",
                  "--ray-address", f"127.0.0.1:{port}"], capsys)
    assert f"--ray-address 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}" in err
    assert calls.init == []  # Ray was never asked (it would retry for minutes)


def test_ray_connection_that_hangs_times_out_in_one_line(tmp_path, capsys, monkeypatch):
    from antibackdoor.bench.executors import RayExecutor

    release = threading.Event()
    calls = _fake_ray(monkeypatch, init=lambda **k: release.wait(30))
    monkeypatch.setattr(RayExecutor, "connect_timeout_s", 0.5)
    try:
        err = _error([_grid(tmp_path), "--out", str(tmp_path / "out"), "--executor", "ray",
                      "--ray-address", "auto"], capsys)
    finally:
        release.set()
    assert "--ray-address auto: no connection to Ray within 0.5 s" in err
    assert calls.init and calls.init[0]["address"] == "auto" and calls.remote == 0


def test_ray_that_refuses_the_connection_is_one_line(tmp_path, capsys, monkeypatch):
    def refuse(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.\nPlease start one first.")

    _fake_ray(monkeypatch, init=refuse)
    err = _error([_grid(tmp_path), "--out", str(tmp_path / "out"), "--executor", "ray", "--ray-address", "auto"],
                 capsys)
    assert "--ray-address auto: Ray did not start: Could not find any running Ray instance." in err


# -- a cell whose process is gone ------------------------------------------------------------------------------
def test_status_says_interrupted_when_the_running_process_is_gone(tmp_path, capsys):
    """status.json says running, but the process that wrote it is gone (SIGKILL, a lost machine): --status
    says so instead of counting the cell as running."""
    from antibackdoor.bench.grid import Grid
    from antibackdoor.bench.runner import make_plan
    from antibackdoor.jsonutil import write_json

    grid = _grid(tmp_path, targets=[1, 2])
    out = tmp_path / "out"
    plan = make_plan(Grid.load(grid), None, out)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = plan.cells[1].run_dir
    for p, pid in ((plan.cells[0].run_dir, gone.pid), (alive, None)):
        p.mkdir(parents=True)
        # what a run of this host writes (runpath): its pid and the host, so the pid can be judged here
        write_json(p / "status.json", {"state": "running", "pid": pid or __import__("os").getpid(),
                                       "host": __import__("socket").gethostname()})
    assert main(["bench", grid, "--out", str(out), "--status"]) == 0
    text = capsys.readouterr().out
    assert "2 cells: 0 done, 0 failed, 1 running, 1 interrupted, 0 pending" in text
    assert f"interrupted (process {gone.pid} is gone)" in text
    assert sum(ln.strip().startswith("running") for ln in text.splitlines()) == 1  # this process: alive


def test_progress_lines_show_the_split_only_where_the_defense_split():
    """gamma and rho_vul of a defense that isolates nothing restate the data (100 % kept, the poison rate)."""
    from antibackdoor.bench.cli import summary_line

    undefended = {"acc": 0.6, "asr": 0.9, "ra": 0.1, "gamma": 1.0, "rho_vul": 0.1, "isolated": 0}
    assert summary_line(undefended) == "ACC 60.0 ASR 90.0 RA 10.0"
    split = {**undefended, "gamma": 0.8, "rho_vul": 0.02, "isolated": 40}
    assert summary_line(split) == "ACC 60.0 ASR 90.0 RA 10.0 GAMMA 80.0 RHO_VUL 2.0"
