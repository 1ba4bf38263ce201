"""FID and KID of generated images against cached reference features, with clean-fid's statistics.

clean-fid's `compute_fid(..., custom_feat_extractor=...)` reads image files and resizes them to 299x299 before calling
the extractor, which suits Inception but not an 8x8 digit classifier, and its defaults fetch Inception weights. So the
features are computed here, in memory, by our extractor, and handed to clean-fid's `frechet_distance` and
`kernel_distance`: the same statistics, no files, no resize, nothing that could download.

Yardstick: both need reference images of the distribution the buyer wants and an extractor fitted on them (or a
trusted local one): `data.reference`. Against the contributors' held-out items a contributor moves its own ruler.
Both mix quality with coverage: one well-drawn class scores worse than a spread of garbage (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
from cleanfid.fid import frechet_distance, kernel_distance
from torch import nn

from diffcredit.properties.features import extract_features


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features [N, d], as clean-fid computes them."""
    if feats.shape[0] < 2:
        raise ValueError(
            f"{feats.shape[0]} image(s): FID and KID need at least 2 (use a few hundred for stable values)"
        )
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def fid_from_stats(mu: np.ndarray, sigma: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """Fréchet distance between two Gaussians (clean-fid's stable version, its console notes silenced)."""
    if mu.shape != mu_ref.shape:
        raise ValueError(f"features have {mu.shape[0]} dimensions but the reference has {mu_ref.shape[0]}")
    # clean-fid prints when it regularises a singular product and passes scipy a deprecated argument: keep logs clean
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The `disp` argument is deprecated", DeprecationWarning)
        distance = float(frechet_distance(mu, sigma, mu_ref, sigma_ref))
    return max(distance, 0.0)  # a squared distance; round-off can leave it a hair below zero


class FID:
    """Fréchet distance between the features of generated images and the reference set (lower is better)."""

    name = "fid"
    higher_is_better = False

    def __init__(self, extractor: nn.Module, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> None:
        self.extractor, self.mu_ref, self.sigma_ref = extractor, mu_ref, sigma_ref

    def __call__(self, images: np.ndarray) -> float:
        return fid_from_stats(*feature_stats(extract_features(self.extractor, images)), self.mu_ref, self.sigma_ref)


class KID:
    """Kernel Inception Distance (cubic polynomial kernel MMD², clean-fid) to the reference features (lower is better).

    clean-fid draws its subsets from numpy's global RNG; it is seeded here and restored afterwards, so the same images
    always get the same KID and no other random stream is disturbed.
    """

    name = "kid"
    higher_is_better = False

    def __init__(
        self,
        extractor: nn.Module,
        reference_features: np.ndarray,
        *,
        seed: int = 0,
        num_subsets: int = 100,
        max_subset_size: int = 1000,
    ) -> None:
        self.extractor, self.reference_features = extractor, reference_features
        self.seed, self.num_subsets, self.max_subset_size = seed, num_subsets, max_subset_size

    def __call__(self, images: np.ndarray) -> float:
        feats = extract_features(self.extractor, images)
        feature_stats(feats)  # the same size check as FID
        with _seeded_global_numpy(self.seed):
            return kernel_distance(self.reference_features, feats, self.num_subsets, self.max_subset_size)


@contextlib.contextmanager
def _seeded_global_numpy(seed: int) -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
