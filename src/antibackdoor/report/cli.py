"""The ``report`` command (registered by antibackdoor.cli)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .build import write_report


def add_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="write report.md, results.csv and a self-contained report.html for a folder "
                                      "of runs (a bench --out or a run --out)")
    r.add_argument("dir", metavar="DIR", help="folder holding run directories (searched recursively)")
    r.add_argument("--title", help="the report's title")
    r.add_argument("--columns", metavar="PATH,PATH",
                   help="a per-run table with these values of metrics.json (dotted paths: sample_flags.purged.poison, "
                        "defense_info.q, sample_flags.*.share; see docs/bench.md), in place of a grid's own columns; "
                        "also added to results.csv")


def cmd_report(args: argparse.Namespace) -> int:

    paths = write_report(args.dir, title=args.title, columns=args.columns)
    for kind in ("html", "markdown", "csv"):
        print(f"{kind:<8} {paths[kind]}")
    print(f"open {paths['html']} in a browser (self-contained, no network)", file=sys.stderr)
    return 0
