"""Strong-augmentation splits (A-ABL Table 5): A-ABL's split with the iFGSM example replaced by a strongly
augmented view. Every sample's view (RandAugment, AutoAugment or AugMix, drawn per sample) is scored by the
SCE loss of the suspect model; low loss = the prediction survives the augmentation = suspicious (patch triggers
survive most operations), and Otsu's threshold splits as in A-ABL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adversarial.losses import symmetric_cross_entropy
from ..adversarial.pgd import eval_mode
from ..config import param
from ..data.strong_augment import STRONG_AUGMENTATIONS
from ..errors import ConfigError
from ..precision import PLAIN, Precision
from ..seeding import generator, seeded_rng
from ..training import TrainConfig
from .base import PAPER_SUSPECT, Detector, IsolationRule, Scored, register_detector, rule_param, suspect_param


@dataclass(frozen=True)
class AugSplitParams:
    model: TrainConfig = suspect_param()
    views: int = param(1, doc="SCE averaged over this many augmented views per sample")
    batch_size: int = param(512, doc="images per forward pass")
    rule: IsolationRule = rule_param("otsu")

    def validate(self, where: str) -> None:
        if self.views < 1 or self.batch_size < 1:
            raise ConfigError(f"{where}: views >= 1 and batch_size >= 1 are required")


@torch.no_grad()
def augmented_sce(model, data, augmentation: str, views: int, seed: int, device, batch_size: int = 512,
                  precision: Precision | None = None) -> torch.Tensor:
    """Mean SCE loss over ``views`` strongly augmented views of every sample (eval mode; view ``v`` draws from
    the streams ``(seed, "strong-augment", augmentation, v)``; forward passes in ``precision``, None: fp32)."""
    fn = STRONG_AUGMENTATIONS[augmentation]
    prec = PLAIN if precision is None else precision
    out = torch.zeros(len(data), dtype=torch.float64)
    with eval_mode(model):
        for v in range(views):
            gen = generator(seed, "strong-augment", augmentation, v)
            # kornia draws its magnitudes from torch's global RNG: a forked, seeded one
            with seeded_rng(seed, "strong-augment", augmentation, "kornia", v):
                for s in range(0, len(data), batch_size):
                    x = data.x[s:s + batch_size].to(device).float().div_(255.0)
                    with prec.autocast():
                        logits = model(prec.batch(fn(x, generator=gen)))
                    y = data.y[s:s + batch_size].to(device)
                    out[s:s + batch_size] += symmetric_cross_entropy(logits.float(), y).double().cpu()
    return out / views


class _AugSplit(Detector):
    Params = AugSplitParams
    presets = {"quick": AugSplitParams(), "paper": AugSplitParams(model=PAPER_SUSPECT)}
    higher_is_suspicious = False
    augmentation = ""

    def _score(self, data, ctx, model):
        p = self.params
        scores = augmented_sce(model, data, self.augmentation, p.views, ctx.seed, ctx.device, p.batch_size,
                               ctx.compute_precision())
        return Scored(scores)


@register_detector
class RandAugmentSCE(_AugSplit):
    name = "randaugment-sce"
    description = "SCE loss of a per-sample RandAugment view (n 2, m 10); low = survives = suspicious; Otsu"
    augmentation = "randaugment"
    score_name = "sce_randaugment"


@register_detector
class AutoAugmentSCE(_AugSplit):
    name = "autoaugment-sce"
    description = "SCE loss of a per-sample AutoAugment (CIFAR-10 policy) view; low = suspicious; Otsu"
    augmentation = "autoaugment"
    score_name = "sce_autoaugment"


@register_detector
class AugMixSCE(_AugSplit):
    name = "augmix-sce"
    description = "SCE loss of a per-sample AugMix view (width 3, depth 1-3, severity 3); low = suspicious; Otsu"
    augmentation = "augmix"
    score_name = "sce_augmix"
