"""Trojan attack (Liu et al., NDSS 2018): a watermark-like patch trigger, dirty label.

By default the trigger is a fixed ``size`` x ``size`` patch in a corner, filled with a seeded colour pattern
(like the square "trojan" triggers of NAD/ABL), stamped over the image (``alpha`` 1) or blended in. Its
``shape`` is a filled square or a ``ring`` (outline only, a watermark-like frame).

With ``optimize=True`` the pattern is generated as in the original attack: a clean model is trained on the
(clean) training set in ``prepare`` (cached in the data root, see ``cache.py``), the ``neurons`` inputs of
its last linear layer with the largest summed absolute weights are chosen (the best-connected neurons), and
the pixels inside the mask are optimised by signed-gradient steps so that these neurons reach
``target_value`` on the trigger alone (black background), as BackdoorBench's ``trojannn`` does (2 neurons,
target 100). The original then retrains the model; as a data-poisoning attack we keep only the trigger.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from ..config import param
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..precision import active_precision
from ..seeding import fixed_generator
from ..training import TrainConfig
from .base import Attack, check_model, param_error, patch_fits, register_attack
from .cache import cached_model

log = logging.getLogger("antibackdoor")

Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left"]
Shape = Literal["square", "ring"]


def patch_mask(shape: Shape, size: int) -> torch.Tensor:
    """A size x size boolean mask: ``square`` (all) or ``ring`` (a one-pixel frame)."""
    if shape == "square":
        return torch.ones(size, size, dtype=torch.bool)
    m = torch.zeros(size, size, dtype=torch.bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m


def corner_slices(corner: Corner, size: int, margin: int, h: int, w: int) -> tuple[slice, slice]:
    top = corner.startswith("top")
    left = corner.endswith("left")
    r = slice(margin, margin + size) if top else slice(h - margin - size, h - margin)
    c = slice(margin, margin + size) if left else slice(w - margin - size, w - margin)
    return r, c


def last_linear(model: nn.Module) -> nn.Linear:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ConfigError("--attack-param optimize: trojan's optimisation needs a model with a final nn.Linear layer")
    return layers[-1]


@dataclass(frozen=True)
class TrojanParams:
    size: int = param(5, doc="patch side in pixels")
    margin: int = param(0, doc="distance to the image border")
    corner: Corner = param("bottom-right", doc="where the patch sits")
    shape: Shape = param("square", doc="filled square or a one-pixel ring (a watermark-like frame)")
    alpha: float = param(1.0, doc="1 stamps the patch; below 1 blends it in")
    pattern_seed: int = param(0, doc="seed of the colour pattern (and of the optimisation's start)")
    optimize: bool = param(False, doc="generate the pattern against a clean model (the original Trojan)")
    neurons: int = param(2, doc="neurons of the last linear layer to excite (BackdoorBench trojannn)")
    target_value: float = param(100.0, doc="value the chosen neurons are pushed to")
    opt_steps: int = param(300, doc="signed-gradient steps on the patch pixels")
    opt_step: float = param(0.01, doc="size of each step")
    clean_model: str = param("cnn", doc="architecture of the clean model")
    clean_epochs: int = param(10, doc="its training epochs, Adam 1e-3")
    model_seed: int = param(0, doc="seed of the clean model (independent of the run's seed)")

    def validate(self, where: str) -> None:
        if self.size < 1 or self.margin < 0:
            raise param_error("size", f"size {self.size} must be >= 1 and margin {self.margin} >= 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise param_error("alpha", f"{self.alpha} must lie in [0, 1]")
        if self.neurons < 1:
            raise param_error("neurons", f"{self.neurons} must be >= 1")
        check_model("clean_model", self.clean_model)


@register_attack
class Trojan(Attack):
    name = "trojan"
    label = "Trojan"
    label_mode = "dirty"
    description = "5x5 seeded colour (watermark-like) corner patch, optionally neuron-optimised"
    Params = TrojanParams
    presets = {
        "quick": TrojanParams(),
        # the original generation as in BackdoorBench's trojannn: 1000 steps against a trained clean ResNet-18
        "paper": replace(TrojanParams(), optimize=True, opt_steps=1000, clean_model="resnet18", clean_epochs=100),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._optimized: torch.Tensor | None = None  # C x size x size, set by prepare when optimize=True

    def check_fit(self, height: int, width: int, channels: int) -> None:
        """The patch and its margin must lie inside the image."""
        patch_fits(self.params.size, self.params.margin, height, width)
        self.cache_hit: bool | None = None

    # -- the trigger --------------------------------------------------------------------------
    def mask(self) -> torch.Tensor:
        return patch_mask(self.params.shape, self.params.size)

    def seeded_pattern(self, channels: int) -> torch.Tensor:
        """Each pixel and channel black or white, from ``pattern_seed``."""
        g = fixed_generator(self.params.pattern_seed)
        return torch.randint(0, 2, (channels, self.params.size, self.params.size), generator=g).float()

    def pattern(self, channels: int) -> torch.Tensor:
        """The patch's colours (C x size x size in [0, 1]): seeded, or the optimised ones after prepare."""
        if self.params.optimize:
            if self._optimized is None:
                raise RuntimeError("attack trojan: optimize=True needs prepare() or poison() before apply()")
            return self._optimized
        return self.seeded_pattern(channels)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        x = x.clone()
        r, c = corner_slices(p.corner, p.size, p.margin, x.shape[-2], x.shape[-1])
        m = self.mask().to(x.device)
        pattern = self.pattern(x.shape[1]).to(x.device, x.dtype)
        region = x[..., r, c]
        x[..., r, c] = torch.where(m, (1 - p.alpha) * region + p.alpha * pattern, region)
        return x

    # -- the original trigger generation --------------------------------------------------------
    def prepare(self, train: ImageSet, target: int, generator: torch.Generator) -> None:
        if self.params.optimize:
            model = self.clean_model_for(train)
            h, w = train.x.shape[-2:]
            self._optimized = self.optimize_pattern(model, train.channels, h, w)
        self.prepared = True

    def clean_model_for(self, train: ImageSet) -> nn.Module:
        """The clean model the trigger is optimised against: trained once per data set and config, cached."""
        p = self.params
        cfg = TrainConfig(epochs=p.clean_epochs, optimizer="adam", lr=1e-3, crop=4, flip=True)
        model, self.cache_hit = cached_model("trojan", p.clean_model, cfg, train, p.model_seed,
                                             "trojan clean model")
        return model

    def optimize_pattern(self, model: nn.Module, channels: int, height: int, width: int) -> torch.Tensor:
        """Signed-gradient steps on the masked pixels towards ``target_value`` at the chosen neurons."""
        p = self.params
        head = last_linear(model)
        neurons = head.weight.detach().abs().sum(0).argsort(descending=True)[:p.neurons]
        feats: dict[str, torch.Tensor] = {}
        hook = head.register_forward_hook(lambda mod, inp, out: feats.__setitem__("x", inp[0]))
        device = head.weight.device
        prec = active_precision(device)
        r, c = corner_slices(p.corner, p.size, p.margin, height, width)
        m = self.mask().to(device)
        patch = self.seeded_pattern(channels).to(device)

        def neuron_loss(pt: torch.Tensor) -> torch.Tensor:
            x = torch.zeros(1, channels, height, width, device=device)
            x[..., r, c] = torch.where(m, pt, x[..., r, c])
            with prec.autocast():
                model(prec.batch(x))
            return ((feats["x"][0, neurons].float() - p.target_value) ** 2).sum()

        try:
            with torch.no_grad():
                before = float(neuron_loss(patch))
            with torch.enable_grad():
                for _ in range(p.opt_steps):
                    patch.requires_grad_(True)
                    (grad,) = torch.autograd.grad(neuron_loss(patch), patch)
                    patch = (patch.detach() - p.opt_step * grad.sign()).clamp_(0, 1)
            with torch.no_grad():
                after = float(neuron_loss(patch))
        finally:
            hook.remove()
        log.info("trojan: neurons %s, loss %.3g -> %.3g", neurons.tolist(), before, after)
        return patch.detach().cpu()
