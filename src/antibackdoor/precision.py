"""Numeric precision, decided once from the hardware: autocast dtype, memory layout and gradient scaling.

bf16 autocast doubles a CPU's or GPU's throughput where the hardware runs bf16 natively (AVX512-BF16 / AMX
CPUs, Ampere and later GPUs) and makes a CPU without it about 10x slower (oneDNN then emulates bf16 in fp32:
measured on an AVX2-only CPU, see ``antibackdoor doctor``). So ``auto`` picks bf16 only where it is native
and fp32 elsewhere; fp16 is used only when asked for, with a gradient scaler. Every place that computes —
the training loop, the PGD engine (defenses' scoring, RA), the attacks' own networks — takes its precision
from here.

The API::

    p = resolve_precision("auto", device)   # -> Precision: .name ("fp32"|"bf16"|"fp16"), .reason
    model = p.prepare(model)                # channels_last where it was measured to help
    with p.autocast():                      # no-op for fp32
        logits = model(p.batch(x))          # .batch: the input in the model's memory layout
    scaler = p.scaler()                     # GradScaler, enabled for fp16 only
    with use_precision(p):                  # code that is given no precision (an attack's prepare)
        ...                                 # reads it with active_precision(device)

``auto`` follows ``$ANTIBACKDOOR_PRECISION`` when it is set (fp32, bf16 or fp16): the test suite sets fp32
so that no test depends on the CPU kind.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger("antibackdoor")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ENV = "ANTIBACKDOOR_PRECISION"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16_native() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 or AMX; respects ``ONEDNN_MAX_CPU_ISA``)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def cuda_bf16_native(device: torch.device) -> bool:
    try:
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported())
    except (AssertionError, RuntimeError):
        return False


@dataclass(frozen=True)
class Precision:
    """A resolved precision for one device type; see the module docstring for how to use it."""

    name: str  # "fp32", "bf16" or "fp16"
    device_type: str  # "cpu", "cuda", ...
    reason: str = ""  # why ``auto`` (or the user) chose it, for the log and ``doctor``
    #: NHWC layout for 4-D batches and conv weights. Measured on 2 CPU cores (quick cnn training): +28 %
    #: fp32 and +41 % bf16 on an AVX-512-bf16 CPU, +10 % fp32 with AVX2 only (``antibackdoor doctor``).
    channels_last: bool = True

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def amp(self) -> bool:
        """True when models run under autocast (bf16 or fp16)."""
        return self.name != "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to bf16/fp16 (losses should still be computed from ``.float()`` logits); no-op for fp32."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler: active for fp16 (whose gradients underflow), a pass-through otherwise."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` in the memory layout its inputs will have (in place; returned for chaining)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-D batch in the layout of ``prepare``-d models (unchanged otherwise)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def describe(self) -> str:
        return f"{self.name} ({self.reason})" if self.reason else self.name


#: plain fp32 in the layout given: what code that is handed no precision and sets none computes in
PLAIN = Precision("fp32", "cpu", "plain fp32", channels_last=False)


def auto_choice(device: torch.device | str) -> tuple[str, str]:
    """What ``auto`` picks on ``device`` and why (ignoring ``$ANTIBACKDOOR_PRECISION``)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if cuda_bf16_native(dev):
            return "bf16", "CUDA device with native bf16"
        return "fp32", "this CUDA device has no native bf16"
    if dev.type == "cpu":
        if cpu_bf16_native():
            return "bf16", "the CPU runs bf16 natively (AVX512-BF16/AMX)"
        return "fp32", "the CPU has no native bf16 (bf16 would be emulated, ~10x slower)"
    return "fp32", f"no bf16 rule for device type {dev.type!r}"


def resolve_precision(name: str = "auto", device: torch.device | str = "cpu") -> Precision:
    """The precision to compute in on ``device``: ``name`` is auto, fp32, bf16 or fp16.

    ``auto`` is ``$ANTIBACKDOOR_PRECISION`` when that is set, else bf16 where the hardware runs it natively
    and fp32 elsewhere. Asking for bf16/fp16 where they are emulated works, with a warning.
    """
    if name not in PRECISIONS:
        raise ConfigError(f"--precision: {name!r} is not one of {', '.join(PRECISIONS)}")
    dev = torch.device(device)
    reason = "asked for"
    if name == "auto":
        env = os.environ.get(ENV, "").strip().lower()
        if env and env != "auto":
            if env not in _DTYPES:
                raise ConfigError(f"${ENV}: {env!r} is not one of {', '.join(PRECISIONS)}")
            name, reason = env, f"${ENV}={env}"
        else:
            name, reason = auto_choice(dev)
    elif name == "bf16" and dev.type == "cpu" and not cpu_bf16_native():
        reason = "asked for; emulated on this CPU (about 10x slower than fp32)"
        log.warning("precision bf16: this CPU has no native bf16; it is emulated and about 10x slower than fp32")
    elif name == "fp16" and dev.type == "cpu":
        reason = "asked for; CPUs without AVX512-FP16/AMX-FP16 emulate it"
    return Precision(name, dev.type, reason)


_ACTIVE: contextvars.ContextVar[Precision | None] = contextvars.ContextVar("antibackdoor_precision", default=None)


@contextlib.contextmanager
def use_precision(p: Precision) -> Iterator[Precision]:
    """Make ``p`` the precision of code that is given none (an attack's ``prepare``, ``train`` without one)."""
    token = _ACTIVE.set(p)
    try:
        yield p
    finally:
        _ACTIVE.reset(token)


def active_precision(device: torch.device | str = "cpu") -> Precision:
    """The precision set by ``use_precision`` (for this device type), else ``resolve_precision("auto")``."""
    p = _ACTIVE.get()
    dev = torch.device(device)
    if p is not None and p.device_type == dev.type:
        return p
    return resolve_precision("auto", dev)


def as_precision(p: Precision | str | None, device: torch.device | str = "cpu") -> Precision:
    """A Precision from a Precision, a name (auto/fp32/bf16/fp16) or None (= ``active_precision``)."""
    if isinstance(p, Precision):
        return p
    if p is None:
        return active_precision(device)
    return resolve_precision(p, device)


__all__ = ["ENV", "PLAIN", "PRECISIONS", "Precision", "active_precision", "as_precision", "auto_choice",
           "cpu_bf16_native", "resolve_precision", "use_precision"]
