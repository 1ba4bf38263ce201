"""Precision, recall, density and coverage of generated images against the reference, on k-NN manifolds.

FID mixes sample quality with coverage of the reference: a model that draws one digit class well can score worse than
one that draws noise. These four scores separate the two, in the reference extractor's feature space:

- precision (Kynkäänniemi et al. 2019): share of generated images inside the reference manifold, the union of balls
  around each reference feature with radius its distance to its k-th nearest reference neighbour. Quality.
- recall (same paper): share of reference images inside the generated manifold (balls around generated features).
  Coverage, but one outlying generated image with a large ball covers much of the reference.
- density (Naeem et al. 2020): how many reference balls contain a generated image, averaged and divided by k; about 1
  for samples from the reference distribution, above 1 where samples crowd dense regions. Quality, robust to outliers.
- coverage (same paper): share of reference images whose ball contains at least one generated image. Coverage that
  outliers cannot inflate, because the balls are the reference's own.

A ball is closed (distance <= radius), as in Kynkäänniemi et al.; Naeem et al.'s code uses `<`, which differs only on
ties (e.g. exact copies of reference images). Memory is one [reference x generated] distance matrix.

Yardstick: the reference features, so a trusted reference (`data.reference`) whose extractor no contributor shaped.
Pay by coverage, with density as the harm check: on the marketplace they give the planted answer, precision and
recall do not (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist
from torch import nn

from diffcredit.properties.features import extract_features

SCORES = ("precision", "recall", "density", "coverage")


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance of each feature [N, d] to its k-th nearest other feature (the radius of its ball)."""
    if not 1 <= k < len(features):
        raise ValueError(f"k={k} nearest neighbours need more than k points, got {len(features)}: lower k")
    distances = cdist(features, features)
    return np.partition(distances, k, axis=1)[:, k]  # column 0 is each point's distance to itself


def manifold_scores(
    reference: np.ndarray, generated: np.ndarray, k: int, reference_radii: np.ndarray | None = None
) -> dict[str, float]:
    """All four scores of generated features [M, d] against reference features [N, d] with k neighbours."""
    radii = knn_radii(reference, k) if reference_radii is None else reference_radii
    distances = cdist(reference, generated)  # [N, M]
    inside_reference = distances <= radii[:, None]  # generated j inside the ball of reference i
    inside_generated = distances <= knn_radii(generated, k)[None, :]
    return {
        "precision": float(inside_reference.any(axis=0).mean()),
        "recall": float(inside_generated.any(axis=1).mean()),
        "density": float(inside_reference.sum(axis=0).mean() / k),
        "coverage": float((distances.min(axis=1) <= radii).mean()),
    }


class ManifoldScore:
    """One of precision, recall, density, coverage of generated images against the reference (higher is better)."""

    higher_is_better = True

    def __init__(self, name: str, extractor: nn.Module, reference_features: np.ndarray, k: int = 5) -> None:
        if name not in SCORES:
            raise ValueError(f"unknown manifold score {name!r}: choose one of {', '.join(SCORES)}")
        self.name, self.extractor, self.reference_features, self.k = name, extractor, reference_features, k
        self.reference_radii = knn_radii(reference_features, k)  # once per property, not per coalition

    def __call__(self, images: np.ndarray) -> float:
        generated = extract_features(self.extractor, images)
        return manifold_scores(self.reference_features, generated, self.k, self.reference_radii)[self.name]
