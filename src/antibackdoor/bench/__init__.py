"""Grids of experiments: named suites mirroring the papers' tables, executors (local processes, Ray,
Slurm) and the stage cache that trains each backdoored model once."""

from .grid import Cell, Choice, Grid
from .stage_cache import StageCache
from .suites import SUITES, Suite, TableSpec

__all__ = ["SUITES", "Cell", "Choice", "Grid", "StageCache", "Suite", "TableSpec"]
