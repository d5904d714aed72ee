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
from typing import Any, ClassVar

import torch
from torch import nn

from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..precision import active_precision
from .base import Attack, register_attack
from .cache import cached_state_dict

log = logging.getLogger("antibackdoor")

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


def patch_mask(shape: str, size: int) -> torch.Tensor:
    """A size x size boolean mask: ``square`` (all) or ``ring`` (a one-pixel frame)."""
    if shape == "square":
        return torch.ones(size, size, dtype=torch.bool)
    if shape == "ring":
        m = torch.zeros(size, size, dtype=torch.bool)
        m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
        return m
    raise ConfigError(f"attack trojan: shape {shape!r} is not 'square' or 'ring'")


def corner_slices(corner: str, size: int, margin: int, h: int, w: int) -> tuple[slice, slice]:
    if corner not in CORNERS:
        raise ConfigError(f"attack trojan: corner {corner!r} is not one of {', '.join(CORNERS)}")
    top = corner.startswith("top")
    left = corner.endswith("left")
    r = slice(margin, margin + size) if top else slice(h - margin - size, h - margin)
    c = slice(margin, margin + size) if left else slice(w - margin - size, w - margin)
    return r, c


def last_linear(model: nn.Module) -> nn.Linear:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ConfigError("attack trojan: optimize=True needs a model with a final nn.Linear layer")
    return layers[-1]


@register_attack
class Trojan(Attack):
    name = "trojan"
    label_mode = "dirty"
    description = "5x5 seeded colour (watermark-like) corner patch, optionally neuron-optimised; dirty label"
    params = {
        "size": 5, "margin": 0, "corner": "bottom-right", "shape": "square", "alpha": 1.0, "pattern_seed": 0,
        # the original trigger generation (optional; costs one clean training, cached)
        "optimize": False, "neurons": 2, "target_value": 100.0, "opt_steps": 300, "opt_step": 0.01,
        "clean_model": "cnn", "clean_epochs": 10, "model_seed": 0,
    }
    #: the original generation as in BackdoorBench's trojannn: 1000 steps against a trained clean ResNet-18
    paper_params: ClassVar[dict[str, Any]] = {"optimize": True, "opt_steps": 1000, "clean_model": "resnet18",
                                              "clean_epochs": 100}

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self._optimized: torch.Tensor | None = None  # C x size x size, set by prepare when optimize=True
        self.cache_hit: bool | None = None

    # -- the trigger --------------------------------------------------------------------------
    def mask(self) -> torch.Tensor:
        return patch_mask(str(self.shape), int(self.size))

    def pattern(self, channels: int) -> torch.Tensor:
        """The patch's colours (C x size x size in [0, 1]): seeded, or the optimised ones after prepare."""
        if self.optimize:
            if self._optimized is None:
                raise RuntimeError("attack trojan: optimize=True needs prepare() or poison() before apply()")
            return self._optimized
        g = torch.Generator().manual_seed(int(self.pattern_seed))
        return torch.randint(0, 2, (channels, int(self.size), int(self.size)), generator=g).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        size = int(self.size)
        r, c = corner_slices(str(self.corner), size, int(self.margin), x.shape[-2], x.shape[-1])
        m = self.mask().to(x.device)
        p = self.pattern(x.shape[1]).to(x.device, x.dtype)
        a = float(self.alpha)
        region = x[..., r, c]
        x[..., r, c] = torch.where(m, (1 - a) * region + a * p, region)
        return x

    # -- the original trigger generation --------------------------------------------------------
    def prepare(self, train: ImageSet, target: int, generator: torch.Generator) -> None:
        if self.optimize:
            model = self.clean_model_for(train)
            h, w = train.x.shape[-2:]
            self._optimized = self.optimize_pattern(model, train.channels, h, w)
        self.prepared = True

    def clean_model_for(self, train: ImageSet) -> nn.Module:
        """The clean model the trigger is optimised against: trained once per data set and config, cached."""
        from ..models import build_model
        from ..training import TrainConfig
        from ..training import train as fit  # looked up at call time (tests replace it)

        cfg = TrainConfig(epochs=int(self.clean_epochs), optimizer="adam", lr=1e-3, crop=4, flip=True)
        device = train.x.device  # the compute device: the experiment moves the data there first
        prec = active_precision(device)
        key = {"version": 1, "model": self.clean_model, "train": repr(cfg), "seed": int(self.model_seed),
               "precision": prec.name}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.model_seed))
            model = build_model(str(self.clean_model), train.num_classes, train.channels, train.image_size,
                                train.mean, train.std).to(device)
        self.cache_hit = cached_state_dict(
            "trojan", key, train, model,
            lambda m: fit(m, train, cfg, seed=int(self.model_seed), device=device, desc="trojan clean model",
                          precision=prec))
        return model.eval()

    def optimize_pattern(self, model: nn.Module, channels: int, height: int, width: int) -> torch.Tensor:
        """Signed-gradient steps on the masked pixels towards ``target_value`` at the chosen neurons."""
        head = last_linear(model)
        neurons = head.weight.detach().abs().sum(0).argsort(descending=True)[:int(self.neurons)]
        feats: dict[str, torch.Tensor] = {}
        hook = head.register_forward_hook(lambda mod, inp, out: feats.__setitem__("x", inp[0]))
        device = head.weight.device
        prec = active_precision(device)
        size = int(self.size)
        r, c = corner_slices(str(self.corner), size, int(self.margin), height, width)
        m = self.mask().to(device)
        g = torch.Generator().manual_seed(int(self.pattern_seed))
        p = torch.randint(0, 2, (channels, size, size), generator=g).float().to(device)

        def neuron_loss(patch: torch.Tensor) -> torch.Tensor:
            x = torch.zeros(1, channels, height, width, device=device)
            x[..., r, c] = torch.where(m, patch, x[..., r, c])
            with prec.autocast():
                model(prec.batch(x))
            return ((feats["x"][0, neurons].float() - float(self.target_value)) ** 2).sum()

        try:
            with torch.no_grad():
                before = float(neuron_loss(p))
            with torch.enable_grad():
                for _ in range(int(self.opt_steps)):
                    p.requires_grad_(True)
                    (grad,) = torch.autograd.grad(neuron_loss(p), p)
                    p = (p.detach() - float(self.opt_step) * grad.sign()).clamp_(0, 1)
            with torch.no_grad():
                after = float(neuron_loss(p))
        finally:
            hook.remove()
        log.info("trojan: neurons %s, loss %.3g -> %.3g", neurons.tolist(), before, after)
        return p.detach().cpu()
