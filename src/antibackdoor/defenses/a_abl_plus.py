"""A-ABL+: A-ABL with the options that paid off switched on (docs/a-abl.md, "Options" and "Measured so far").

The same three stages with Otsu's threshold on the log of the split score (``split_log``: keeps far more clean
data) and the purge (``purge``: the kept samples of the class with a surplus among the isolated ones that the
robust stage-3 model disagrees with are dropped and stage 3 is trained again). The take back stays off: it brought
poison back. Measured lever by lever by the grid ``benchmarks/grids/aabl-levers.yaml``; ``a-abl`` stays the paper's
algorithm.
"""

from __future__ import annotations

from dataclasses import replace

from .a_abl import AABL
from .base import register_defense


@register_defense
class AABLPlus(AABL):
    name = "a-abl+"
    label = ""  # not A-ABL's: tables name it by its name
    paper_settings_of = "a-abl"
    description = "A-ABL with a log-score Otsu split and a purge of the target class before a second stage 3"
    assumptions = AABL.assumptions + (
        "Poison left in the kept set carries the target label, and the target class shows a surplus among the "
        "isolated samples; a model adversarially trained on the kept samples has learned little of the backdoor, "
        "so it disagrees with the given label of most kept poisoned samples (and of some clean ones of that class, "
        "which are dropped too).",
    )
    presets = {
        "quick": replace(AABL.presets["quick"], split_log=True, purge=True),
        "paper": replace(AABL.presets["paper"], split_log=True, purge=True),
    }
