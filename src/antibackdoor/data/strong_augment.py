"""Strong augmentations drawn per sample: RandAugment, AutoAugment (CIFAR-10 policy) and AugMix, plus the
SimCLR view pipeline. The image operations are kornia's; the choices are ours.

kornia's policy containers draw one sub-policy per forward call, so a batch would share its operations. Here
every sample draws its own operations (RandAugment: n distinct ops; AutoAugment: one of the 25 sub-policies;
AugMix: three chains of one to three ops each, mixed with Dirichlet and Beta weights), and each kornia
operation runs once per batch on the samples that drew it (its magnitudes and application probabilities are
already per row). Inputs are float batches in [0, 1]; 1-channel images are expanded to RGB and back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import torch
from torch import nn

from ..seeding import rng_from

#: AugMix's operations (Hendrycks et al.: those that do not overlap with the CIFAR-C corruptions), as kornia
#: RandAugment candidates (name, low, high) scaled to AugMix's severity 3: rotations up to 9 degrees, shears
#: up to 0.09, translations up to 10 % of the side, 3-4-bit posterize, solarize above 70 % intensity.
AUGMIX_OPS: tuple[tuple[str, float, float], ...] = (
    ("auto_contrast", 0, 1), ("equalize", 0, 1), ("posterize", 3.0, 4.0), ("rotate", -9.0, 9.0),
    ("solarize", 0.7, 1.0), ("shear_x", -0.09, 0.09), ("shear_y", -0.09, 0.09),
    ("translate_x", -0.1, 0.1), ("translate_y", -0.1, 0.1),
)
#: magnitudes (kornia RandAugment's m in (0, 30)) an AugMix op draws from, per sample
AUGMIX_LEVELS = (6, 15, 27)


def _rgb(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Run ``fn`` on RGB data: 1-channel batches are repeated to 3 channels and averaged back."""

    def wrapped(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            return fn(x)
        return fn(x.expand(-1, 3, -1, -1).contiguous()).mean(1, keepdim=True)

    return wrapped


def apply_grouped(x: torch.Tensor, choice: torch.Tensor, ops: Sequence[nn.Module],
                  active: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``ops[choice[i]]`` to sample i (only where ``active``), one call per operation on its samples."""
    out = x.clone()
    for j, op in enumerate(ops):
        sel = choice == j
        if active is not None:
            sel &= active
        idx = sel.nonzero().squeeze(1)
        if idx.numel():
            out[idx] = _rgb(op)(x[idx]).clamp(0, 1).to(x.dtype)
    return out


@cache
def _single_ops(table: tuple[tuple[str, float, float], ...], m: int) -> tuple[nn.Module, ...]:
    from kornia.augmentation.auto import RandAugment

    return tuple(RandAugment(n=1, m=m, policy=[[entry]]) for entry in table)


@cache
def _randaugment_table() -> tuple[tuple[str, float, float], ...]:
    from kornia.augmentation.auto.rand_augment.rand_augment import default_policy

    return tuple(tuple(sp[0]) for sp in default_policy)


@cache
def _autoaugment_subpolicies(policy: str) -> tuple[nn.Module, ...]:
    from kornia.augmentation.auto import AutoAugment
    from kornia.augmentation.auto.autoaugment import autoaugment as aa

    table = {"cifar10": aa.cifar10_policy, "imagenet": aa.imagenet_policy, "svhn": aa.svhn_policy}[policy]
    return tuple(AutoAugment(policy=[sp]) for sp in table)


def randaugment(x: torch.Tensor, n: int = 2, m: int = 10,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """RandAugment (Cubuk et al.): each sample gets ``n`` distinct operations of kornia's candidate list at
    magnitude ``m``, in a random order of its own."""
    ops = _single_ops(_randaugment_table(), m)
    order = torch.rand(x.shape[0], len(ops), generator=generator).argsort(1).to(x.device)
    for step in range(n):
        x = apply_grouped(x, order[:, step], ops)
    return x


def autoaugment(x: torch.Tensor, policy: str = "cifar10",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """AutoAugment (Cubuk et al.): each sample applies one sub-policy of ``policy`` drawn for it."""
    subs = _autoaugment_subpolicies(policy)
    choice = torch.randint(len(subs), (x.shape[0],), generator=generator).to(x.device)
    return apply_grouped(x, choice, subs)


def augmix(x: torch.Tensor, width: int = 3, max_depth: int = 3, alpha: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """AugMix (Hendrycks et al., ICLR 2020): per sample, ``width`` chains of 1..``max_depth`` random operations
    (each with its own op and magnitude), mixed with Dirichlet(alpha) weights, then blended with the original
    image by a Beta(alpha, alpha) weight."""
    n = x.shape[0]
    levels = [_single_ops(AUGMIX_OPS, m) for m in AUGMIX_LEVELS]
    ops = [op for level in levels for op in level]  # index = level * len(AUGMIX_OPS) + op
    dirichlet = torch.distributions.Dirichlet(torch.full((width,), float(alpha)))
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    with rng_from(generator):
        w = dirichlet.sample((n,)).to(x.device, x.dtype)
        m = beta.sample((n,)).to(x.device, x.dtype)
    mix = torch.zeros_like(x)
    for k in range(width):
        depth = torch.randint(1, max_depth + 1, (n,), generator=generator).to(x.device)
        chain = x
        for step in range(max_depth):
            choice = torch.randint(len(ops), (n,), generator=generator).to(x.device)
            chain = apply_grouped(chain, choice, ops, active=depth > step)
        mix += w[:, k, None, None, None] * chain
    return (m[:, None, None, None] * x + (1 - m[:, None, None, None]) * mix).clamp(0, 1)


STRONG_AUGMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "randaugment": randaugment, "autoaugment": autoaugment, "augmix": augmix,
}


class SimCLRViews(nn.Module):
    """SimCLR's view pipeline as used by DBD: random resized crop (scale 0.2-1), horizontal flip, colour jitter
    (0.4, 0.4, 0.4, 0.1 with p 0.8), greyscale (p 0.2), Gaussian blur (sigma 0.1-2, p 0.5); per sample (kornia)."""

    def __init__(self, size: int, blur_kernel: int = 3):
        super().__init__()
        import kornia.augmentation as K

        self.rgb = nn.Sequential(
            K.RandomResizedCrop((size, size), scale=(0.2, 1.0)),
            K.RandomHorizontalFlip(),
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur((blur_kernel, blur_kernel), (0.1, 2.0), p=0.5),
        )
        self.grey = nn.Sequential(
            K.RandomResizedCrop((size, size), scale=(0.2, 1.0)),
            K.RandomHorizontalFlip(),
            K.ColorJitter(0.4, 0.4, 0.0, 0.0, p=0.8),
            K.RandomGaussianBlur((blur_kernel, blur_kernel), (0.1, 2.0), p=0.5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.rgb(x) if x.shape[1] == 3 else self.grey(x)).clamp(0, 1)
