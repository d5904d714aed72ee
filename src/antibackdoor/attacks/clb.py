"""Label-consistent backdoor, CLB (Turner, Tsipras & Madry 2019): a clean-label patch attack.

Target-class images keep their (correct) labels, so a plain patch on them would be ignored: the network
classifies them by their content. CLB first makes their content hard to use with an untargeted L-inf PGD
perturbation from an adversarially robust model (robust models' perturbations change semantic features), then
stamps the trigger; to fit them the network has to rely on the trigger. A-ABL's setting: eps 16/255, step
2/255, 30 steps, poisoning 50% of the target class (``rate`` is that fraction for clean-label attacks).

The trigger is Turner et al.'s 3 x 3 black/white checkerboard, in all four corners by default (mirrored, so a
horizontal flip keeps it; BackdoorBench's "all-corners") or only bottom-right, added with ``amplitude`` (1 =
full black/white; Turner et al. also study reduced amplitudes). Test images get the trigger only.

The robust model is trained by ``prepare`` with PGD adversarial training on the clean training set and cached
in the data root (``cache.py``); ``robust_epochs`` and the PGD settings control its cost. The ``paper``
preset trains a Madry-style robust ResNet-18 (PGD-10, step 2/255, 100 SGD epochs: hours on a CPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from ..adversarial.pgd import PGDConfig, pgd
from ..config import param
from ..data.imageset import ImageSet
from ..precision import active_precision
from ..training import TrainConfig
from .base import Attack, check_model, param_error, quantize, register_attack
from .cache import cached_model

log = logging.getLogger("antibackdoor")

#: the bottom-right 3 x 3 pattern: +1 = white, -1 = black
CHECKER = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])
Corners = Literal["all", "bottom-right"]


def corner_trigger(height: int, width: int, corners: Corners) -> torch.Tensor:
    """H x W map of +-1 (trigger pixels) and 0 (untouched), mirrored into the other corners for ``all``."""
    t = torch.zeros(height, width)
    t[-3:, -3:] = CHECKER
    if corners == "all":
        t[-3:, :3] = CHECKER.flip(1)
        t[:3, -3:] = CHECKER.flip(0)
        t[:3, :3] = CHECKER.flip(0, 1)
    return t


@dataclass(frozen=True)
class CLBParams:
    eps: float = param(16.0, doc="PGD budget on the poisoned images, /255 units (A-ABL)")
    step: float = param(2.0, doc="PGD step, /255 units (A-ABL)")
    steps: int = param(30, doc="PGD steps (A-ABL)")
    corners: Corners = param("all", doc="checkerboards in all four corners (mirrored) or bottom-right only")
    amplitude: float = param(1.0, doc="trigger added as +-amplitude (1: pure black/white)")
    robust_model: str = param("cnn", doc="architecture of the robust model")
    robust_epochs: int = param(10, doc="adversarial training epochs of the robust model")
    robust_eps: float = param(8.0, doc="its PGD budget, /255 units")
    robust_step: float = param(4.0, doc="its PGD step, /255 units")
    robust_steps: int = param(2, doc="its PGD steps")
    robust_optimizer: Literal["adam", "sgd"] = param("adam", doc="its optimizer")
    robust_lr: float = param(1e-3, doc="its learning rate, cosine schedule")
    model_seed: int = param(0, doc="seed of the robust model (independent of the run's seed)")

    def validate(self, where: str) -> None:
        check_model("robust_model", self.robust_model)
        if self.steps < 1 or not self.eps > 0 or not self.step > 0:
            raise param_error("eps", "eps > 0, step > 0 and steps >= 1 are required")


@register_attack
class CLB(Attack):
    name = "clb"
    label = "CLB"
    label_mode = "clean"
    description = "robust-model PGD (eps 16/255, 30 steps) + 3x3 checkerboards in 4 corners"
    Params = CLBParams
    presets = {
        "quick": CLBParams(),
        # a Madry-style robust ResNet-18 (PGD-10, step 2/255, 100 SGD epochs): hours on a CPU
        "paper": replace(CLBParams(), robust_model="resnet18", robust_epochs=100, robust_step=2.0, robust_steps=10,
                         robust_optimizer="sgd", robust_lr=0.1),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model: nn.Module | None = None
        self.cache_hit: bool | None = None

    # -- the trigger --------------------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        t = corner_trigger(x.shape[-2], x.shape[-1], self.params.corners).to(x.device, x.dtype)
        return (x + self.params.amplitude * t).clamp(0, 1)

    # -- the robust model -----------------------------------------------------------------------
    def robust_config(self) -> TrainConfig:
        p = self.params
        adv = PGDConfig(eps=p.robust_eps / 255, step=p.robust_step / 255, steps=p.robust_steps)
        # quick: Adam, as the quick adversarial training (SGD 0.05 diverged on the quick CNN under PGD)
        return TrainConfig(epochs=p.robust_epochs, optimizer=p.robust_optimizer, lr=p.robust_lr,
                           schedule="cosine", crop=4, flip=True, adversary=adv)

    def prepare(self, train: ImageSet, target: int, generator: torch.Generator) -> None:
        """Train (or load from the cache) the adversarially robust model; ``generator`` is not used, so the
        model depends only on the data and the parameters and can be shared by every run."""
        self.model, self.cache_hit = cached_model("clb", self.params.robust_model, self.robust_config(), train,
                                                  self.params.model_seed, "clb robust model")
        self.prepared = True

    def perturb(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Untargeted PGD (no random start) from the robust model: uint8 images -> float in [0, 1]."""
        if self.model is None:
            raise RuntimeError("attack clb: prepare() must run before perturb()")
        p = self.params
        cfg = PGDConfig(eps=p.eps / 255, step=p.step / 255, steps=p.steps, random_start=False)
        device = next(self.model.parameters()).device
        prec = active_precision(device)
        out = torch.empty(x.shape, dtype=torch.float32)
        for s in range(0, x.shape[0], batch_size):
            xb = x[s:s + batch_size].to(device).float().div(255.0)
            yb = y[s:s + batch_size].to(device)
            out[s:s + batch_size] = pgd(self.model, xb, yb, cfg, precision=prec).x_adv.cpu()
        return out

    # -- poisoning -----------------------------------------------------------------------------
    def poison_images(self, train: ImageSet, idx: torch.Tensor) -> torch.Tensor:
        """The PGD step from the robust model before the trigger (clean label: the base keeps the labels)."""
        adv = self.perturb(train.x[idx.to(train.x.device)].cpu(), train.y[idx.to(train.y.device)].cpu())
        return quantize(self.apply(adv))
