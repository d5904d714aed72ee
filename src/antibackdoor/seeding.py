"""The one seed rule: every random stream of a run is ``derive_seed(seed, *tags)``.

A stream is named by the run's seed and tags that say what it is for (``"model", 1`` = the initial weights
of a defense's second model, ``"epoch", 12`` = shuffling and augmentation in epoch 12). The seed is a hash of
the whole tuple, so two different tuples never share a stream (arithmetic mixes such as ``seed * 7 + offset``
collide: seed 0 offset 7 equals seed 1 offset 0). Nothing here touches torch's global RNG: ``seeded_rng``
forks it for the code that can only draw from it (``nn.Module`` initialisation).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator

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
