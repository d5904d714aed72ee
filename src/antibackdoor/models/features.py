"""One interface to a model's intermediate representations, for every registered architecture.

Defenses and detectors need more than logits: NAD distils attention maps at the outputs of a network's
stages, CBD, D-BR/D-ST, activation clustering and spectral signatures work on the penultimate features (the
input of the final linear layer). Every backbone lists its stages in ``stage_names`` (module paths, from the
input to the output; each is the last module at one spatial resolution) and ends with one ``nn.Linear`` head,
so both are reached through forward hooks here and no model needs a second forward method.

    with capture(model) as feats:
        logits = model(x)
    feats.penultimate            # N x D, with gradients when the forward pass has them
    feats.stages["layers.3"]     # N x C x H x W
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adversarial.pgd import eval_mode
from ..errors import ConfigError
from ..precision import PLAIN, Precision
from .registry import Normalized
from .wrappers import unwrap


def backbone(model: nn.Module) -> nn.Module:
    """The raw network behind the normalisation layer (the model itself if it has none), inside any wrapper
    (``models.wrappers``): a wrapped model's stages and features are its network's, on the inputs as the wrapper
    hands them on (PDB: stamped)."""
    model = unwrap(model)
    return model.backbone if isinstance(model, Normalized) else model


def stage_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose outputs are the network's stages, in forward order."""
    net = backbone(model)
    names = getattr(net, "stage_names", None)
    if not names:
        raise ConfigError(f"model {type(net).__name__}: declares no stage_names, so its stages are unknown")
    return {name: net.get_submodule(name) for name in names}


def classifier_head(model: nn.Module) -> nn.Linear:
    """The final linear layer, whose input is the penultimate feature vector."""
    layers = [m for m in backbone(model).modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ConfigError(f"model {type(backbone(model)).__name__}: has no final nn.Linear layer")
    return layers[-1]


@dataclass
class Captured:
    """What one forward pass under ``capture`` recorded."""

    stages: dict[str, torch.Tensor] = field(default_factory=dict)
    penultimate: torch.Tensor | None = None


@contextlib.contextmanager
def capture(model: nn.Module, stages: bool | Sequence[str] = True, penultimate: bool = True) -> Iterator[Captured]:
    """Record stage outputs (all, or the named ones) and the penultimate features of the next forward pass.

    Tensors are kept as the model produced them (in the autograd graph when gradients are on), so a loss on
    them trains the model. A later forward pass inside the block overwrites them.
    """
    out = Captured()
    handles = []
    if stages:
        mods = stage_modules(model)
        wanted = list(mods) if stages is True else list(stages)
        unknown = [s for s in wanted if s not in mods]
        if unknown:
            raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; this model has {', '.join(mods)}")
        for name in wanted:
            handles.append(mods[name].register_forward_hook(
                lambda _m, _i, o, name=name: out.stages.__setitem__(name, o)))
    if penultimate:
        handles.append(classifier_head(model).register_forward_hook(
            lambda _m, i, _o: setattr(out, "penultimate", i[0])))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def penultimate_features(model: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu",
                         batch_size: int = 512, precision: Precision | None = None) -> torch.Tensor:
    """Penultimate features (float32, on the CPU) of uint8 ``images`` in eval mode, in whole batches, computed
    in ``precision`` (None: plain fp32 in the layout given)."""
    prec = PLAIN if precision is None else precision
    parts = []
    with eval_mode(model), capture(model, stages=False) as feats:
        for s in range(0, images.shape[0], batch_size):
            with prec.autocast():
                model(prec.batch(images[s:s + batch_size].to(device).float().div_(255.0)))
            parts.append(feats.penultimate.float().cpu())
    return torch.cat(parts) if parts else torch.empty(0)
