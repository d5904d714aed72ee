"""Defenses, one module each, registered by name (every submodule is imported here)."""

import importlib
import pkgutil

from .base import DEFENSES, Defense, DefenseContext, DefenseResult, get_defense, register_defense

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseResult", "get_defense", "register_defense"]
