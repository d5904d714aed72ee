"""A disk cache for what an attack's ``prepare`` learns (a clean or robust model, a trigger).

Training an auxiliary model costs minutes on a CPU, and every run of the same attack on the same data needs
the same model, so it is stored once under ``<data root>/cache/<attack>-<hash>.safetensors``. The hash covers
the attack's own key (the config that decides the model) and a fingerprint of the training data, so a changed
parameter or dataset never reuses a stale file. Files are written atomically (a temporary file, then
``os.replace``): a killed run or two concurrent runs never leave a half-written entry; they are read with
safetensors, never pickle, so a cache file cannot execute code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.imageset import ImageSet
from ..data.registry import default_data_root

log = logging.getLogger("antibackdoor")


def cache_dir() -> Path:
    """``<data root>/cache`` (``$ANTIBACKDOOR_DATA`` or ``~/.cache/antibackdoor``)."""
    return default_data_root() / "cache"


def dataset_fingerprint(data: ImageSet) -> str:
    """SHA-256 over the images, labels and shape: equal fingerprints mean equal training data."""
    h = hashlib.sha256()
    h.update(repr((tuple(data.x.shape), data.num_classes)).encode())
    h.update(data.x.detach().cpu().contiguous().numpy().tobytes())
    h.update(data.y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_path(attack: str, key: dict[str, Any], data: ImageSet | None = None) -> Path:
    """Where the entry for ``key`` (JSON-serialisable) and ``data`` lives."""
    payload = {"key": key, "data": dataset_fingerprint(data) if data is not None else None}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / f"{attack}-{digest}.safetensors"


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_tensors(attack: str, key: dict[str, Any], data: ImageSet | None,
                   build: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], bool]:
    """Load the tensors stored for (attack, key, data), or ``build`` and store them.

    Returns ``(tensors, hit)``; ``hit`` is True when they came from the cache. An unreadable entry (e.g.
    truncated by a full disk) is rebuilt rather than trusted.
    """
    from safetensors.torch import load_file

    path = cache_path(attack, key, data)
    if path.is_file():
        try:
            tensors = load_file(str(path))
            log.info("%s: reusing cached %s", attack, path)
            return tensors, True
        except Exception as exc:  # noqa: BLE001 - any failure means an unusable cache entry
            log.warning("%s: ignoring unreadable cache entry %s (%s)", attack, path, exc.__class__.__name__)
    tensors = build()
    meta = {"attack": attack, "key": json.dumps(key, sort_keys=True, default=str)}
    try:
        _save_atomic(path, tensors, meta)
        log.info("%s: cached %s", attack, path)
    except OSError as exc:  # a read-only data root costs a retrain next time, not this run
        log.warning("%s: cannot write the cache file %s (%s)", attack, path, exc)
    return tensors, False


def cached_state_dict(attack: str, key: dict[str, Any], data: ImageSet | None, model: nn.Module,
                      fit: Callable[[nn.Module], None]) -> bool:
    """Give ``model`` the cached weights for (attack, key, data), or ``fit`` it in place and cache them.

    Returns True on a cache hit. ``model`` must be freshly built with the architecture ``key`` describes.
    """

    def build() -> dict[str, torch.Tensor]:
        fit(model)
        return dict(model.state_dict())

    state, hit = cached_tensors(attack, key, data, build)
    if hit:
        model.load_state_dict(state)
    model.eval()
    return hit
