"""Poisoning attacks, one module each, registered by name (every submodule is imported here)."""

from ..registry import import_submodules
from .base import ATTACKS, Attack, PoisonedSet, get_attack, map_uint8, param_error, quantize, register_attack

import_submodules(__name__, __path__)

__all__ = ["ATTACKS", "Attack", "PoisonedSet", "get_attack", "map_uint8", "param_error", "quantize", "register_attack"]
