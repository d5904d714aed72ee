"""Plain-torch models behind a normalisation layer, registered by name.

Every submodule is imported here, so a new architecture needs only its own file.
"""

from ..registry import import_submodules
from .registry import MODELS, Normalize, build_model, count_parameters, register_model

import_submodules(__name__, __path__)

__all__ = ["MODELS", "Normalize", "build_model", "count_parameters", "register_model"]
