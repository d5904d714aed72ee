"""The one seed rule: every random stream of a run is ``derive_seed(seed, *tags)``, and the only ways to get one.

A stream is named by the run's seed and tags that say what it is for (``"model", 1`` = the initial weights
of a defense's second model, ``"epoch", 12`` = shuffling and augmentation in epoch 12). The seed is a hash of
the whole tuple, so two different tuples never share a stream (arithmetic mixes such as ``seed * 7 + offset``
collide: seed 0 offset 7 equals seed 1 offset 0). Nothing reseeds torch's global RNG for good: ``seeded_rng``
and ``rng_from`` fork it for the code that can only draw from it (``nn.Module`` initialisation, torch.distributions,
kornia).

The streams: ``generator(seed, *tags)`` (torch) and ``numpy_rng(seed, *tags)`` (numpy) derive; ``fixed_generator``
and ``fixed_numpy_rng`` use a seed as it is, for the few streams whose seed a user sets directly and whose draws
published results fix (an attack's ``pattern_seed``, which samples a run poisons, a folder's test split).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator

import numpy as np
import torch

#: seeds are 63-bit so that every torch generator and numpy accepts them
_MASK = (1 << 63) - 1


def derive_seed(seed: int, *tags: int | str) -> int:
    """A seed for the stream ``(seed, *tags)``: SHA-256 of the tuple, unambiguous (JSON), 63 bits."""
    for t in (seed, *tags):
        if isinstance(t, bool) or not isinstance(t, int | str):
            raise TypeError(f"derive_seed: tags must be int or str, got {t!r}")
    blob = json.dumps([seed, *tags], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") & _MASK


def generator(seed: int, *tags: int | str) -> torch.Generator:
    """A CPU generator for the stream ``(seed, *tags)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *tags))


@contextlib.contextmanager
def seeded_rng(seed: int, *tags: int | str) -> Iterator[None]:
    """Run a block with torch's global CPU RNG seeded by ``derive_seed(seed, *tags)``, then restore the
    caller's RNG state: building a model seeded this way leaves every other random stream untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *tags))
        yield


def fixed_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` itself (not derived): a stream whose seed the user sets directly."""
    return torch.Generator().manual_seed(seed)


def numpy_rng(seed: int, *tags: int | str) -> np.random.Generator:
    """A numpy generator for the stream ``(seed, *tags)``."""
    return np.random.default_rng(derive_seed(seed, *tags))


def fixed_numpy_rng(seed: int) -> np.random.Generator:
    """A numpy generator seeded with ``seed`` itself (not derived), as ``fixed_generator``."""
    return np.random.default_rng(seed)


@contextlib.contextmanager
def rng_from(generator: torch.Generator | None, device: torch.device | None = None) -> Iterator[None]:
    """Run a block of library code that can only draw from torch's global RNG (torch.distributions, kornia) with
    that RNG forked and seeded by one draw from ``generator`` (None: forked as it is), so the block replays with
    the generator (a resumed epoch draws the same) and leaves the caller's global state as it was; a CUDA
    ``device``'s RNG is forked too."""
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if generator is not None:
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        yield
