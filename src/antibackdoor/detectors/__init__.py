"""Isolation detectors, one module each, registered by name (every submodule is imported here)."""

from ..registry import import_submodules
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

import_submodules(__name__, __path__)

__all__ = ["DETECTORS", "DetectionResult", "Detector", "IsolationRule", "apply_rule", "detection_metrics",
           "get_detector", "register_detector", "roc_curve_points"]
