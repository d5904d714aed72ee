"""Defenses, one module each, registered by name (every submodule is imported here)."""

from ..registry import import_submodules
from ..stages import DefenseContext
from .base import DEFENSES, Defense, DefenseResult, get_defense, register_defense

import_submodules(__name__, __path__)

__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseResult", "get_defense", "register_defense"]
