"""The papers' published numbers (package data ``bench/published/<table>.csv``), shown beside ours.

Each file starts with comment lines naming the paper and table it transcribes; its columns are ``dataset,
row, col, metric, value`` with the rows and column groups spelled as the paper prints them (and as the
suites label their axes), values in %.
"""

from __future__ import annotations

import csv
import functools
import io
from importlib import resources


@functools.lru_cache(maxsize=32)
def load(name: str) -> tuple[str, dict[tuple, float]]:
    """(source line, {(dataset, row, col, metric): value}) of a published table; ("", {}) if there is none."""
    try:
        text = resources.files("antibackdoor.bench").joinpath("published", f"{name}.csv").read_text()
    except (FileNotFoundError, OSError):
        return "", {}
    source = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
    body = "\n".join(line for line in text.splitlines() if line and not line.startswith("#"))
    values: dict[tuple, float] = {}
    for r in csv.DictReader(io.StringIO(body)):
        values[(r["dataset"], r["row"], r["col"], r["metric"])] = float(r["value"])
    return source, values


def available() -> list[str]:
    return sorted(p.name[:-4] for p in resources.files("antibackdoor.bench").joinpath("published").iterdir()
                  if p.name.endswith(".csv"))
