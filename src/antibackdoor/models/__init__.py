"""Plain-torch models behind a normalisation layer, registered by name.

Every submodule is imported here, so a new architecture needs only its own file.
"""

import importlib
import pkgutil

from .registry import MODELS, Normalize, build_model, count_parameters, register_model

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["MODELS", "Normalize", "build_model", "count_parameters", "register_model"]
