"""The README's Python snippet runs as written (its first half; the second half is a full experiment), on a
slice of the bundled data: what is checked is that the calls fit together and print what the README says, which
the size of the data does not change."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import antibackdoor as ab

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_api_snippet_runs(capsys, monkeypatch, mini):
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    first_half = block.split("# or the whole experiment")[0]
    assert "ab.evaluate" in first_half and 'ab.load_dataset("cifar10-mini")' in first_half
    # 400 training images (every class) and 100 test images instead of 5,170 and 1,017
    small = ab.DatasetSplits(mini.train.subset(torch.arange(400)), mini.test.subset(torch.arange(100)), mini.paper)
    asked = []
    monkeypatch.setattr(ab, "load_dataset", lambda name, *a, **k: asked.append(name) or small)
    namespace: dict = {}
    exec(compile(first_half, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert asked == ["cifar10-mini"]
    assert "'acc'" in out and "'asr'" in out and "'ra'" in out and "'rho_vul'" in out and "'tpr'" in out
