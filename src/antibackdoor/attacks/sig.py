"""SIG (Barni, Kallas & Tondi, ICIP 2019): a clean-label backdoor with a sinusoidal signal.

Target-class training images get ``v(i, j) = delta * sin(2 pi j f / W)`` added to every row and channel (a
"horizontal" signal: it varies along the image width, so it shows as ``f`` vertical stripes); labels stay
unchanged. The network learns the stripes as a feature of the target class, so any image carrying them is
pulled towards it. ``delta`` is in /255 units, ``f = 6``. The default delta 40 is BackdoorBench's; Barni
et al. train with 20, which reaches only ~40% ASR in the quick setting on the mini CIFAR-10 (see
docs/attacks.md), so 20 is in ``paper_params``. ``test_delta`` optionally sets another strength for test
images only.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..data.imageset import ImageSet
from .base import Attack, quantize, register_attack


def sine_signal(width: int, delta: float, freq: float, device: torch.device | None = None) -> torch.Tensor:
    """The 1 x 1 x 1 x W signal in [0, 1] units, broadcast over rows and channels."""
    j = torch.arange(width, dtype=torch.float32, device=device)
    return (delta / 255.0 * torch.sin(2 * math.pi * j * freq / width)).view(1, 1, 1, width)


@register_attack
class SIG(Attack):
    name = "sig"
    label_mode = "clean"
    description = "clean label: horizontal sinusoid (delta 40/255, f 6) added to target-class images"
    params = {"delta": 40.0, "freq": 6.0, "test_delta": None}
    paper_params: ClassVar[dict[str, Any]] = {"delta": 20.0}  # Barni et al.

    def _add(self, x: torch.Tensor, delta: float) -> torch.Tensor:
        return (x + sine_signal(x.shape[-1], delta, float(self.freq), x.device)).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._add(x, float(self.delta))

    def triggered_test(self, test: ImageSet, target: int) -> ImageSet:
        """As the base, but with ``test_delta`` (when set) instead of the training strength."""
        triggered = super().triggered_test(test, target)
        if self.test_delta is None:
            return triggered
        clean = test.x[test.y != target]
        out = torch.empty_like(clean)
        delta = float(self.test_delta)
        for s in range(0, clean.shape[0], 1024):
            out[s:s + 1024] = quantize(self._add(clean[s:s + 1024].float().div(255.0), delta))
        return triggered.with_images(out)
