"""Turning scores into a split, and a split into training labels: Otsu's threshold, the one top-fraction rule,
and the one treatment of isolated samples (drop, relabel, unlearn) that every isolate-then-train composition
uses."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Treatment = Literal["drop", "relabel", "unlearn"]


def top_count(n: int, fraction: float) -> int:
    """How many samples "the top ``fraction``" of ``n`` is: ``round(fraction * n)``, at least one when the
    fraction is positive (an isolation that asks for some samples gets some), at most ``n``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction}: must lie in [0, 1]")
    count = round(fraction * n)
    return min(n, max(count, 1 if fraction > 0 else 0))


def top_fraction(suspicion: torch.Tensor, fraction: float, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask (CPU) of the ``top_count(N, fraction)`` most suspicious samples, taken among ``candidates``
    (bool N) when given; ties keep index order, a NaN score ranks last. ``suspicion`` is oriented
    (``metrics.suspicion``): higher = more suspicious."""
    s = suspicion.double().cpu()
    s = torch.where(torch.isnan(s), torch.full_like(s, -torch.inf), s)
    order = torch.sort(s, descending=True, stable=True).indices
    if candidates is not None:
        order = order[candidates.bool().cpu()[order]]
    mask = torch.zeros(len(s), dtype=torch.bool)
    mask[order[:top_count(len(s), fraction)]] = True
    return mask


def treat(y: torch.Tensor, isolated: torch.Tensor, treatment: Treatment, num_classes: int,
          generator: torch.Generator | None = None, proposed: torch.Tensor | None = None,
          unlearn_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and loss weights of the final training (weight 0: not trained on, negative: unlearned).

    ``drop``: isolated samples get weight 0. ``unlearn``: weight -``unlearn_weight`` (gradient ascent, as ABL).
    ``relabel``: an isolated sample gets its ``proposed`` label (e.g. AIBD's adversarial label); one without a
    proposal (-1) is dropped, since keeping its given, likely target, label would teach the backdoor again; with
    no proposals at all, a uniformly random class other than the given one, drawn from ``generator``.
    """
    labels, weight = y.clone(), torch.ones(len(y))
    if treatment == "drop":
        weight[isolated] = 0.0
    elif treatment == "unlearn":
        weight[isolated] = -unlearn_weight
    elif treatment == "relabel":
        if proposed is not None:
            has = proposed >= 0
            labels[isolated & has] = proposed[isolated & has]
            weight[isolated & ~has] = 0.0
        else:
            if generator is None:
                raise ValueError("treat: a random relabelling needs a generator")
            shift = torch.randint(1, num_classes, (len(y),), generator=generator)
            labels[isolated] = ((y + shift) % num_classes)[isolated]
    else:
        raise ValueError(f"treat: unknown treatment {treatment!r}")
    return labels, weight


def otsu_threshold(scores: torch.Tensor, log_scale: bool = False) -> float:
    """Otsu's threshold (scikit-image) on a 1-D score distribution; the midpoint if all scores are equal.

    ``log_scale``: Otsu on log(score) (scores clamped to >= 1e-12), returned in the scores' own units; for
    non-negative scores spread over orders of magnitude, where the raw histogram crowds the low ones into few bins.
    """
    from skimage.filters import threshold_otsu

    values = scores.double().cpu().numpy()
    if values.size == 0:
        raise ValueError("no scores to threshold")
    if log_scale:
        return float(np.exp(otsu_threshold(torch.from_numpy(np.log(np.maximum(values, 1e-12))))))
    if np.ptp(values) == 0:
        return float(values[0])
    nbins = 1024
    t = float(threshold_otsu(values, nbins=nbins))
    # skimage returns the centre of the threshold's histogram bin, which can lie below values of the lower
    # class in that same bin; move it to the middle of the gap between the two classes it defines.
    upper = t + np.ptp(values) / nbins / 2
    below, above = values[values <= upper], values[values > upper]
    if below.size and above.size:
        t = float((below.max() + above.min()) / 2)
    return t
