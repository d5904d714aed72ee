"""SCALE-UP (Guo et al., ICLR 2023): poisoned inputs keep their prediction when their pixel values are
amplified, clean ones drift. Scaled prediction consistency SPC(x) = the share of amplification factors n
(the paper's 3, 5, 7, 9, 11) with argmax f(clip(n * x, 0, 1)) = argmax f(x); high SPC = suspicious. The rule
flags SPC >= ``rule.value`` (1.0: consistent at every factor).

Public reports find it weak against a small white patch such as BadNets' 3x3 square; docs/detectors.md has
our measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adversarial.pgd import eval_mode
from ..config import param
from ..errors import ConfigError
from ..precision import PLAIN, Precision
from ..training import TrainConfig
from .base import PAPER_SUSPECT, Detector, IsolationRule, Scored, register_detector, rule_param, suspect_param


@dataclass(frozen=True)
class ScaleUpParams:
    model: TrainConfig = suspect_param()
    factors: tuple[float, ...] = param((3.0, 5.0, 7.0, 9.0, 11.0), doc="pixel amplification factors (paper)")
    batch_size: int = param(512, doc="images per forward pass")
    rule: IsolationRule = rule_param("threshold", 1.0)

    def validate(self, where: str) -> None:
        if not self.factors or self.batch_size < 1:
            raise ConfigError(f"{where}: at least one factor and batch_size >= 1 are required")


@torch.no_grad()
def scaled_consistency(model, images: torch.Tensor, factors, device, batch_size: int = 512,
                       precision: Precision | None = None) -> torch.Tensor:
    """SPC of every uint8 image: the fraction of ``factors`` whose amplified image keeps the prediction
    (forward passes in ``precision``; None: plain fp32)."""
    prec = PLAIN if precision is None else precision

    def predict(x: torch.Tensor) -> torch.Tensor:
        with prec.autocast():
            return model(prec.batch(x)).argmax(1)

    out = []
    with eval_mode(model):
        for s in range(0, images.shape[0], batch_size):
            x = images[s:s + batch_size].to(device).float().div_(255.0)
            base = predict(x)
            same = torch.zeros(x.shape[0], device=device)
            for n in factors:
                same += (predict((x * n).clamp_(0, 1)) == base).float()
            out.append((same / len(factors)).double().cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


@register_detector
class ScaleUp(Detector):
    name = "scale-up"
    description = "SCALE-UP: prediction consistency under pixel amplification x3..x11; high = suspicious"
    Params = ScaleUpParams
    presets = {"quick": ScaleUpParams(), "paper": ScaleUpParams(model=PAPER_SUSPECT)}
    higher_is_suspicious = True
    score_name = "spc"

    def _score(self, data, ctx, model):
        p = self.params
        spc = scaled_consistency(model, data.x, p.factors, ctx.device, p.batch_size, ctx.compute_precision())
        return Scored(spc)
