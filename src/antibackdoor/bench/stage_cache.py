"""A content-addressed cache of trained stage models: each backdoored model is trained once.

Many defenses begin the same way: a model trained normally on the poisoned data (``none``; A-ABL's stage 1,
whose quick recipe equals ``none``'s; AIBD's infected model, shared by its three treatments; the starting
model of fine-tuning defenses). In a grid these are the same computation repeated per defense. The stage
cache stores the trained weights under a key made of everything that decides them:

- the exact training data: a fingerprint of the images and labels the stage sees (this covers the dataset,
  the resolved attack and its parameters, the poison rate, the target and the poisoning seed, and any subset
  a defense trains on),
- the initial weights and the architecture (the model's ``repr`` and a hash of its freshly seeded state, so
  the model name, the class count and the seed of the initialisation are all covered),
- the training config (epochs, optimiser, schedule, augmentation, adversary), the training seed, the
  per-sample loss weights, the device type, the resolved precision (fp32 / bf16 / fp16 and the memory
  layout, see ``precision.py``: a bf16 model is not an fp32 one) and the torch version.

A stage is looked up in :func:`antibackdoor.defenses.stages.train_stage` when the defense context carries a
cache (the bench gives every cell one; ``antibackdoor run`` does not). Stages with an epoch callback (which
may stop early or depend on held-out data) are never cached. Entries are safetensors files (never pickle)
named and written by ``caching.py`` (versioned key, atomic write); a worker that is about to train a stage
holds a lock on its key, so a second worker asking for the same stage waits and then loads it instead of
training it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attacks.cache import dataset_fingerprint
from ..caching import atomic_write, cache_hasher, cache_path
from ..config import to_dict
from ..data.imageset import ImageSet
from ..data.registry import default_data_root
from ..jsonutil import dumps
from ..locking import file_lock
from ..precision import Precision

log = logging.getLogger("antibackdoor")

def default_stage_cache_dir() -> Path:
    """``<data root>/cache/stages`` (``$ANTIBACKDOOR_DATA`` or ``~/.cache/antibackdoor``)."""
    return default_data_root() / "cache" / "stages"


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's structure (its repr) and every tensor of its state (weights, buffers)."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def cache_hits(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The stage-cache events a run recorded in its metrics (``StageCache.take_events``) that loaded a stage
    instead of training it."""
    return [e for e in metrics.get("stage_cache") or [] if e.get("hit")]


def saved_seconds(hits: list[dict[str, Any]]) -> float:
    """The training seconds those loaded stages had cost when they were trained."""
    return sum(float(e.get("seconds") or 0) for e in hits)


class StageCache:
    """Trained stage models under ``root``, addressed by the hash of what decides them.

    ``events`` lists what happened in this process (one dict per consulted stage: hit or trained, and the
    training seconds it cost or saved); the runner writes them into the run's metrics.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_stage_cache_dir()
        self.events: list[dict[str, Any]] = []

    def key(self, model: nn.Module, data: ImageSet, cfg: Any, seed: int, precision: Precision,
            sample_weight: torch.Tensor | None = None) -> str:
        """The entry's address (64 hex digits; ``caching.CACHE_VERSIONS["stage"]`` is part of it)."""
        h = cache_hasher("stage")
        fixed = {"torch": torch.__version__, "cfg": to_dict(cfg), "seed": int(seed),
                 "device": precision.device_type, "precision": precision.name,
                 "channels_last": precision.channels_last}
        h.update(json.dumps(fixed, sort_keys=True, default=str).encode())
        h.update(dataset_fingerprint(data).encode())
        h.update(model_fingerprint(model).encode())
        if sample_weight is not None:
            _hash_tensor(h, sample_weight.float())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return cache_path(self.root, f"stage-{key}", ".safetensors")

    def train_or_load(self, model: nn.Module, data: ImageSet, cfg: Any, *, seed: int, stage: str,
                      fit: Callable[[], list[dict]], precision: Precision,
                      sample_weight: torch.Tensor | None = None, describe: dict[str, Any] | None = None,
                      ) -> list[dict]:
        """Give ``model`` (freshly initialised, not yet trained) the stored weights for this stage, or run
        ``fit()`` (which trains ``model`` in place, in ``precision``, and returns its history) and store
        them. Returns the stage's training history either way."""
        key = self.key(model, data, cfg, seed, precision, sample_weight)
        path = self.path(key)
        hit = self._load(path, model, precision)
        if hit is None:
            with file_lock(self.root / f".{key}.lock"):
                hit = self._load(path, model, precision)  # another worker may have stored it while we waited
                if hit is None:
                    t0 = time.time()
                    history = fit()
                    seconds = time.time() - t0
                    self._save(path, model, history, seconds, stage, describe)
                    self.events.append({"stage": stage, "key": key[:16], "hit": False,
                                        "seconds": round(seconds, 1)})
                    return history
        history, seconds = hit
        log.info("%s: reusing the trained stage model %s (saved %.0f s of training)", stage, path, seconds)
        self.events.append({"stage": stage, "key": key[:16], "hit": True, "seconds": round(seconds, 1)})
        return history

    def _save(self, path: Path, model: nn.Module, history: list[dict], seconds: float, stage: str,
              describe: dict[str, Any] | None) -> None:
        from safetensors.torch import save_file


        meta = {"history": dumps(history), "seconds": f"{seconds:.3f}", "stage": stage,
                "created": f"{time.time():.0f}", "describe": dumps(describe or {})}
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        try:
            atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
        except OSError as exc:  # a full or read-only disk costs a retraining later, not this run
            log.warning("stage cache: cannot write %s (%s)", path, exc)

    def _load(self, path: Path, model: nn.Module, precision: Precision) -> tuple[list[dict], float] | None:
        """Load an entry into ``model``; None when missing or unusable (then it is trained again)."""
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
            model.load_state_dict(state, strict=True)
            history = json.loads(meta.get("history", "[]"))
            seconds = float(meta.get("seconds", "0"))
        except Exception as exc:  # noqa: BLE001 - any failure means an unusable entry
            log.warning("stage cache: ignoring unreadable entry %s (%s)", path, exc.__class__.__name__)
            return None
        precision.prepare(model)  # the memory layout a trained model leaves training with
        model.eval()
        return history, seconds

    def take_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events
