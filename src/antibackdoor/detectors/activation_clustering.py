"""Activation clustering (Chen et al., 2018): poisoned samples of a class form their own cluster in the
penultimate activations of a model trained on the poisoned data.

Per class (always the whole class at once, never a mini-batch): the penultimate activations of the suspect
model are reduced to 10 dimensions (FastICA as in the paper, or PCA), split by k-means with k = 2, and the
smaller cluster is flagged when it holds less than ``max_share`` (35 %) of the class ("relative size"). The
continuous score is a sample's distance from its class's larger cluster, measured along the axis between the
two cluster centres in units of their gap (0 = at the larger centre, 1 = at the smaller), so that scores of
different classes compare.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..config import param
from ..errors import ConfigError
from ..models.features import penultimate_features
from ..seeding import derive_seed
from ..training import TrainConfig
from .base import PAPER_SUSPECT, Detector, IsolationRule, Scored, register_detector, rule_param, suspect_param


@dataclass(frozen=True)
class ACParams:
    model: TrainConfig = suspect_param()
    reduce: Literal["ica", "pca"] = param("ica", doc="reduction before clustering: FastICA (the paper) or PCA")
    dims: int = param(10, doc="dimensions kept by the reduction")
    max_share: float = param(0.35, doc="the smaller cluster is flagged when it holds less than this share of "
                                       "its class")
    rule: IsolationRule = rule_param()

    def validate(self, where: str) -> None:
        if self.dims < 1 or not 0 < self.max_share <= 0.5:
            raise ConfigError(f"{where}: dims >= 1 and max_share in (0, 0.5] are "
                              "required")


def reduce_dims(x: np.ndarray, dims: int, method: str, seed: int) -> tuple[np.ndarray, bool]:
    """``x`` (n x D) reduced to at most ``dims`` dimensions with scikit-learn's FastICA or PCA, and whether
    FastICA converged (its unconverged result is still a valid projection; the caller records the fact)."""
    from sklearn.decomposition import PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning

    k = max(1, min(dims, x.shape[0] - 1, x.shape[1]))
    if method == "pca":
        return PCA(n_components=k, random_state=seed).fit_transform(x), True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        z = FastICA(n_components=k, whiten="unit-variance", random_state=seed, max_iter=1000,
                    tol=1e-3).fit_transform(x)
    return z, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def cluster_class(x: np.ndarray, dims: int, method: str, max_share: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """One class: (flagged mask, distance score, facts) from reduction + 2-means + the relative-size rule."""
    from sklearn.cluster import KMeans

    n = x.shape[0]
    if n < 3:
        return np.zeros(n, dtype=bool), np.zeros(n), {"size": n, "small_share": 0.0, "flagged": False}
    z, converged = reduce_dims(x, dims, method, seed)
    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(z)
    sizes = np.bincount(km.labels_, minlength=2)
    large = int(np.argmax(sizes))
    share = float(sizes.min()) / n
    flagged_cluster = share < max_share
    flagged = (km.labels_ != large) & flagged_cluster
    # position along the axis from the larger cluster's centre (0) to the smaller's (1): the distance from
    # the larger cluster in units of the gap between the two, comparable across classes (a plain Euclidean
    # distance is not: after FastICA's unit-variance whitening every noise dimension weighs as much as the
    # one that separates the clusters)
    axis = km.cluster_centers_[1 - large] - km.cluster_centers_[large]
    gap = float(axis @ axis)
    score = (z - km.cluster_centers_[large]) @ axis / gap if gap > 0 else np.zeros(n)
    return flagged, score, {"size": n, "small_share": round(share, 4), "flagged": bool(flagged_cluster),
                            "converged": converged}


@register_detector
class ActivationClustering(Detector):
    name = "activation-clustering"
    description = "Chen et al.: per-class FastICA to 10 dims + 2-means on penultimate activations; small cluster"
    Params = ACParams
    presets = {"quick": ACParams(), "paper": ACParams(model=PAPER_SUSPECT)}
    has_native_rule = True
    higher_is_suspicious = True
    score_name = "ac_distance"

    def _score(self, data, ctx, model):
        p = self.params
        feats = penultimate_features(model, data.x, ctx.device, precision=ctx.compute_precision()).double().numpy()
        seed = derive_seed(ctx.seed, "activation-clustering") % 2**32  # scikit-learn takes 32-bit seeds
        y = data.y.cpu().numpy()
        scores = np.zeros(len(y))
        native = np.zeros(len(y), dtype=bool)
        classes = {}
        for c in range(data.num_classes):
            idx = np.flatnonzero(y == c)
            if idx.size == 0:
                continue
            flagged, score, facts = cluster_class(feats[idx], p.dims, p.reduce, p.max_share, seed)
            native[idx], scores[idx] = flagged, score
            classes[c] = facts
        return Scored(torch.from_numpy(scores), torch.from_numpy(native), info={"classes": classes})
