"""Global properties of generated images, scored against a cached reference: FID, KID, IS, diversity, aesthetic.

`prepare_reference` fits the feature extractor once (or takes a local TorchScript one) and caches the reference
statistics in a folder; `load_property` turns that folder into a callable `Property`. Each property says whether higher
is better, and `oriented` turns its value into a utility where higher is always better (e.g. -FID).
"""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn

from diffcredit.properties.aesthetic import AestheticScore, load_predictor
from diffcredit.properties.diversity import Diversity
from diffcredit.properties.features import (
    DigitClassifier,
    extract_features,
    load_classifier,
    load_module,
    module_device,
    predict_log_probs,
    save_classifier,
    train_classifier,
)
from diffcredit.io import write_atomic, write_json
from diffcredit.properties.fid import FID, KID, feature_stats
from diffcredit.properties.inception_score import InceptionScore
from diffcredit.seeds import derive_seed

CLASSIFIER_FILE, STATS_FILE, INFO_FILE = "classifier.safetensors", "reference.npz", "reference.json"


@runtime_checkable
class Property(Protocol):
    """A score of a set of generated images [N, C, H, W] in [-1, 1]."""

    name: str
    higher_is_better: bool

    def __call__(self, images: np.ndarray) -> float: ...


def oriented(value: float, higher_is_better: bool) -> float:
    """The utility of a property value: the value itself if higher is better, else its negation."""
    return float(value) if higher_is_better else -float(value)


def prepare_reference(
    out_dir: str | Path,
    *,
    train_images: np.ndarray,
    train_labels: np.ndarray | None,
    reference_images: np.ndarray,
    seed: int,
    feature_dim: int = 64,
    classifier_steps: int = 1500,
    n_clusters: int = 20,
    extractor: str | Path | None = None,
    reference_labels: np.ndarray | None = None,
) -> None:
    """Fit (or copy) the feature extractor and cache the reference set's features, mean, covariance and clusters.

    Without `extractor`, a `DigitClassifier` is trained on the labelled training images (seeded, seconds on a CPU);
    with it, the local TorchScript (.pt) or torch.export (.pt2) file is copied in and used as is. Writes
    `classifier.safetensors` (+ `.json`) or `extractor.pt[2]`, `reference.npz` and `reference.json` (with the
    classifier's accuracy on the reference set when `reference_labels` are given), each atomically.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"seed": int(seed), "n_reference": int(len(reference_images))}
    model: nn.Module
    if extractor is not None:
        model = load_module(extractor)
        info["extractor"] = f"extractor{Path(extractor).suffix}"  # the suffix tells TorchScript from torch.export
        write_atomic(out / info["extractor"], lambda tmp: shutil.copyfile(extractor, tmp))
    elif train_labels is None:
        raise ValueError(
            "the training images have no labels, so no digit classifier can be trained: "
            "pass extractor=<local TorchScript file mapping images to features>"
        )
    else:
        model = train_classifier(
            train_images, train_labels, seed=derive_seed(seed, "classifier"), steps=classifier_steps,
            feature_dim=feature_dim,
        )
        save_classifier(model, out / CLASSIFIER_FILE)
        info.update(extractor="classifier", classifier_steps=int(classifier_steps))
        if reference_labels is not None:
            predicted = predict_log_probs(model, reference_images).argmax(axis=1)
            info["reference_accuracy"] = float(np.mean(predicted == np.asarray(reference_labels)))
    feats = extract_features(model, reference_images)
    mu, sigma = feature_stats(feats)
    if not 1 <= n_clusters <= len(feats):
        raise ValueError(f"n_clusters={n_clusters}: choose 1..{len(feats)} (the number of reference images)")
    kmeans = KMeans(n_clusters, n_init=10, random_state=derive_seed(seed, "clusters")).fit(feats)
    info.update(feature_dim=int(feats.shape[1]), n_clusters=int(n_clusters))
    write_atomic(
        out / STATS_FILE,
        lambda tmp: np.savez(tmp, features=feats, mu=mu, sigma=sigma, centres=kmeans.cluster_centers_),
    )
    write_json(out / INFO_FILE, info)


@dataclass(frozen=True)
class Reference:
    """A prepared reference folder in memory: the extractor and the cached statistics."""

    extractor: nn.Module
    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    centres: np.ndarray

    @classmethod
    def load(cls, reference_dir: str | Path, device: str | torch.device = "cpu") -> Reference:
        folder = Path(reference_dir)
        if not (folder / INFO_FILE).is_file() or not (folder / STATS_FILE).is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} is not a prepared reference folder (no {INFO_FILE} / {STATS_FILE}): "
                "run prepare_reference (the workflow's `reference` rule) first"
            )
        info = json.loads((folder / INFO_FILE).read_text())
        if info["extractor"] == "classifier":
            extractor = load_classifier(folder / CLASSIFIER_FILE, device)
        else:
            extractor = load_module(folder / info["extractor"], device)
        with np.load(folder / STATS_FILE) as stats:
            arrays = {key: stats[key] for key in ("features", "mu", "sigma", "centres")}
        return cls(extractor=extractor, **arrays)


def load_property(name: str, reference_dir: str | Path, *, device: str | torch.device = "cpu", **options) -> Property:
    """The property `name` scored against the reference folder made by `prepare_reference`.

    Options: kid: seed, num_subsets, max_subset_size; diversity: bins ("auto", "classes" or "clusters");
    aesthetic: predictor (a local file, required), quantile (0.9).
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown property {name!r}: choose one of {', '.join(PROPERTY_NAMES)}")
    factory = _FACTORIES[name]
    accepted = list(inspect.signature(factory).parameters)[1:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for property {name!r}: accepted are {accepted or 'none'}")
    return factory(Reference.load(reference_dir, device), **options)


def _fid(reference: Reference) -> FID:
    return FID(reference.extractor, reference.mu, reference.sigma)


def _kid(
    reference: Reference, *, seed: int = 0, num_subsets: int = 100,
    max_subset_size: int = 1000,
) -> KID:
    return KID(
        reference.extractor, reference.features, seed=seed, num_subsets=num_subsets, max_subset_size=max_subset_size
    )


def _inception_score(reference: Reference) -> InceptionScore:
    if not isinstance(reference.extractor, DigitClassifier):
        raise ValueError(
            "inception_score needs class probabilities, which only the trained digit classifier gives: "
            "prepare the reference with labels (no extractor), or use fid, kid or diversity"
        )
    return InceptionScore(reference.extractor)


def _diversity(reference: Reference, *, bins: str = "auto") -> Diversity:
    if bins not in ("auto", "classes", "clusters"):
        raise ValueError(f"bins={bins!r}: choose 'auto', 'classes' (classifier predictions) or 'clusters' (k-means)")
    use_classes = bins == "classes" or (bins == "auto" and isinstance(reference.extractor, DigitClassifier))
    return Diversity(reference.extractor, None if use_classes else reference.centres)


def _aesthetic(
    reference: Reference, *, predictor: str | Path | None = None, quantile: float = 0.9
) -> AestheticScore:
    if predictor is None:
        raise ValueError("the aesthetic property needs predictor=<local TorchScript or safetensors file>")
    return AestheticScore(reference.extractor, load_predictor(predictor, module_device(reference.extractor)), quantile)


_FACTORIES = {
    "fid": _fid,
    "kid": _kid,
    "inception_score": _inception_score,
    "diversity": _diversity,
    "aesthetic": _aesthetic,
}
PROPERTY_NAMES = tuple(_FACTORIES)
