"""What a defense puts around a network for inference, kept inside the model it returns.

Some defenses change how a trained network is *used*, not only its weights: PDB stamps its own defensive
trigger on every input and reads the network's answer back through the inverse of the label map it was trained
with. Such a defense returns a ``Wrapper`` around the network, so that the returned module *is* the deployed
model: ACC, ASR and RA (PGD attacks the wrapper end to end, the stamp included), ``defend``'s report and
``load_model`` all see the defended prediction. ``models/io.py`` saves a wrapper as one file (the inner network's
weights and the wrapper's tensors, with a header naming the wrapper and its settings) and rebuilds it from that
file alone.

A new wrapper subclasses ``Wrapper`` (``kind``, ``header``, ``rebuild``) and is listed in ``WRAPPERS``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn


class WrapperError(ValueError):
    """A wrapper's settings that do not fit each other or the network (the reader names the file)."""


class Wrapper(nn.Module):
    """A network (``net``) behind an inference-time transformation. Subclasses set ``kind`` (the header's
    ``wrapper`` value) and implement ``forward``, ``header`` and ``rebuild``."""

    kind: ClassVar[str] = ""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def header(self) -> dict[str, str]:
        """What ``rebuild`` needs besides the tensors of ``state_dict``, as strings (the file's header)."""
        raise NotImplementedError

    @classmethod
    def rebuild(cls, net: nn.Module, header: Mapping[str, str], state: Mapping[str, torch.Tensor]) -> Wrapper:
        """The wrapper around ``net`` that ``header`` and the file's tensors ``state`` describe (the caller loads
        ``state`` into it); ``WrapperError`` where they do not describe one."""
        raise NotImplementedError

    def check_fits(self, channels: int, image_size: int, num_classes: int) -> None:
        """``WrapperError`` unless the wrapper fits images of this shape and this many classes."""


class StampAndRelabel(Wrapper):
    """``forward(x) = net(x * (1 - mask) + pattern * mask)[:, label_map]``.

    ``x`` holds pixels in [0, 1]; ``pattern`` (1 x C x H x W) may hold values outside that range (PDB's trigger
    is 2.0, a value no image has), ``mask`` (1 x 1 x H x W, in [0, 1]) says where the stamp goes. ``label_map``
    is a permutation of the class indices: the output's class ``i`` is the network's class ``label_map[i]``. A
    network trained to answer h(y) on stamped images of class y, given ``label_map[i] = h(i)``, so answers y:
    argmax, softmax and cross-entropy of the output all speak of the original classes, because the output is a
    permutation of the network's logits.
    """

    kind = "stamp-relabel"

    def __init__(self, net: nn.Module, pattern: torch.Tensor, mask: torch.Tensor, label_map: Sequence[int]):
        super().__init__(net)
        pattern = torch.as_tensor(pattern, dtype=torch.float32)
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if pattern.dim() != 4 or pattern.shape[0] != 1:
            raise WrapperError(f"pattern: expected 1 x C x H x W, got {tuple(pattern.shape)}")
        if mask.dim() != 4 or mask.shape[:2] != (1, 1) or mask.shape[2:] != pattern.shape[2:]:
            raise WrapperError(f"mask: expected 1 x 1 x {pattern.shape[2]} x {pattern.shape[3]}, got "
                               f"{tuple(mask.shape)}")
        if not bool(((mask >= 0) & (mask <= 1)).all()):
            raise WrapperError("mask: values must lie in [0, 1]")
        labels = [int(v) for v in label_map]
        if sorted(labels) != list(range(len(labels))) or not labels:
            raise WrapperError(f"label_map: {labels} is not a permutation of 0..{len(labels) - 1}")
        self.register_buffer("pattern", pattern.clone())
        self.register_buffer("mask", mask.clone())
        # the header holds the map (readable without loading any tensor); the buffer only follows the device
        self.register_buffer("label_map", torch.tensor(labels, dtype=torch.long), persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.label_map.numel())

    def check_fits(self, channels: int, image_size: int, num_classes: int) -> None:
        want = (1, channels, image_size, image_size)
        if tuple(self.pattern.shape) != want:
            raise WrapperError(f"pattern: expected {' x '.join(map(str, want))}, got {tuple(self.pattern.shape)}")
        if self.num_classes != num_classes:
            raise WrapperError(f"label_map: maps {self.num_classes} classes, the model has {num_classes}")

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """The images as the network sees them: the pattern pasted where the mask is 1."""
        return x * (1 - self.mask) + self.pattern * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.stamp(x))[:, self.label_map]

    def header(self) -> dict[str, str]:
        return {"wrapper": self.kind, "wrapper_label_map": json.dumps(self.label_map.tolist()),
                "wrapper_doc": "inputs are stamped (x * (1 - mask) + pattern * mask) before the network; output "
                               "class i is the network's class label_map[i]"}

    @classmethod
    def rebuild(cls, net: nn.Module, header: Mapping[str, str], state: Mapping[str, torch.Tensor]) -> Wrapper:
        try:
            label_map = json.loads(header["wrapper_label_map"])
        except (KeyError, ValueError) as exc:
            raise WrapperError(f"the header lacks or garbles wrapper_label_map ({exc})") from None
        if not isinstance(label_map, list) or not all(isinstance(v, int) for v in label_map):
            raise WrapperError(f"wrapper_label_map: {label_map!r} is not a list of class indices")
        missing = [k for k in ("pattern", "mask") if k not in state]
        if missing:
            raise WrapperError(f"the file holds no {' and no '.join(missing)} tensor")
        return cls(net, state["pattern"], state["mask"], label_map)


#: every wrapper a model file may name, by ``kind``
WRAPPERS: dict[str, type[Wrapper]] = {StampAndRelabel.kind: StampAndRelabel}


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside any wrappers (the model itself when it has none)."""
    while isinstance(model, Wrapper):
        model = model.net
    return model


__all__ = ["WRAPPERS", "StampAndRelabel", "Wrapper", "WrapperError", "unwrap"]
