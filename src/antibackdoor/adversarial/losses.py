"""Per-sample classification losses used by the PGD engine and the defenses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: log of the zero entries of the one-hot label in reverse cross-entropy, clamped at 1e-4: log(1e-4) = -9.21,
#: as the SCE authors' code clamps (their paper writes the constant as A = -4); docs/a-abl.md
RCE_LOG_ZERO = math.log(1e-4)


def _full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Losses in at least fp32 (bf16 logits under autocast lose too much for per-sample statistics)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def symmetric_cross_entropy(logits: torch.Tensor, y: torch.Tensor, alpha: float = 0.1,
                            beta: float = 1.0) -> torch.Tensor:
    """SCE = alpha * CE + beta * RCE per sample (Wang et al., ICCV 2019; alpha 0.1, beta 1 for CIFAR-10).

    RCE = -sum_k p_k log q_k with q the one-hot label clamped to 1e-4, which equals -A * (1 - p_y): bounded,
    and large only for misclassified samples, which is why A-ABL scores with it.
    """
    logits = _full_precision(logits)
    ce = F.cross_entropy(logits, y, reduction="none")
    p_y = torch.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    rce = -RCE_LOG_ZERO * (1.0 - p_y)
    return alpha * ce + beta * rce


def per_sample_loss(name: str, logits: torch.Tensor, y: torch.Tensor, sce_alpha: float = 0.1,
                    sce_beta: float = 1.0) -> torch.Tensor:
    if name == "ce":
        return F.cross_entropy(_full_precision(logits), y, reduction="none")
    if name == "sce":
        return symmetric_cross_entropy(logits, y, sce_alpha, sce_beta)
    raise ValueError(f"unknown loss {name!r} (expected 'ce' or 'sce')")
