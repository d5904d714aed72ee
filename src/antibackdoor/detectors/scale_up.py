"""SCALE-UP (Guo et al., ICLR 2023): poisoned inputs keep their prediction when their pixel values are
amplified, clean ones drift. Scaled prediction consistency SPC(x) = the share of amplification factors n
(the paper's 3, 5, 7, 9, 11) with argmax f(clip(n * x, 0, 1)) = argmax f(x); high SPC = suspicious. The rule
flags SPC >= ``rule.value`` (1.0: consistent at every factor).

Public reports find it weak against a small white patch such as BadNets' 3x3 square; docs/detectors.md has
our measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adversarial.pgd import eval_mode
from ..training import TrainConfig
from .base import PAPER_SUSPECT, QUICK_SUSPECT, Detector, IsolationRule, register_detector


@dataclass(frozen=True)
class ScaleUpParams:
    model: TrainConfig = field(default_factory=lambda: QUICK_SUSPECT)
    factors: tuple[float, ...] = (3.0, 5.0, 7.0, 9.0, 11.0)
    batch_size: int = 512
    rule: IsolationRule = field(default_factory=lambda: IsolationRule("threshold", 1.0))


@torch.no_grad()
def scaled_consistency(model, images: torch.Tensor, factors, device, batch_size: int = 512) -> torch.Tensor:
    """SPC of every uint8 image: the fraction of ``factors`` whose amplified image keeps the prediction."""
    out = []
    with eval_mode(model):
        for s in range(0, images.shape[0], batch_size):
            x = images[s:s + batch_size].to(device).float().div_(255.0)
            base = model(x).argmax(1)
            same = torch.zeros(x.shape[0], device=device)
            for n in factors:
                same += (model((x * n).clamp_(0, 1)).argmax(1) == base).float()
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
        return scaled_consistency(model, data.x, p.factors, ctx.device, p.batch_size), None, {}
