"""The ``report`` command (registered by antibackdoor.cli)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="write report.md, results.csv and a self-contained report.html for a folder "
                                      "of runs (a bench --out or a run --out)")
    r.add_argument("dir", metavar="DIR", help="folder holding run directories (searched recursively)")
    r.add_argument("--title", help="the report's title")


def cmd_report(args: argparse.Namespace) -> int:
    from .build import write_report

    paths = write_report(args.dir, title=args.title)
    for kind in ("html", "markdown", "csv"):
        print(f"{kind:<8} {paths[kind]}")
    print(f"open {paths['html']} in a browser (self-contained, no network)", file=sys.stderr)
    return 0
