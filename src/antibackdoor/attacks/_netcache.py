"""A cache for the networks that attacks train in ``prepare`` (IAB's generators, SSBA's encoder).

Training them costs minutes, so they are trained once per (attack parameters, training data) and kept as
``<data root>/cache/<name>-<key>.safetensors``. Nothing is downloaded: BackdoorBench users keep hitting
missing SSBA ``.npy`` files, so everything here is produced locally. Files are written atomically (tmp +
``os.replace``) so that an interrupted run or two concurrent runs never leave a half-written file, and are
read with safetensors, never pickle, so a cache file cannot execute code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.imageset import ImageSet
from ..data.registry import default_data_root

log = logging.getLogger("antibackdoor")

#: bump when a change to an attack's training code makes old cache files wrong
CACHE_VERSION = 1
_FINGERPRINT_IMAGES = 256


def dataset_fingerprint(data: ImageSet) -> str:
    """SHA-256 of the shape, all labels and up to 256 evenly spaced images: cheap even for large sets,
    and any other dataset (or another subset of the same one) gets another key."""
    h = hashlib.sha256()
    h.update(repr((tuple(data.x.shape), str(data.x.dtype), data.num_classes)).encode())
    h.update(data.y.cpu().contiguous().numpy().tobytes())
    n = len(data)
    if n:
        idx = torch.linspace(0, n - 1, min(n, _FINGERPRINT_IMAGES)).round().long().unique()
        h.update(data.x.cpu()[idx].contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(params: Mapping[str, Any], data: ImageSet) -> str:
    """Short hash of the training parameters (JSON, sorted) and the dataset fingerprint."""
    blob = json.dumps({"v": CACHE_VERSION, "params": dict(params), "data": dataset_fingerprint(data)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(name: str, key: str, root: Path | None = None) -> Path:
    return (root if root is not None else default_data_root()) / "cache" / f"{name}-{key}.safetensors"


def pack(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """State dicts of several networks as one flat ``{"<net>.<param>": tensor}`` (safetensors wants
    contiguous, unshared CPU tensors)."""
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone()
            for prefix, m in modules.items() for k, v in m.state_dict().items()}


def unpack(tensors: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module]) -> None:
    """Load a ``pack``-ed dict back into the networks (strict: a mismatch is an error, not a silent skip)."""
    for prefix, m in modules.items():
        sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        m.load_state_dict(sub, strict=True)


def save_atomic(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        meta = {k: json.dumps(v, default=str) for k, v in metadata.items()}
        save_file(dict(tensors), str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Tensors and metadata of a cache file; None (retrain) when it is missing or unreadable."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except Exception as exc:  # noqa: BLE001 - any failure means a corrupt cache file: retrain
        log.warning("%s: unreadable cache file (%s); training again", path, exc.__class__.__name__)
        return None
    return tensors, meta


def load_or_train(name: str, params: Mapping[str, Any], data: ImageSet,
                  train_fn: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]],
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """The cached networks for (``params``, ``data``), or ``train_fn()``'s (tensors, info), then cached.

    Returns (tensors, metadata, path); metadata carries the training info plus ``"cached": bool``.
    """
    path = cache_path(name, cache_key(params, data))
    hit = load(path)
    if hit is not None:
        tensors, meta = hit
        log.info("%s: reusing trained networks from %s", name, path)
        return tensors, {**meta, "cached": True}, path
    log.info("%s: training its networks (cached afterwards at %s)", name, path)
    tensors, info = train_fn()
    meta = {"attack": name, "params": dict(params), "data": dataset_fingerprint(data), **info}
    try:
        save_atomic(path, tensors, meta)
    except OSError as exc:  # a read-only data root must not fail the run: it only costs a retrain later
        log.warning("%s: cannot write the cache file %s (%s)", name, path, exc)
    return tensors, {**meta, "cached": False}, path
