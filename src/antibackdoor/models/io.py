"""Saving a trained model as ``model.safetensors`` with what it takes to rebuild it, and loading it back.

Safetensors holds only tensors and a string-to-string header, so loading a file someone hands you runs no
code (unlike a pickled checkpoint). The header records the architecture, class names, input channels,
image size and normalisation, so that one call rebuilds the network::

    import antibackdoor
    model = antibackdoor.load_model("runs/.../model.safetensors")   # eval mode, on the CPU
    model.classes, model.image_size, model.channels                  # from the file's metadata
    probs = model(x).softmax(1)                                      # x: N x C x H x W floats in [0, 1]

The model normalises its input itself (the first layer), so ``x`` is plain pixels scaled to [0, 1].
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DataError
from .registry import MODELS, build_model

FORMAT = "antibackdoor-model/1"


def save_model(model: nn.Module, path: str | Path, *, architecture: str, classes: Sequence[str],
               channels: int, image_size: int, mean: Sequence[float], std: Sequence[float],
               extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights and the facts needed to rebuild it (``extra``: more JSON-able facts)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "model": architecture,  # the key older run directories used
        "architecture": architecture,
        "classes": json.dumps(list(classes)),
        "num_classes": str(len(classes)),
        "channels": str(int(channels)),
        "image_size": str(int(image_size)),
        "mean": json.dumps([float(v) for v in mean]),
        "std": json.dumps([float(v) for v in std]),
    }
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, default=str)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string header of a ``.safetensors`` file (no tensors are read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise DataError(f"{path}: not a readable .safetensors file ({exc.__class__.__name__}: {exc})") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network saved at ``path`` by ``save_model`` and load its weights; eval mode.

    The returned module carries ``classes``, ``architecture``, ``image_size``, ``channels``, ``mean``,
    ``std`` and ``metadata`` (the whole header) as attributes.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    try:
        arch = meta["architecture"] if "architecture" in meta else meta["model"]
        classes = json.loads(meta["classes"])
        channels, image_size = int(meta["channels"]), int(meta["image_size"])
        mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    except (KeyError, ValueError) as exc:
        raise DataError(f"{path}: model metadata lacks or garbles {exc}; it was not written by save_model "
                        "(architecture, classes, channels, image_size, mean and std are needed)") from None
    if arch not in MODELS:
        raise DataError(f"{path}: architecture {arch!r} is not a known model ({', '.join(sorted(MODELS))})")
    model = build_model(arch, len(classes), channels, image_size, mean, std)
    state = load_file(str(path))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise DataError(f"{path}: weights do not fit a {arch} for {len(classes)} classes ({first})") from None
    model.to(device).eval()
    model.classes = list(classes)
    model.architecture = arch
    model.image_size, model.channels = image_size, channels
    model.mean, model.std = tuple(mean), tuple(std)
    model.metadata = meta
    return model


__all__ = ["load_model", "read_metadata", "save_model"]
