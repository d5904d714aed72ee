"""Progress bars (tqdm) that stay quiet when there is no description or when output is not a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def bar(it: Iterable, desc: str | None = None, **kw) -> Iterable:
    """Wrap ``it`` in a tqdm bar labelled ``desc``; no bar when desc is None or ANTIBACKDOOR_PROGRESS=0."""
    if desc is None or os.environ.get("ANTIBACKDOOR_PROGRESS", "1") == "0":
        return it
    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, **kw)
