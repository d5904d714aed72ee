"""Spectral signatures (Tran, Li & Madry, NeurIPS 2018): poisoned samples of a class leave a trace along
the top singular vector of the class's centred representations.

Per class: R = the penultimate features of the class minus their mean, v = R's top right singular vector,
score_i = <R_i, v>^2. The paper's rule removes the 1.5 * eps * n_c highest scores of every class, eps being
the defender's bound on the poisoned fraction (``poison_rate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import param
from ..errors import ConfigError
from ..models.features import penultimate_features
from ..training import TrainConfig
from .base import PAPER_SUSPECT, Detector, IsolationRule, Scored, register_detector, rule_param, suspect_param


@dataclass(frozen=True)
class SpectralParams:
    model: TrainConfig = suspect_param()
    poison_rate: float = param(0.1, doc="eps: the bound on the poisoned fraction the removal rule assumes")
    removal_factor: float = param(1.5, doc="the rule removes removal_factor * eps * n_c samples per class")
    rule: IsolationRule = rule_param()

    def validate(self, where: str) -> None:
        if not 0 < self.poison_rate < 1 or self.removal_factor <= 0:
            raise ConfigError(f"{where}: poison_rate in (0, 1) and removal_factor > 0 "
                              "are required")


def spectral_scores(features: torch.Tensor) -> torch.Tensor:
    """Squared projections of the centred rows of ``features`` (n x D) on their top right singular vector."""
    r = features.double()
    r = r - r.mean(0, keepdim=True)
    if r.shape[0] < 2:
        return torch.zeros(r.shape[0], dtype=torch.float64)
    _, _, vh = torch.linalg.svd(r, full_matrices=False)
    return (r @ vh[0]) ** 2


@register_detector
class SpectralSignature(Detector):
    name = "spectral-signature"
    description = "Tran et al.: per class, squared projection on the top singular vector; drop 1.5 eps n_c"
    Params = SpectralParams
    presets = {"quick": SpectralParams(), "paper": SpectralParams(model=PAPER_SUSPECT)}
    has_native_rule = True
    higher_is_suspicious = True
    score_name = "spectral_score"

    def _score(self, data, ctx, model):
        p = self.params
        feats = penultimate_features(model, data.x, ctx.device, precision=ctx.compute_precision())
        y = data.y.cpu()
        scores = torch.zeros(len(y), dtype=torch.float64)
        native = torch.zeros(len(y), dtype=torch.bool)
        removed = {}
        for c in range(data.num_classes):
            idx = (y == c).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            s = spectral_scores(feats[idx])
            scores[idx] = s
            # ceil, but 1.5 * 0.1 * 100 is 15.000000000000002 in floating point: round first
            count = min(idx.numel(), math.ceil(round(p.removal_factor * p.poison_rate * idx.numel(), 6)))
            top = torch.sort(s, descending=True, stable=True).indices[:count]
            native[idx[top]] = True
            removed[c] = count
        return Scored(scores, native, info={"removed_per_class": removed})
