"""What every registry shares: one ``Registry`` type (name -> part) and importing all of a package's modules, so a
new part is one file.

Attacks, defenses, detectors, datasets and models each have one ``Registry``; the CLI listings and help texts,
``bench`` and the docs look parts up there by name only.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """The parts of one kind by name (a read-only mapping; ``register`` adds one).

    ``kind`` names the part in errors (``attack``), ``option`` the option that picks one (``--attack``).
    """

    def __init__(self, kind: str, option: str):
        self.kind = kind
        self.option = option
        self._parts: dict[str, T] = {}

    def register(self, part: T) -> T:
        """Add ``part`` under its ``name`` (a class decorator for attacks, defenses and detectors); a module
        imported again replaces its earlier registration."""
        name = getattr(part, "name", "")
        if not name:
            raise ValueError(f"{part!r} has no name")
        self._parts[name] = part
        return part

    def pop(self, name: str, default: T | None = None) -> T | None:
        """Remove the part called ``name`` (a test's or a plugin's part that goes away); ``default`` if absent."""
        return self._parts.pop(name, default)

    def lookup(self, name: str, shown: str | None = None, extra: Iterable[str] = ()) -> T:
        """The part called ``name``, or a one-line error naming the option, ``shown`` (default ``name``) and the
        known names (with ``extra`` names the option also accepts, such as ``none``)."""
        part = self._parts.get(name)
        if part is None:
            known = ", ".join([*extra, *sorted(self._parts)])
            raise ConfigError(f"{self.option}: unknown {self.kind} {shown or name!r}; known: {known}")
        return part

    def __getitem__(self, name: str) -> T:
        return self._parts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(sorted(self._parts))})"


def import_submodules(package: str, path: Iterable[str]) -> list[str]:
    """Import every module of ``package`` (found on its ``__path__``) whose name does not start with ``_``;
    each registers its parts on import. Returns the module names, in the order imported."""
    names = sorted(m.name for m in pkgutil.iter_modules(list(path)) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
