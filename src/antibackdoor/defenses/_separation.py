"""What D-BR and D-ST share on top of the sample-distinguishment module (``stages/separation.py``): their
result (D_p isolated, the FCT scores, each sample's part) and their figures."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..jsonutil import write_json
from ..plots import score_histogram
from ..stages.separation import PARTS, Separation
from .base import DefenseResult


def separation_result(sep: Separation, model: nn.Module, history: dict[str, list[dict]]) -> DefenseResult:
    """D-BR's and D-ST's result: ``model`` after their treatment, with D_p isolated and the separation's
    scores, facts and parts (``history`` adds the defense's own stages to the separation's)."""
    return DefenseResult(model, kept=~sep.poisoned, scores=sep.scores, score_name="fct", higher_is_suspicious=True,
                         info=sep.info(), history={**sep.history, **history}, sample_stats={"sd_part": sep.part()})


def write_separation(result: DefenseResult, poison_mask: torch.Tensor, run_dir: Path) -> list[Path]:
    """separation.json (how much true poison each part holds) and fct_scores.png (both thresholds), drawn
    from a D-BR/D-ST result: its FCT scores, ``sample_stats["sd_part"]`` and the thresholds in ``info``."""
    if result.scores is None or "sd_part" not in result.sample_stats:
        return []
    result_info, scores, code = result.info, result.scores, result.sample_stats["sd_part"].cpu()



    truth = poison_mask.bool().cpu()
    parts = {name: code == value for name, value in PARTS.items()}
    summary = {name: {"samples": int(m.sum()), "true_poison": int((m & truth).sum())} for name, m in parts.items()}
    summary["gamma_clean"] = result_info.get("gamma_clean")
    summary["gamma_poison"] = result_info.get("gamma_poison")
    path_json = run_dir / "separation.json"
    write_json(path_json, summary)
    lines = [(key, float(result_info[key]), style) for key, style in (("gamma_clean", ":"), ("gamma_poison", "--"))
             if result_info.get(key) is not None]
    path_png = score_histogram(scores, truth, run_dir / "fct_scores.png",
                               xlabel="FCT (feature change under rotation + shift)", lines=lines)
    return [path_json, path_png]
