"""Diversity: the log2-entropy of the proportions of generated images per class or per cluster.

With a classifier (digits) the bins are its predicted classes. Otherwise they are k-means clusters of the reference
embeddings (20 by default, as in the paper's CelebA-HQ use case) and each image goes to its nearest centre.
Ranges from 0 (one bin) to log2(number of bins) (all bins equally used).

Yardstick: the bins come from the reference (its clusters, or a classifier fitted on its labels), so they need a
trusted reference like FID. Diversity rewards spread, not realism: noise spread over the bins scores high, so pay by
coverage (`precision_recall`) rather than by diversity.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import entropy
from sklearn.metrics import pairwise_distances_argmin
from torch import nn

from diffcredit.properties.features import DigitClassifier, extract_features, predict_log_probs


def proportion_entropy(assignments: np.ndarray, n_bins: int) -> float:
    """log2-entropy of how the integer `assignments` (each in 0..n_bins-1) spread over the bins."""
    assignments = np.asarray(assignments)
    if assignments.size == 0 or assignments.min() < 0 or assignments.max() >= n_bins:
        raise ValueError(f"assignments must be a non-empty array of bins 0..{n_bins - 1}, got {assignments[:10]}")
    return float(entropy(np.bincount(assignments, minlength=n_bins), base=2))


class Diversity:
    """Entropy (bits) of the class or cluster proportions of generated images (higher is better).

    Without `centres` the extractor must be a `DigitClassifier` and the bins are its classes.
    """

    name = "diversity"
    higher_is_better = True

    def __init__(self, extractor: nn.Module, centres: np.ndarray | None = None) -> None:
        if centres is None and not isinstance(extractor, DigitClassifier):
            raise ValueError("class diversity needs the digit classifier: with a custom extractor, use clusters")
        self.extractor, self.centres = extractor, centres

    def __call__(self, images: np.ndarray) -> float:
        if self.centres is None:
            classes = predict_log_probs(self.extractor, images).argmax(axis=1)
            return proportion_entropy(classes, self.extractor.config.num_classes)
        clusters = pairwise_distances_argmin(extract_features(self.extractor, images), self.centres)
        return proportion_entropy(clusters, len(self.centres))
