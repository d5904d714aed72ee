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
in the data root (``cache.py``); ``robust_epochs`` and the PGD settings control its cost.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from ..adversarial.pgd import PGDConfig, pgd
from ..data.imageset import ImageSet
from ..errors import ConfigError
from ..precision import active_precision
from ..training import TrainConfig
from .base import Attack, quantize, register_attack
from .cache import cached_state_dict

log = logging.getLogger("antibackdoor")

#: the bottom-right 3 x 3 pattern: +1 = white, -1 = black
CHECKER = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])


def corner_trigger(height: int, width: int, corners: str) -> torch.Tensor:
    """H x W map of +-1 (trigger pixels) and 0 (untouched), mirrored into the other corners for ``all``."""
    if corners not in ("all", "bottom-right"):
        raise ConfigError(f"attack clb: corners {corners!r} is not 'all' or 'bottom-right'")
    t = torch.zeros(height, width)
    t[-3:, -3:] = CHECKER
    if corners == "all":
        t[-3:, :3] = CHECKER.flip(1)
        t[:3, -3:] = CHECKER.flip(0)
        t[:3, :3] = CHECKER.flip(0, 1)
    return t


@register_attack
class CLB(Attack):
    name = "clb"
    label_mode = "clean"
    description = "clean label: robust-model PGD (eps 16/255, 30 steps) + 3x3 checkerboards in 4 corners"
    params = {
        "eps": 16.0, "step": 2.0, "steps": 30,  # PGD on the poisoned images, in /255 units (A-ABL)
        "corners": "all", "amplitude": 1.0,
        # the robust model (quick size; see docs/attacks.md for the paper-like setting)
        "robust_model": "cnn", "robust_epochs": 10, "robust_eps": 8.0, "robust_step": 4.0, "robust_steps": 2,
        "robust_optimizer": "adam", "robust_lr": 1e-3, "model_seed": 0,
    }
    #: a Madry-style robust ResNet-18 (PGD-10, step 2/255, 100 SGD epochs): hours on a CPU
    paper_params: ClassVar[dict[str, Any]] = {
        "robust_model": "resnet18", "robust_epochs": 100, "robust_step": 2.0, "robust_steps": 10,
        "robust_optimizer": "sgd", "robust_lr": 0.1,
    }

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.model: nn.Module | None = None
        self.cache_hit: bool | None = None

    # -- the trigger --------------------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        t = corner_trigger(x.shape[-2], x.shape[-1], str(self.corners)).to(x.device, x.dtype)
        return (x + float(self.amplitude) * t).clamp(0, 1)

    # -- the robust model -----------------------------------------------------------------------
    def robust_config(self) -> TrainConfig:
        adv = PGDConfig(eps=float(self.robust_eps) / 255, step=float(self.robust_step) / 255,
                        steps=int(self.robust_steps))
        # quick: Adam, as the quick adversarial training (SGD 0.05 diverged on the quick CNN under PGD)
        return TrainConfig(epochs=int(self.robust_epochs), optimizer=str(self.robust_optimizer),
                           lr=float(self.robust_lr),
                           schedule="cosine", crop=4, flip=True, adversary=adv)

    def prepare(self, train: ImageSet, target: int, generator: torch.Generator) -> None:
        """Train (or load from the cache) the adversarially robust model; ``generator`` is not used, so the
        model depends only on the data and the config and can be shared by every run."""
        from ..models import build_model
        from ..training import train as fit  # looked up at call time (tests replace it)

        cfg = self.robust_config()
        device = train.x.device  # the compute device: the experiment moves the data there first
        prec = active_precision(device)
        key = {"version": 1, "model": self.robust_model, "train": repr(cfg), "seed": int(self.model_seed),
               "precision": prec.name}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.model_seed))
            model = build_model(str(self.robust_model), train.num_classes, train.channels, train.image_size,
                                train.mean, train.std).to(device)
        self.cache_hit = cached_state_dict(
            "clb", key, train, model,
            lambda m: fit(m, train, cfg, seed=int(self.model_seed), device=device, desc="clb robust model",
                          precision=prec))
        self.model = model.eval()
        self.prepared = True

    def perturb(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Untargeted PGD (no random start) from the robust model: uint8 images -> float in [0, 1]."""
        if self.model is None:
            raise RuntimeError("attack clb: prepare() must run before perturb()")
        cfg = PGDConfig(eps=float(self.eps) / 255, step=float(self.step) / 255, steps=int(self.steps),
                        random_start=False)
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
