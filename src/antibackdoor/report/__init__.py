"""Reports over run directories (``antibackdoor report``) and the reusable HTML machinery: a Jinja2
environment over the package's templates and inline-image helpers (see html.py)."""

from .html import jinja_env, png_data_uri, render

__all__ = ["jinja_env", "png_data_uri", "render", "write_report"]


def write_report(*args, **kwargs):
    """See build.write_report (imported lazily: it pulls in matplotlib)."""
    from .build import write_report as _write_report

    return _write_report(*args, **kwargs)
