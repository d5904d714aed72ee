"""Cross-check of activation clustering and spectral signatures against another public implementation:
IBM's Adversarial Robustness Toolbox (ART), on the same penultimate activations of the same suspect models.

    pip install adversarial-robustness-toolbox   # benchmark only, not a dependency of the package
    python benchmarks/crosscheck_art.py [--runs runs/detectors] [--attacks badnets,blend,...] [--target 0]

Uses the suspect models that benchmarks/bench_detectors.py saved (RUNS/<attack>-t<target>-s<seed>/). For
activation clustering it runs ART's own pipeline (cluster_activations: FastICA to 10 dims + KMeans,
ClusteringAnalyzer.analyze_by_size for the smaller cluster) and ours per class, and reports per class the
smaller cluster's share in both, whether each flags it at 35 %, and how far the two smaller clusters agree.
For spectral signatures it compares our scores with ART's SpectralSignatureDefense.spectral_signature_scores.
Writes RUNS/crosscheck_art_t<target>.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import antibackdoor as ab
from antibackdoor.detectors.activation_clustering import cluster_class
from antibackdoor.detectors.spectral_signature import spectral_scores
from antibackdoor.metrics import roc_auc
from antibackdoor.models.features import penultimate_features


def art_activation_clustering(feats: np.ndarray, y: np.ndarray, classes: int,
                              seed: int) -> tuple[np.ndarray, dict[int, float]]:
    """ART's clusters on the same activations, class by class: the mask of each class's smaller cluster
    (ART's ClusteringAnalyzer.analyze_by_size) and the smaller cluster's share of its class.

    ART 1.20.1's analyze_by_relative_size raises "truth value of an empty array is ambiguous" under numpy 2
    when a class has no suspicious cluster, so the 35 % rule is applied here to ART's cluster sizes."""
    from art.defences.detector.poison.activation_defence import cluster_activations
    from art.defences.detector.poison.clustering_analyzer import ClusteringAnalyzer

    np.random.seed(seed)  # ART's FastICA and KMeans take no seed: fix numpy's global one
    separated = [feats[y == c] for c in range(classes)]
    clusters, _ = cluster_activations(separated, nb_clusters=2, nb_dims=10, reduce="FastICA")
    assigned_clean, _, _ = ClusteringAnalyzer().analyze_by_size(clusters)
    smaller = np.zeros(len(y), dtype=bool)
    shares = {}
    for c in range(classes):
        smaller[y == c] = np.asarray(assigned_clean[c]) == 0
        shares[c] = float(np.bincount(clusters[c], minlength=2).min()) / len(clusters[c])
    return smaller, shares


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default="runs/detectors")
    p.add_argument("--attacks", default="badnets,blend,sig,iab,trojan")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--poison-rate", type=float, default=0.1)
    p.add_argument("--model", default="cnn")
    a = p.parse_args()
    from safetensors.torch import load_file

    splits = ab.load_dataset("cifar10-mini")
    lines = ["| attack | class | ours: smaller cluster's share / flagged at 35 % | ART: share / flagged | "
             "smaller clusters agree (Jaccard) | poison in class |", "|---|---|---|---|---|---|"]
    spec = ["| attack | Spearman(ours, ART) | Spearman(ours, ART on centred activations) | AUC ours | "
            "AUC ART (uncentred, not squared) | top-15 % overlap |",
            "|---|---|---|---|---|---|"]
    for attack_name in a.attacks.split(","):
        work = Path(a.runs) / f"{attack_name}-t{a.target}-s{a.seed}"
        if not (work / "suspect.safetensors").exists():
            print(f"{attack_name}: no suspect model in {work}; run bench_detectors.py first")
            continue
        poisoned = ab.get_attack(attack_name).poison(splits.train, a.poison_rate, a.target, ab.seeded(a.seed))
        data, mask = poisoned.data, poisoned.poison_mask.numpy()
        model = ab.model_factory(a.model, data)()
        model.load_state_dict(load_file(str(work / "suspect.safetensors")))
        feats = penultimate_features(model, data.x).double().numpy()
        y = data.y.numpy()
        ours = np.zeros(len(y), dtype=bool)  # our smaller cluster of every class
        ours_share = {}
        for c in range(data.num_classes):
            flagged, _, facts = cluster_class(feats[y == c], 10, "ica", 0.5 + 1e-9, a.seed)
            ours[y == c] = flagged
            ours_share[c] = facts["small_share"]
        theirs, theirs_share = art_activation_clustering(feats, y, data.num_classes, a.seed)
        agree = 0
        for c in range(data.num_classes):
            o, t = ours[y == c], theirs[y == c]
            union = (o | t).sum()
            jac = 1.0 if union == 0 else (o & t).sum() / union
            fo, ft = ours_share[c] < 0.35, theirs_share[c] < 0.35
            agree += int(fo == ft)
            lines.append(f"| {attack_name} | {c} | {ours_share[c]:.2f} / {'yes' if fo else 'no'} | "
                         f"{theirs_share[c]:.2f} / {'yes' if ft else 'no'} | {jac:.2f} | {int(mask[y == c].sum())} |")
        print(f"{attack_name}: the 35 % decision agrees in {agree}/{data.num_classes} classes", flush=True)
        # spectral signatures
        from art.defences.detector.poison.spectral_signature_defense import SpectralSignatureDefense
        from scipy.stats import spearmanr

        s_ours = np.zeros(len(y))
        s_art = np.zeros(len(y))
        rhos, rhos_c = [], []
        overlap = []
        for c in range(data.num_classes):
            idx = np.flatnonzero(y == c)
            s_ours[idx] = spectral_scores(torch.from_numpy(feats[idx])).numpy()
            s_art[idx] = SpectralSignatureDefense.spectral_signature_scores(feats[idx]).ravel()
            rhos.append(spearmanr(s_ours[idx], s_art[idx]).statistic)
            # ART projects the *uncentred* activations on the top singular vector of the centred ones (and takes
            # |.|, not the square): given the centred activations, its score must rank exactly as ours
            centred = feats[idx] - feats[idx].mean(axis=0, keepdims=True)
            rhos_c.append(spearmanr(s_ours[idx], SpectralSignatureDefense.spectral_signature_scores(centred).ravel())
                          .statistic)
            k = int(np.ceil(0.15 * idx.size))
            top_o = set(idx[np.argsort(-s_ours[idx], kind="stable")[:k]])
            top_a = set(idx[np.argsort(-s_art[idx], kind="stable")[:k]])
            overlap.append(len(top_o & top_a) / k)
        tm = torch.from_numpy(mask)
        spec.append(f"| {attack_name} | {np.mean(rhos):.3f} (min {np.min(rhos):.3f}) | "
                    f"{np.mean(rhos_c):.4f} (min {np.min(rhos_c):.4f}) | "
                    f"{roc_auc(torch.from_numpy(s_ours), tm):.3f} | {roc_auc(torch.from_numpy(s_art), tm):.3f} | "
                    f"{np.mean(overlap):.2f} |")
    text = ("Activation clustering, ours vs ART (same activations):\n\n" + "\n".join(lines)
            + "\n\nSpectral signatures, ours (centred, squared: Tran et al.) vs ART's score:\n\n"
            + "\n".join(spec) + "\n")
    print(text)
    (Path(a.runs) / f"crosscheck_art_t{a.target}.md").write_text(text)


if __name__ == "__main__":
    main()
