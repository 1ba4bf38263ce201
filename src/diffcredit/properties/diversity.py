"""Diversity: the log2-entropy of the proportions of generated images per class or per cluster.

With a classifier (digits) the bins can be its predicted classes. Otherwise they are clusters of the reference
embeddings (20 by default, as in the paper's CelebA-HQ use case), cut the paper's way (Lu et al., ICLR 2025,
`diversity_score.py`): dissimilarity = max(sim) − sim of the embeddings' dot products, Ward linkage on it, cut into k
clusters; a generated image goes to the cluster of smallest mean dissimilarity to its members. Since that mean is
max(sim) − g·c̄ for the cluster's mean embedding c̄, the image goes to the cluster mean with the largest dot product,
which is what `assign_ward` computes without the [generated × reference] matrix. k-means clusters with nearest-centre
assignment are the option (`clustering="kmeans"`).
Ranges from 0 (one bin) to log2(number of bins) (all bins equally used).

Yardstick: the bins come from the reference (its clusters, or a classifier fitted on its labels), so they need a
trusted reference like FID. Diversity rewards spread, not realism: noise spread over the bins scores high, so pay by
coverage (`precision_recall`) rather than by diversity.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import fcluster, ward
from scipy.spatial.distance import squareform
from scipy.stats import entropy
from sklearn.metrics import pairwise_distances_argmin
from torch import nn

from diffcredit.properties.features import DigitClassifier, extract_features, predict_log_probs

CLUSTERINGS = ("ward", "kmeans")


def proportion_entropy(assignments: np.ndarray, n_bins: int) -> float:
    """log2-entropy of how the integer `assignments` (each in 0..n_bins-1) spread over the bins."""
    assignments = np.asarray(assignments)
    if assignments.size == 0 or assignments.min() < 0 or assignments.max() >= n_bins:
        raise ValueError(f"assignments must be a non-empty array of bins 0..{n_bins - 1}, got {assignments[:10]}")
    return float(entropy(np.bincount(assignments, minlength=n_bins), base=2))


def ward_clusters(features: np.ndarray, n_clusters: int) -> np.ndarray:
    """Cluster labels 0..k-1 of the reference `features` [N, D]: Ward linkage on max(sim) − sim, cut into at most
    `n_clusters` clusters (fewer only when the dissimilarities tie)."""
    if not 1 <= n_clusters <= len(features):
        raise ValueError(f"n_clusters={n_clusters}: choose 1..{len(features)} (the number of reference images)")
    features = np.asarray(features, dtype=np.float64)
    similarity = features @ features.T
    dissimilarity = similarity.max() - similarity
    dissimilarity = (dissimilarity + dissimilarity.T) / 2  # the product's rounding is not exactly symmetric
    np.fill_diagonal(dissimilarity, 0.0)
    labels = fcluster(ward(squareform(dissimilarity, checks=False)), n_clusters, criterion="maxclust")
    return np.unique(labels, return_inverse=True)[1]


def cluster_means(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The mean embedding [k, D] of each cluster 0..k-1."""
    return np.stack([features[labels == k].mean(axis=0) for k in range(labels.max() + 1)])


def assign_ward(features: np.ndarray, means: np.ndarray) -> np.ndarray:
    """The cluster of smallest mean dissimilarity to its reference members: the mean with the largest dot product."""
    return np.argmax(np.asarray(features, dtype=np.float64) @ np.asarray(means, dtype=np.float64).T, axis=1)


class Diversity:
    """Entropy (bits) of the class or cluster proportions of generated images (higher is better).

    Without `centres` the extractor must be a `DigitClassifier` and the bins are its classes. With `centres`, they
    are Ward cluster means (`clustering="ward"`, assignment by `assign_ward`) or k-means centres (`"kmeans"`, nearest
    centre).
    """

    name = "diversity"
    higher_is_better = True

    def __init__(self, extractor: nn.Module, centres: np.ndarray | None = None, clustering: str = "ward") -> None:
        if centres is None and not isinstance(extractor, DigitClassifier):
            raise ValueError("class diversity needs the digit classifier: with a custom extractor, use clusters")
        if clustering not in CLUSTERINGS:
            raise ValueError(f"clustering={clustering!r}: choose 'ward' (the paper's) or 'kmeans'")
        self.extractor, self.centres, self.clustering = extractor, centres, clustering

    def __call__(self, images: np.ndarray) -> float:
        if self.centres is None:
            classes = predict_log_probs(self.extractor, images).argmax(axis=1)
            return proportion_entropy(classes, self.extractor.config.num_classes)
        features = extract_features(self.extractor, images)
        if self.clustering == "ward":
            clusters = assign_ward(features, self.centres)
        else:
            clusters = pairwise_distances_argmin(features, self.centres)
        return proportion_entropy(clusters, len(self.centres))
