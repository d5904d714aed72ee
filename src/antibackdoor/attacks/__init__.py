"""Poisoning attacks, one module each, registered by name (every submodule is imported here)."""

import importlib
import pkgutil

from .base import ATTACKS, Attack, PoisonedSet, get_attack, quantize, register_attack

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["ATTACKS", "Attack", "PoisonedSet", "get_attack", "quantize", "register_attack"]
