"""The trusted slice: a small, class-stratified share of the clean training data that some defenses (NAD)
may use as known-clean data.

The runner draws it before poisoning and removes it from the training data, so it never holds poison and
the defense never learns anything about the poison mask from it.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .imageset import ImageSet


def trusted_counts(data: ImageSet, fraction: float, where: str = "trusted_fraction") -> torch.Tensor:
    """Samples per class in a trusted slice of ``fraction``: round(fraction * class size), per class.

    A fraction that leaves a class without a trusted sample, or without any training sample, is an error.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"{where}: {fraction} must be in (0, 1)")
    sizes = data.class_counts()
    counts = torch.round(sizes.double() * fraction).long()
    for c in range(data.num_classes):
        n_c, k_c = int(sizes[c]), int(counts[c])
        if n_c == 0:
            continue
        if k_c == 0:
            raise ConfigError(f"{where}: {fraction} leaves class {data.classes[c]!r} ({n_c} training samples) "
                              f"without a trusted sample; use at least {0.5 / n_c:.4g}")
        if k_c >= n_c:
            raise ConfigError(f"{where}: {fraction} takes every training sample of class {data.classes[c]!r} "
                              f"({n_c}) into the trusted slice")
    return counts


def reserve_trusted(data: ImageSet, fraction: float, generator: torch.Generator,
                    where: str = "trusted_fraction") -> torch.Tensor:
    """Boolean mask of a seeded, class-stratified trusted slice of ``data`` (see ``trusted_counts``)."""
    counts = trusted_counts(data, fraction, where)
    y = data.y.cpu()
    n = len(y)
    perm = torch.randperm(n, generator=generator)
    by_class = perm[torch.sort(y[perm], stable=True).indices]  # random order within each class
    starts = torch.cumsum(data.class_counts(), 0) - data.class_counts()
    rank = torch.arange(n) - starts[y[by_class]]  # position of each sample within its class
    mask = torch.zeros(n, dtype=torch.bool)
    mask[by_class[rank < counts[y[by_class]]]] = True
    return mask
