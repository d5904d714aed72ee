"""Evaluation: clean accuracy (ACC), attack success rate (ASR), robust accuracy (RA) and split metrics.

ASR is measured on test images whose true class is not the target. Split metrics compare a defense's
kept/isolated masks with the ground-truth poison mask, which defenses never see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from .adversarial.pgd import PGDConfig, eval_mode, pgd
from .config import key_path, param
from .data.imageset import ImageSet
from .errors import ConfigError
from .precision import PLAIN, Precision
from .seeding import fixed_generator


@dataclass(frozen=True)
class EvalConfig:
    """How RA is measured: L-inf PGD with random start; by default PGD-10, eps 8/255, step 2/255 (both papers).
    The one definition of RA: ``robust_accuracy`` and the run's ``eval`` section use it."""

    ra_eps: float = param(8 / 255, doc="L-inf radius of the RA attack, pixel units")
    ra_step: float = param(2 / 255, doc="step size of the RA attack, pixel units")
    ra_steps: int = param(10, doc="PGD steps of the RA attack (random start)")
    ra_samples: int = param(0, doc="measure RA on the first N test images (0: all)")

    def validate(self, where: str) -> None:
        """Ranges checked before a run starts: RA is measured last, after the whole training."""
        if self.ra_samples < 0:
            raise ConfigError(f"{key_path(where, 'ra_samples')} (--ra-samples): {self.ra_samples} must be >= 0 "
                              "(0: every evaluation image)")
        if self.ra_steps < 0:
            raise ConfigError(f"{key_path(where, 'ra_steps')}: {self.ra_steps} must be >= 0")
        if not 0.0 <= self.ra_eps <= 1.0:  # NaN fails too
            raise ConfigError(f"{key_path(where, 'ra_eps')}: {self.ra_eps} must lie in [0, 1] (pixel units: "
                              "8/255 = 0.0314)")
        if self.ra_steps and not 0.0 < self.ra_step <= 1.0:
            raise ConfigError(f"{key_path(where, 'ra_step')}: {self.ra_step} must lie in (0, 1] (pixel units: "
                              "2/255 = 0.00784)")

    def pgd(self) -> PGDConfig:
        return PGDConfig(eps=self.ra_eps, step=self.ra_step, steps=self.ra_steps, random_start=True)

    def label(self) -> str:
        """``PGD-10 8/255``: the attack RA was measured with, as the result table names it."""
        return f"PGD-{self.ra_steps} {self.ra_eps * 255:.3g}/255"


RA_PGD = EvalConfig().pgd()


@torch.no_grad()
def predict(model: nn.Module, data: ImageSet, device: torch.device | str = "cpu",
            batch_size: int = 1024, precision: Precision | None = None) -> torch.Tensor:
    """Predicted labels for every image (eval mode; ``precision`` None: plain fp32)."""
    prec = PLAIN if precision is None else precision
    out = []
    with eval_mode(model), prec.autocast():
        for s in range(0, len(data), batch_size):
            xb = data.x[s:s + batch_size].to(device).float().div_(255.0)
            out.append(model(prec.batch(xb)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, data: ImageSet, device: torch.device | str = "cpu",
             precision: Precision | None = None) -> float:
    if len(data) == 0:
        return float("nan")
    return float((predict(model, data, device, precision=precision) == data.y.cpu()).float().mean())


def attack_success_rate(model: nn.Module, triggered: ImageSet, device: torch.device | str = "cpu",
                        precision: Precision | None = None) -> float:
    """Fraction of triggered non-target test images classified as the target (``triggered.y``)."""
    return accuracy(model, triggered, device, precision)


def robust_accuracy(model: nn.Module, data: ImageSet, cfg: PGDConfig = RA_PGD,
                    device: torch.device | str = "cpu", batch_size: int = 512, seed: int = 0,
                    precision: Precision | None = None) -> float:
    """Accuracy under PGD (default ``EvalConfig().pgd()``: PGD-10, eps 8/255, step 2/255, random start;
    ``precision`` None: fp32)."""
    if len(data) == 0:
        return float("nan")
    gen = fixed_generator(seed)
    correct = 0
    for s in range(0, len(data), batch_size):
        xb = data.x[s:s + batch_size].to(device).float().div_(255.0)
        yb = data.y[s:s + batch_size].to(device)
        correct += int((pgd(model, xb, yb, cfg, generator=gen, precision=precision).pred == yb).sum())
    return correct / len(data)


def split_metrics(kept: torch.Tensor, poison_mask: torch.Tensor) -> dict[str, float]:
    """gamma = |kept| / N, rho_vul = poison share of the kept set, TPR/FPR of the isolated set."""
    kept = kept.bool().cpu()
    poison = poison_mask.bool().cpu()
    isolated = ~kept
    n_p, n_c = int(poison.sum()), int((~poison).sum())
    return {
        "gamma": float(kept.float().mean()) if len(kept) else float("nan"),
        "rho_vul": float((kept & poison).sum()) / max(int(kept.sum()), 1),
        "isolated": int(isolated.sum()),
        "isolated_poison": int((isolated & poison).sum()),
        "tpr": float((isolated & poison).sum()) / n_p if n_p else float("nan"),
        "fpr": float((isolated & ~poison).sum()) / n_c if n_c else float("nan"),
    }


Scores = TypeVar("Scores", torch.Tensor, np.ndarray)


def suspicion(scores: Scores, higher_is_suspicious: bool) -> Scores:
    """Scores oriented so that higher always means more suspicious (float64; a tensor stays a tensor): what
    every ranking, top-fraction rule and ROC curve reads, whichever way a defense's own score points."""
    s = scores.double() if isinstance(scores, torch.Tensor) else np.asarray(scores, np.float64)
    return s if higher_is_suspicious else -s


def roc_auc(suspicious: torch.Tensor | np.ndarray, positive: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve of ``suspicious`` (higher = more suspicious; ties count half) for the
    ``positive`` samples (the poison); NaN without both classes or with a NaN score."""
    from sklearn.metrics import roc_auc_score

    y, s = _numpy(positive).astype(bool), _numpy(suspicious).astype(np.float64)
    if y.all() or not y.any() or np.isnan(s).any():
        return float("nan")
    return float(roc_auc_score(y, s))


def roc_curve_points(suspicious: torch.Tensor | np.ndarray,
                     positive: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of every threshold on ``suspicious`` (scikit-learn's roc_curve)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(_numpy(positive).astype(bool), _numpy(suspicious).astype(np.float64))
    return fpr, tpr


def _numpy(a: torch.Tensor | np.ndarray) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
