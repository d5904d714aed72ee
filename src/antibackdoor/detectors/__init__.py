"""Isolation detectors, one module each, registered by name (every submodule is imported here)."""

import importlib
import pkgutil

from .base import (
    DETECTORS,
    DetectionResult,
    Detector,
    IsolationRule,
    apply_rule,
    get_detector,
    register_detector,
)
from .evaluate import detection_metrics, roc_curve_points

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name not in ("base", "evaluate"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["DETECTORS", "DetectionResult", "Detector", "IsolationRule", "apply_rule", "detection_metrics",
           "get_detector", "register_detector", "roc_curve_points"]
