"""What every registry package shares: importing all of its modules, so a new part is one file."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def import_submodules(package: str, path: Iterable[str]) -> list[str]:
    """Import every module of ``package`` (found on its ``__path__``) whose name does not start with ``_``;
    each registers its parts on import. Returns the module names, in the order imported."""
    names = sorted(m.name for m in pkgutil.iter_modules(list(path)) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
