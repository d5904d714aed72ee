"""Strong-augmentation splits (A-ABL Table 5): A-ABL's split with the iFGSM example replaced by a strongly
augmented view. Every sample's view (RandAugment, AutoAugment or AugMix, drawn per sample) is scored by the
SCE loss of the suspect model; low loss = the prediction survives the augmentation = suspicious (patch triggers
survive most operations), and Otsu's threshold splits as in A-ABL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adversarial.losses import symmetric_cross_entropy
from ..adversarial.pgd import eval_mode
from ..data.strong_augment import STRONG_AUGMENTATIONS
from ..training import TrainConfig
from .base import PAPER_SUSPECT, QUICK_SUSPECT, Detector, IsolationRule, register_detector


@dataclass(frozen=True)
class AugSplitParams:
    model: TrainConfig = field(default_factory=lambda: QUICK_SUSPECT)
    views: int = 1  # SCE averaged over this many views per sample
    batch_size: int = 512
    rule: IsolationRule = field(default_factory=lambda: IsolationRule("otsu"))


@torch.no_grad()
def augmented_sce(model, data, augmentation: str, views: int, seed: int, device, batch_size: int = 512):
    """Mean SCE loss over ``views`` strongly augmented views of every sample (eval mode, seeded per view)."""
    fn = STRONG_AUGMENTATIONS[augmentation]
    out = torch.zeros(len(data), dtype=torch.float64)
    with eval_mode(model), torch.random.fork_rng(devices=[]):
        for v in range(views):
            torch.manual_seed(seed * 1009 + v)  # kornia's magnitudes come from the global generator
            gen = torch.Generator().manual_seed(seed * 7919 + v)
            for s in range(0, len(data), batch_size):
                x = data.x[s:s + batch_size].to(device).float().div_(255.0)
                logits = model(fn(x, generator=gen))
                y = data.y[s:s + batch_size].to(device)
                out[s:s + batch_size] += symmetric_cross_entropy(logits, y).double().cpu()
    return out / views


class _AugSplit(Detector):
    Params = AugSplitParams
    presets = {"quick": AugSplitParams(), "paper": AugSplitParams(model=PAPER_SUSPECT)}
    higher_is_suspicious = False
    augmentation = ""

    def _score(self, data, ctx, model):
        p = self.params
        return augmented_sce(model, data, self.augmentation, p.views, ctx.seed, ctx.device, p.batch_size), None, {}


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
