"""A disk cache for what an attack's ``prepare`` learns (a clean or robust model, IAB's generators, SSBA's
encoder, an optimised trigger).

Training an auxiliary network costs minutes on a CPU, and every run of the same attack on the same data needs
the same one, so it is stored once under ``<data root>/cache/antibackdoor-cache-<attack>-<key>.safetensors``
(the scheme of ``antibackdoor.caching``). Nothing is downloaded: BackdoorBench users keep hitting missing SSBA
``.npy`` files or LC models, so everything here is produced locally. The key covers the attack's own key (the
parameters that decide the networks), a fingerprint of the training data and the ``attack`` cache version,
so a changed parameter, dataset or training code never reuses a stale file. Files are written atomically: a
killed run or two concurrent runs never leave a half-written entry; they are read with safetensors, never
pickle, so a cache file cannot execute code, and an unreadable one is rebuilt rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import training  # training.train is looked up at call time (tests replace it)
from ..caching import atomic_write, cache_key
from ..caching import cache_path as _cache_file
from ..config import to_dict
from ..data.imageset import ImageSet
from ..data.registry import default_data_root
from ..locking import file_lock
from ..models import build_model
from ..precision import active_precision
from ..seeding import derive_seed, seeded_rng

log = logging.getLogger("antibackdoor")


def cache_dir() -> Path:
    """``<data root>/cache`` (``$ANTIBACKDOOR_DATA`` or ``~/.cache/antibackdoor``)."""
    return default_data_root() / "cache"


def dataset_fingerprint(data: ImageSet) -> str:
    """SHA-256 over the images, labels and shape: equal fingerprints mean equal training data."""
    h = hashlib.sha256()
    h.update(repr((tuple(data.x.shape), str(data.x.dtype), data.num_classes)).encode())
    h.update(data.x.detach().cpu().contiguous().numpy().tobytes())
    h.update(data.y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_path(attack: str, key: Mapping[str, Any], data: ImageSet | None = None) -> Path:
    """Where the entry for ``key`` (JSON-serialisable) and ``data`` lives."""
    payload = {"attack": attack, "key": dict(key), "data": dataset_fingerprint(data) if data is not None else None}
    return _cache_file(cache_dir(), f"{attack}-{cache_key('attack', payload)}", ".safetensors")


def pack(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """State dicts of several networks as one flat ``{"<net>.<param>": tensor}``."""
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone()
            for prefix, m in modules.items() for k, v in m.state_dict().items()}


def unpack(tensors: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module]) -> None:
    """Load a ``pack``-ed dict back into the networks (strict: a mismatch is an error, not a silent skip)."""
    for prefix, m in modules.items():
        sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        m.load_state_dict(sub, strict=True)


def _save_atomic(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    meta = {k: json.dumps(v, default=str) for k, v in metadata.items()}
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Tensors and metadata of a cache file; None (rebuild) when it is missing or unreadable."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable cache entry
        log.warning("%s: ignoring unreadable cache entry (%s); building it again", path, exc.__class__.__name__)
        return None
    return tensors, meta


def load_or_build(attack: str, key: Mapping[str, Any], data: ImageSet | None,
                  build: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]],
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors stored for (attack, key, data), or ``build()``'s ``(tensors, info)``, then stored.

    Returns ``(tensors, metadata)``; the metadata holds ``info`` (as stored) and ``"cached": bool``.
    """
    path = cache_path(attack, key, data)
    hit = _load(path)
    if hit is None:
        # concurrent workers (bench) wanting the same entry: one builds it, the others wait and load it
        with file_lock(path.with_name(f".{path.name}.lock")):
            hit = _load(path)
            if hit is None:
                log.info("%s: building what the attack needs (cached afterwards at %s)", attack, path)
                tensors, info = build()
                meta = {"attack": attack, "key": dict(key), **info}
                try:
                    _save_atomic(path, tensors, meta)
                except OSError as exc:  # a read-only data root costs a rebuild next time, not this run
                    log.warning("%s: cannot write the cache file %s (%s)", attack, path, exc)
                return tensors, {**json.loads(json.dumps(meta, default=str)), "cached": False}
    log.info("%s: reusing cached %s", attack, path)
    return hit[0], {**hit[1], "cached": True}


def cached_tensors(attack: str, key: Mapping[str, Any], data: ImageSet | None,
                   build: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], bool]:
    """Load the tensors stored for (attack, key, data), or ``build`` and store them; ``(tensors, hit)``."""
    tensors, meta = load_or_build(attack, key, data, lambda: (build(), {}))
    return tensors, bool(meta["cached"])


def cached_model(attack: str, arch: str, cfg: Any, train: ImageSet, seed: int, desc: str) -> tuple[nn.Module, bool]:
    """An auxiliary model (a clean or robust classifier an attack needs): architecture ``arch`` trained with
    ``cfg`` (a ``TrainConfig``) on ``train``, seeded by ``seed`` alone, so every run on the same data shares
    it; from the cache when it is there. Returns the model (eval mode, on ``train``'s device) and whether it
    came from the cache."""
    device = train.x.device  # the compute device: the experiment moves the data there first
    prec = active_precision(device)  # the networks are trained in it, so it is part of the key
    with seeded_rng(seed, attack, "model"):
        model = build_model(arch, train.num_classes, train.channels, train.image_size, train.mean,
                            train.std).to(device)

    def build() -> dict[str, torch.Tensor]:
        training.train(model, train, cfg, seed=derive_seed(seed, attack, "train"), device=device, desc=desc,
                       precision=prec)
        return dict(model.state_dict())

    state, hit = cached_tensors(attack, {"model": arch, "train": to_dict(cfg), "seed": seed,
                                              "precision": prec.name}, train, build)
    if hit:
        model.load_state_dict(state)
    return model.eval(), hit
