"""Self-contained HTML pages: a Jinja2 environment over the package's templates and helpers that turn
matplotlib figures or PNG files into inline ``data:`` URIs, so a page opens from disk with no network and
no files beside it. Shared by ``antibackdoor report`` and any other command that writes an HTML page.
"""

from __future__ import annotations

import base64
import functools
import io
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader


@functools.lru_cache(maxsize=1)
def jinja_env() -> Environment:
    """Templates from ``antibackdoor/report/templates`` (autoescaped HTML, ``pct`` and ``num`` filters)."""
    env = Environment(loader=PackageLoader("antibackdoor.report", "templates"),
                      autoescape=lambda name: name is not None and ".html" in name,  # not for Markdown
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["pct"] = lambda v, d=1: "–" if v is None else f"{100 * v:.{d}f}"
    env.filters["num"] = lambda v, d=3: "–" if v is None else f"{v:.{d}g}"
    return env


def render(template: str, **context: Any) -> str:
    return jinja_env().get_template(template).render(**context)


def png_data_uri(source: Any, dpi: int = 110) -> str:
    """A ``data:image/png;base64,...`` URI of a matplotlib figure (closed afterwards) or of a PNG file."""
    if isinstance(source, str | Path):
        data = Path(source).read_bytes()
    else:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        source.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(source)
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
