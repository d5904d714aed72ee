"""The one scheme for files the library derives and may reuse (decoded datasets, attacks' trained networks).

Every such file is named ``antibackdoor-cache-<tag><suffix>`` inside its folder and carries a SHA-256 key
that starts with the version of its kind (``CACHE_VERSIONS``): bump a kind's version when the code that
produces it changes (decoding, an attack's training recipe) and every old file of that kind is rebuilt once.
Files are written atomically (a unique temporary file beside the target, then ``os.replace``), so a killed
process or two concurrent ones never leave a half-written file behind; the same helper writes run
directories' JSON files and checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: the format version of each kind of cached file; bump one when the code producing it changes
CACHE_VERSIONS = {
    "dataset": 2,  # data/images.py: decoding (resampling, colour conversion; 2: 16-bit images scaled, not clipped)
    "attack": 2,  # attacks/cache.py: networks an attack trains (2: AdamW weight decay, derive_seed)
    "stage": 1,  # bench/stage_cache.py: defenses' trained stage models (training loop, precision handling)
}
CACHE_PREFIX = "antibackdoor-cache-"


def cache_hasher(kind: str) -> hashlib._Hash:
    """A SHA-256 object already fed with ``kind``'s version; feed it what else decides the file."""
    return hashlib.sha256(f"v{CACHE_VERSIONS[kind]}\0".encode())


def cache_key(kind: str, payload: Any) -> str:
    """The 16-hex-digit key of a JSON-serialisable ``payload`` under ``kind``'s current version."""
    h = cache_hasher(kind)
    h.update(json.dumps(payload, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def cache_path(folder: Path, tag: str, suffix: str) -> Path:
    """``folder/antibackdoor-cache-<tag><suffix>``."""
    return folder / f"{CACHE_PREFIX}{tag}{suffix}"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a unique temporary file beside ``path``, then rename it into place.

    The temporary file is removed when ``write`` fails; ``path`` then keeps its previous content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
