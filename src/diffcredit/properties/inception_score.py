"""Inception Score, IS = exp(E_x KL(p(y|x) || p(y))), with the reference classifier in place of Inception.

Confident and varied predictions score high: at most the number of classes, and 1 when every image gets the same
class distribution. Computed over the whole set (no splits): with a few hundred samples, splits only add noise.

Yardstick: the classifier, which must be fitted on trusted labelled images (the reference's labels, or its k-means
pseudo-labels); off-distribution images that it labels confidently score high.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from diffcredit.properties.features import DigitClassifier, predict_log_probs


def inception_score(log_probs: np.ndarray) -> float:
    """IS of class log-probabilities [N, K] (rows are log p(y|x))."""
    log_marginal = logsumexp(log_probs, axis=0) - np.log(len(log_probs))  # log p(y)
    kl = np.sum(np.exp(log_probs) * (log_probs - log_marginal), axis=1)
    return float(np.exp(kl.mean()))


class InceptionScore:
    """IS of generated images under the reference classifier (higher is better)."""

    name = "inception_score"
    higher_is_better = True

    def __init__(self, classifier: DigitClassifier) -> None:
        self.classifier = classifier

    def __call__(self, images: np.ndarray) -> float:
        return inception_score(predict_log_probs(self.classifier, images))
