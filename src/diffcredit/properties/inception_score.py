"""Inception Score, IS = exp(E_x KL(p(y|x) || p(y))), under a classifier of the generated images.

Confident and varied predictions score high: at most the number of classes, and 1 when every image gets the same
class distribution. Computed over the whole set (no splits): with a few hundred samples, splits only add noise.

The classifier is the paper's Inception network where one is staged (``utility.property_options.classifier``: a local
TorchScript or torch.export file mapping images ``[N, C, H, W]`` in ``[-1, 1]`` to class logits ``[N, K]``, resizing
inside, e.g. torchvision's Inception-v3 exported on a machine with the weights), else the reference's digit classifier.

Yardstick: the classifier, which must be fitted on trusted labelled images (ImageNet for Inception; the reference's
labels, or its k-means pseudo-labels, for the digit classifier); off-distribution images that it labels confidently
score high.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp
from torch import nn

from diffcredit.properties.features import load_module, predict_log_probs


def inception_score(log_probs: np.ndarray) -> float:
    """IS of class log-probabilities [N, K] (rows are log p(y|x))."""
    log_marginal = logsumexp(log_probs, axis=0) - np.log(len(log_probs))  # log p(y)
    kl = np.sum(np.exp(log_probs) * (log_probs - log_marginal), axis=1)
    return float(np.exp(kl.mean()))


class InceptionScore:
    """IS of generated images under ``classifier`` (a module mapping images to class logits; higher is better)."""

    name = "inception_score"
    higher_is_better = True

    def __init__(self, classifier: nn.Module) -> None:
        self.classifier = classifier

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> InceptionScore:
        """The IS under a staged classifier file (TorchScript ``.pt`` or torch.export ``.pt2``)."""
        return cls(_Logits(load_module(path, device, role="Inception Score classifier")))

    def __call__(self, images: np.ndarray) -> float:
        return inception_score(predict_log_probs(self.classifier, images))


class _Logits(nn.Module):
    """A staged classifier whose outputs are checked to be class logits, so that a feature extractor staged by
    mistake is named instead of scored."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.module(x)
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(
                f"the Inception Score classifier returned shape {tuple(logits.shape)}: it must map images to class "
                "logits [N, K >= 2]"
            )
        return logits
