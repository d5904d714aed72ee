"""SIG (Barni, Kallas & Tondi, ICIP 2019): a clean-label backdoor with a sinusoidal signal.

Target-class training images get ``v(i, j) = delta * sin(2 pi j f / W)`` added to every row and channel (a
"horizontal" signal: it varies along the image width, so it shows as ``f`` vertical stripes); labels stay
unchanged. The network learns the stripes as a feature of the target class, so any image carrying them is
pulled towards it. ``delta`` is in /255 units, ``f = 6``. The default delta 40 is BackdoorBench's; Barni
et al. train with 20, which reaches only ~40% ASR in the quick setting on the mini CIFAR-10 (see
docs/attacks.md), so 20 is the ``paper`` preset's. ``test_delta`` optionally sets another strength for test
images only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..config import param
from ..data.imageset import ImageSet
from .base import Attack, map_uint8, param_error, register_attack


def sine_signal(width: int, delta: float, freq: float, device: torch.device | None = None) -> torch.Tensor:
    """The 1 x 1 x 1 x W signal in [0, 1] units, broadcast over rows and channels."""
    j = torch.arange(width, dtype=torch.float32, device=device)
    return (delta / 255.0 * torch.sin(2 * math.pi * j * freq / width)).view(1, 1, 1, width)


@dataclass(frozen=True)
class SIGParams:
    delta: float = param(40.0, doc="amplitude in /255 units (BackdoorBench; Barni et al.: 20, the paper preset)")
    freq: float = param(6.0, doc="periods of the sinusoid across the image width")
    test_delta: float | None = param(None, doc="another amplitude for test images only (None: delta)")

    def validate(self, where: str) -> None:
        if not self.delta > 0:
            raise param_error("delta", f"{self.delta} must be > 0")
        if self.test_delta is not None and not self.test_delta > 0:
            raise param_error("test_delta", f"{self.test_delta} must be > 0")


@register_attack
class SIG(Attack):
    name = "sig"
    label = "SIG"
    label_mode = "clean"
    description = "horizontal sinusoid (delta 40/255, f 6) added to target-class images"
    Params = SIGParams
    presets = {"quick": SIGParams(), "paper": replace(SIGParams(), delta=20.0)}  # paper: Barni et al.

    def _add(self, x: torch.Tensor, delta: float) -> torch.Tensor:
        return (x + sine_signal(x.shape[-1], delta, self.params.freq, x.device)).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._add(x, self.params.delta)

    def triggered_test(self, test: ImageSet, target: int) -> ImageSet:
        """As the base, but with ``test_delta`` (when set) instead of the training strength."""
        triggered = super().triggered_test(test, target)
        delta = self.params.test_delta
        if delta is None:
            return triggered
        return triggered.with_images(map_uint8(lambda x: self._add(x, delta), test.x[test.y != target]))
