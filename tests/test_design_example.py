"""docs/design.md's worked example, run as written: a toy attack and a toy defense, one file each and no
other edit, appear in the listings and the CLI help and run end to end through the CLI and the Python API."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import antibackdoor.attacks
import antibackdoor.defenses
from antibackdoor.attacks import ATTACKS
from antibackdoor.cli import main
from antibackdoor.defenses import DEFENSES
from antibackdoor.registry import import_submodules

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"


def example_files() -> dict[str, str]:
    """The python blocks of the design document whose first line names their file in the package."""
    blocks = re.findall(r"```python\n(# src/antibackdoor/(\w+)/(\w+)\.py\n.*?)```", DESIGN.read_text(), re.S)
    return {f"{package}/{module}": code for code, package, module in blocks}


@pytest.fixture()
def toy_parts(tmp_path, monkeypatch):
    """Drop the two files into the attacks and defenses packages (as extra package folders) and import them
    the way each package imports its own modules; undo it all afterwards."""
    files = example_files()
    assert set(files) == {"attacks/pixel", "defenses/low_loss"}
    for package in (antibackdoor.attacks, antibackdoor.defenses):
        short = package.__name__.rsplit(".", 1)[1]
        folder = tmp_path / short
        folder.mkdir()
        for key, code in files.items():
            if key.startswith(short + "/"):
                (folder / f"{key.split('/')[1]}.py").write_text(code)
        monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
        import_submodules(package.__name__, package.__path__)
    yield
    ATTACKS.pop("pixel", None)
    DEFENSES.pop("low-loss", None)
    for name in ("antibackdoor.attacks.pixel", "antibackdoor.defenses.low_loss"):
        sys.modules.pop(name, None)


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_toy_attack_and_defense_need_one_file_each(toy_parts, tmp_path, tiny_npz, capsys):
    # listed, with the parameters' types, defaults and docs from the dataclasses
    code, out, _ = run_cli(["attacks"], capsys)
    assert code == 0 and "pixel (dirty label): one bright pixel" in out
    assert "    row: int = 0  row of the pixel" in out and "    value: float = 1.0  its intensity" in out
    code, out, _ = run_cli(["defenses"], capsys)
    assert code == 0 and "low-loss: drop the samples" in out and "    isolate: float = 0.1" in out
    assert "    train.epochs: int = 20 (paper: 100)" in out  # nested settings by the dotted names the CLI takes
    # the CLI help lists them (generated from the registries)
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "pixel" in help_text and "low-loss" in help_text
    # a bad value of the new parameter is one line, exit 2, before any run directory
    code, _, err = run_cli(["run", "--dataset", f"npz:{tiny_npz}", "--out", str(tmp_path / "bad"), "--attack",
                            "pixel", "--attack-param", "value=2"], capsys)
    assert code == 2 and "antibackdoor: error: --attack-param value: 2.0 must lie in [0, 1]" in err
    assert not (tmp_path / "bad").exists()
    # a whole run through the CLI
    args = ["run", "--dataset", f"npz:{tiny_npz}", "--out", str(tmp_path / "runs"), "--attack", "pixel",
            "--defense", "low-loss", "--model", "cnn-small", "--defense-param", "train.epochs=1",
            "--defense-param", "isolate=0.25", "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["poisoned"] == 24 and metrics["isolated"] == 60  # a quarter of 240 samples
    assert metrics["gamma"] == pytest.approx(0.75)
    run_dir = next((tmp_path / "runs").iterdir())
    assert run_dir.name.startswith("tiny.npz-pixel-low-loss-")
    rows = (run_dir / "isolation.csv").read_text().splitlines()
    assert rows[0] == "index,ce_loss,kept,is_poison,is_cover" and len(rows) == 241


def test_toy_parts_through_the_python_api(toy_parts, tmp_path, tiny_npz):
    import antibackdoor as ab

    attack = ab.get_attack("pixel", col=2)
    x = attack.apply(__import__("torch").zeros(1, 3, 4, 4))
    assert x[0, :, 0, 2].tolist() == [1.0, 1.0, 1.0] and float(x.sum()) == 3.0
    assert ab.get_defense("low-loss", "paper").params.train.epochs == 100
    run = ab.run_experiment({"dataset": f"npz:{tiny_npz}", "attack": "pixel", "defense": "low-loss",
                             "model": "cnn-small", "defense_params": {"train": {"epochs": 1}},
                             "out": str(tmp_path / "api")})
    assert run.metrics["isolated"] == 24 and run.result.info["threshold"] > 0
