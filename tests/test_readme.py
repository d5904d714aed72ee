"""The README's Python snippet runs as written (its first half; the second half is a full experiment)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_snippet_runs(capsys):
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    first_half = block.split("# or the whole experiment")[0]
    assert "ab.evaluate" in first_half
    namespace: dict = {}
    exec(compile(first_half, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "'acc'" in out and "'asr'" in out and "'rho_vul'" in out
