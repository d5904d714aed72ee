"""The one format of a trained model on disk: ``model.safetensors`` that describes itself, and its reader.

``run`` and ``defend`` both write their model with ``save_model``; ``load_model`` reads any of them back.
Safetensors holds only tensors and a string-to-string header, so loading a file someone hands you runs no
code (unlike a pickled checkpoint). The header (``model_metadata``) records the model name and everything
``build_model`` needs -- ``model``, ``num_classes``, ``channels``, ``image_size``, ``mean``, ``std`` (JSON
lists), ``classes`` (JSON), plus ``format`` and where the model came from (``dataset``; ``defend`` adds
``defense`` and ``preset``) -- so one call rebuilds the network::

    import antibackdoor
    model = antibackdoor.load_model("runs/.../model.safetensors")   # eval mode, on the CPU
    model.classes, model.image_size, model.channels                  # from the file's metadata
    probs = model(x).softmax(1)                                      # x: N x C x H x W floats in [0, 1]

The model normalises its input itself (the first layer), so ``x`` is plain pixels scaled to [0, 1].

A defense that changes how the network is used at inference returns it inside a ``models.wrappers.Wrapper``
(PDB: its defensive trigger stamped on every input, the answer mapped back through its label map). Such a model
is saved as one file too: the tensors are the wrapper's (the network's under ``net.``, plus the wrapper's own,
e.g. ``pattern`` and ``mask``), and the header adds ``wrapper`` (its kind) and the wrapper's settings
(``wrapper_label_map``, ...), so ``load_model`` rebuilds the deployed model, wrapper and all, from the file
alone; ``model`` still names the network inside.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..caching import atomic_write
from ..errors import DataError
from .registry import MODELS, build_model
from .wrappers import WRAPPERS, Wrapper, WrapperError

FORMAT = "antibackdoor-model/1"


class DataLike(Protocol):
    """What the header needs from the data a model was trained on (an ``ImageSet`` has it)."""

    classes: Sequence[str]
    channels: int
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]


def model_metadata(model: str, like: DataLike, **extra: Any) -> dict[str, str]:
    """The header of ``model.safetensors``: the model name, what ``build_model`` needs for data shaped like
    ``like``, and ``extra`` facts (strings as they are, anything else as JSON)."""
    meta = {
        "format": FORMAT, "model": model, "num_classes": str(len(like.classes)), "channels": str(int(like.channels)),
        "image_size": str(int(like.image_size)), "mean": json.dumps([float(v) for v in like.mean]),
        "std": json.dumps([float(v) for v in like.std]), "classes": json.dumps([str(c) for c in like.classes]),
    }
    for k, v in extra.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, default=str)
    return meta


def save_model(net: nn.Module, path: str | Path, model: str, like: DataLike, **extra: Any) -> Path:
    """Write ``net``'s weights (atomically) with ``model_metadata(model, like, **extra)`` as the header; a
    ``Wrapper`` adds its header (``model`` names the network inside it)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = model_metadata(model, like, **extra)
    if isinstance(net, Wrapper):
        meta.update(net.header())
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
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
    """Rebuild the network saved at ``path`` by ``save_model`` (any run's or defend's model) and load its
    weights; eval mode. A file whose header names a ``wrapper`` comes back inside it (the deployed model).

    The returned module carries ``classes``, ``architecture`` (the model name), ``image_size``, ``channels``,
    ``mean``, ``std``, ``wrapper`` (its kind, or None) and ``metadata`` (the whole header) as attributes.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    try:
        arch = meta["model"]
        classes = json.loads(meta["classes"])
        num_classes = int(meta["num_classes"])
        channels, image_size = int(meta["channels"]), int(meta["image_size"])
        mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    except (KeyError, ValueError) as exc:
        raise DataError(f"{path}: model metadata lacks or garbles {exc}; it was not written by save_model "
                        "(model, num_classes, classes, channels, image_size, mean and std are needed)") from None
    if num_classes != len(classes):
        raise DataError(f"{path}: metadata names {len(classes)} classes but num_classes is {num_classes}")
    if arch not in MODELS:
        raise DataError(f"{path}: model {arch!r} is not a known model ({', '.join(sorted(MODELS))})")
    kind = meta.get("wrapper")
    if kind is not None and kind not in WRAPPERS:
        raise DataError(f"{path}: wrapper {kind!r} is not a known wrapper ({', '.join(sorted(WRAPPERS))})")
    net = build_model(arch, num_classes, channels, image_size, mean, std)
    state = load_file(str(path))
    if kind is not None:
        try:
            net = WRAPPERS[kind].rebuild(net, meta, state)
            net.check_fits(channels, image_size, num_classes)
        except WrapperError as exc:
            raise DataError(f"{path}: the {kind} wrapper it names does not fit: {exc}") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise DataError(f"{path}: weights do not fit a {arch} for {num_classes} classes ({first})") from None
    net.to(device).eval()
    net.classes = list(classes)
    net.architecture = arch
    net.image_size, net.channels = image_size, channels
    net.mean, net.std = tuple(mean), tuple(std)
    net.wrapper = kind
    net.metadata = meta
    return net


__all__ = ["FORMAT", "load_model", "model_metadata", "read_metadata", "save_model"]
