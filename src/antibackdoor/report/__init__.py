"""Reports over run directories (``antibackdoor report``) and the reusable HTML machinery: a Jinja2
environment over the package's templates and inline-image helpers (see html.py)."""

from .build import write_report
from .html import jinja_env, png_data_uri, render

__all__ = ["jinja_env", "png_data_uri", "render", "write_report"]
