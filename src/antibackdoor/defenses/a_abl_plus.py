"""A-ABL+: A-ABL with its options that are not the paper's switched on (docs/a-abl.md, "Options").

The same three stages, with Otsu's threshold on the log of the split score and the take back: after stage 3 the
isolated samples whose given label the robust model predicts are re-included and adversarial training continues
on the union. Which of these pays off, and by how much, is measured by ``benchmarks/bench_aabl_levers.py``;
``a-abl`` stays the paper's algorithm.
"""

from __future__ import annotations

from dataclasses import replace

from .a_abl import AABL
from .base import register_defense


@register_defense
class AABLPlus(AABL):
    name = "a-abl+"
    paper_settings_of = "a-abl"
    description = "A-ABL with a log-score Otsu split and the take back of isolated samples the robust model agrees with"
    assumptions = AABL.assumptions + (
        "A model adversarially trained on the kept samples has not learned the backdoor, so it predicts the true "
        "class of an isolated poisoned sample, not the label the sample was given; isolated samples whose given "
        "label it predicts are trained on again.",
    )
    # quick: 5 take-back epochs after the 20 of stage 3; paper: 20 after the 100 of stage 3
    presets = {
        "quick": replace(AABL.presets["quick"], split_log=True, takeback_epochs=5),
        "paper": replace(AABL.presets["paper"], split_log=True, takeback_epochs=20),
    }
