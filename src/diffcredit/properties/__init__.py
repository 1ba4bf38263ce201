"""Global properties of generated images, scored against a cached reference.

`prepare_reference` fits the feature extractor once (or takes a local TorchScript one) and caches the reference
statistics in a folder; `load_property` turns that folder into a callable `Property`. Each property says whether higher
is better, and `oriented` turns its value into a utility where higher is always better (e.g. -FID).

What each property needs, and whether a contributor can move it (the yardstick is the reference folder: its images and
the extractor that embeds them; with a trusted reference neither depends on any contributor):

- fid, kid: distances to the reference images' features. Need a reference of the distribution the buyer wants.
  They mix quality with coverage (one well-drawn class can score worse than noise).
- precision, recall, density, coverage: k-NN manifolds of the reference features (`precision_recall`). Need the same
  reference. Precision and density reward realistic samples, recall and coverage varied ones; coverage is the one to
  pay by (only samples near reference images count, and outliers cannot inflate it).
- diversity: entropy over the extractor's classes or the reference's clusters (Ward, the paper's; or k-means). Needs
  the reference (clusters) or a classifier trained on it (classes); it rewards spread, not realism, so noise spread
  over bins scores well.
- inception_score: needs a classifier trained on the reference's labels (or its pseudo-labels). Rewards confident,
  varied predictions; fooled by adversarial or off-distribution images that the classifier labels confidently.
- aesthetic: a predictor head on the extractor's features; needs no reference images, only a trusted predictor file.

A reference folder says which yardstick it is in `reference.json` (`yardstick`: "trusted reference" or "contributors'
held-out items"); `reference_provenance` reads it for reports and bundles.
"""

from __future__ import annotations

import hashlib
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

from diffcredit.contributors import HELDOUT, TRUSTED, UNTRUSTED_NOTE, image_digests
from diffcredit.io import write_atomic, write_json
from diffcredit.properties.aesthetic import AestheticScore, load_predictor
from diffcredit.properties.diversity import Diversity, cluster_means, ward_clusters
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
from diffcredit.properties.fid import FID, KID, feature_stats
from diffcredit.properties.inception_score import InceptionScore
from diffcredit.properties.precision_recall import SCORES, ManifoldScore
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
    reference_images: np.ndarray,
    seed: int,
    train_images: np.ndarray | None = None,
    train_labels: np.ndarray | None = None,
    reference_labels: np.ndarray | None = None,
    trusted: bool = False,
    source: dict | None = None,
    fit_fraction: float = 0.5,
    feature_dim: int = 64,
    classifier_steps: int = 1500,
    n_clusters: int = 20,
    extractor: str | Path | None = None,
) -> None:
    """Fit (or copy) the feature extractor and cache the reference set's features, mean, covariance and clusters.

    With `extractor`, the local TorchScript (.pt) or torch.export (.pt2) file is copied in and used as is. Otherwise a
    `DigitClassifier` is trained (seeded, seconds on a CPU):

    - `trusted` (the buyer's own reference): on the reference images alone, with `reference_labels`, or without
      labels on k-means pseudo-labels (`n_clusters` clusters of the reference pixels, one round of DeepCluster), so
      that no contributor's items or labels shape the extractor. `train_images` must then be None. A share
      `fit_fraction` of the reference (stratified by label) fits the classifier and the rest gives the statistics:
      features of the images a classifier was fitted on cluster tighter than those of any unseen image, which would
      put generated images outside the k-NN balls (on the marketplace's digits, unseen real digits got precision
      0.45 and density 0.26 against a reference the classifier was fitted on, 0.96 and 1.04 with the split).
    - otherwise (the contributors' held-out split): on the labelled training images, as before; the reference folder
      then records that the contributors shape their own yardstick.

    Writes `classifier.safetensors` (+ `.json`) or `extractor.pt[2]`, `reference.npz` and `reference.json` (the
    yardstick, what the extractor was trained on, a digest of the reference images, `source`, and the classifier's
    accuracy on held-out reference labels where there are any), each atomically.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if trusted and train_images is not None:
        raise ValueError(
            "a trusted reference's extractor is fitted on the reference alone: do not pass train_images "
            "(the contributors' items)"
        )
    if len(reference_images) == 0:
        raise ValueError("the reference has no images: name at least a few hundred images of the wanted distribution")
    info: dict = {
        "seed": int(seed),
        "n_reference": len(reference_images),
        "yardstick": TRUSTED if trusted else HELDOUT,
        "reference_digest": _digest(reference_images),
        "source": source,
    }
    model: nn.Module
    if extractor is not None:
        model = load_module(extractor)
        info["extractor"] = f"extractor{Path(extractor).suffix}"  # the suffix tells TorchScript from torch.export
        info["extractor_fit"] = f"a local file ({Path(extractor).name})"
        write_atomic(out / info["extractor"], lambda tmp: shutil.copyfile(extractor, tmp))
    else:
        if trusted:
            fit = "reference images and labels"
            labels = reference_labels
            if labels is None:
                labels = _pseudo_labels(reference_images, n_clusters, seed=derive_seed(seed, "pseudo-labels"))
                fit = f"reference images, k-means pseudo-labels ({n_clusters} clusters)"
            fitting = _stratified_share(labels, fit_fraction, seed=derive_seed(seed, "reference-fit-split"))
            fit_images, fit_labels = reference_images[fitting], labels[fitting]
            reference_images = reference_images[~fitting]
            fit = f"{fitting.sum()} {fit}, disjoint from the {len(reference_images)} images of the statistics"
            info.update(n_reference=len(reference_images), n_fit=int(fitting.sum()))
        elif train_labels is None:
            raise ValueError(
                "the training images have no labels, so no digit classifier can be trained: "
                "pass extractor=<local TorchScript file mapping images to features>, or a trusted reference"
            )
        else:
            fit_images, fit_labels, fit = train_images, train_labels, "contributors' training items and labels"
        model = train_classifier(
            fit_images,
            fit_labels,
            seed=derive_seed(seed, "classifier"),
            steps=classifier_steps,
            feature_dim=feature_dim,
        )
        save_classifier(model, out / CLASSIFIER_FILE)
        info.update(extractor="classifier", extractor_fit=fit, classifier_steps=int(classifier_steps))
        if reference_labels is not None and not trusted:  # on a trusted reference this would be training accuracy
            predicted = predict_log_probs(model, reference_images).argmax(axis=1)
            info["reference_accuracy"] = float(np.mean(predicted == np.asarray(reference_labels)))
    feats = extract_features(model, reference_images)
    mu, sigma = feature_stats(feats)
    ward_means = cluster_means(feats, ward_clusters(feats, n_clusters))  # checks n_clusters against the reference
    kmeans = KMeans(n_clusters, n_init=10, random_state=derive_seed(seed, "clusters")).fit(feats)
    info.update(feature_dim=int(feats.shape[1]), n_clusters=int(n_clusters), n_ward_clusters=len(ward_means))
    write_atomic(
        out / STATS_FILE,
        lambda tmp: np.savez(
            tmp, features=feats, mu=mu, sigma=sigma, centres=kmeans.cluster_centers_, ward_means=ward_means
        ),
    )
    write_json(out / INFO_FILE, info)


def reference_provenance(reference_dir: str | Path) -> dict:
    """Which yardstick a prepared reference is, for bundle metadata and reports.

    Returns `yardstick`, `trusted`, `extractor_fit`, `n_reference`, `reference_digest`, `source` (the config's
    ``data.reference``: {source, path, manifest}; None for the held-out split) and `statement`, a sentence to show
    beside the values that names the reference (source, path, digest) or warns that the contributors shape their own
    yardstick.
    """
    info_file = Path(reference_dir) / INFO_FILE
    if not info_file.is_file():
        raise FileNotFoundError(
            f"{str(info_file)!r} does not exist: give the run's prepared reference folder (results/<name>/reference)"
        )
    info = json.loads(info_file.read_text())
    trusted = info["yardstick"] == TRUSTED
    images = f"{info['n_reference']} images (digest {info['reference_digest'][:12]})"
    if trusted:
        source = info["source"] or {}
        named = ", ".join(f"{key} {source[key]}" for key in ("source", "path", "manifest") if source.get(key))
        statement = (
            f"Properties are measured against a trusted reference that no contributor supplied: {images}, "
            f"data.reference = {named or 'not recorded'}; the feature extractor was fitted on {info['extractor_fit']}."
        )
    else:
        statement = f"Warning: {UNTRUSTED_NOTE}. Reference: {images} held out from the contributors' items."
    keys = ("yardstick", "extractor_fit", "n_reference", "reference_digest", "source")
    return {**{key: info[key] for key in keys}, "trusted": trusted, "statement": statement}


def _pseudo_labels(images: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    if not 2 <= n_clusters <= len(images):
        raise ValueError(f"n_clusters={n_clusters}: pseudo-labels need 2..{len(images)} clusters (the reference size)")
    pixels = images.reshape(len(images), -1)
    return KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(pixels).astype(np.int64)


def _stratified_share(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A mask picking round(fraction * n) items of each label (at least one, never all)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fit_fraction={fraction}: choose a share in (0, 1) of the reference to fit the extractor")
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        (members,) = np.nonzero(labels == label)
        if len(members) < 2:
            raise ValueError(f"reference label {label} has {len(members)} image: give each label at least 2")
        n_fit = min(max(round(fraction * len(members)), 1), len(members) - 1)
        chosen[rng.choice(members, size=n_fit, replace=False)] = True
    return chosen


def _digest(images: np.ndarray) -> str:
    """One SHA-256 of the reference images (in order): the same images give the same yardstick id."""
    return hashlib.sha256("".join(image_digests(images)).encode()).hexdigest()


@dataclass(frozen=True)
class Reference:
    """A prepared reference folder in memory: the extractor and the cached statistics."""

    extractor: nn.Module
    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    centres: np.ndarray  # k-means
    ward_means: np.ndarray  # the mean embedding of each Ward cluster

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
            if "ward_means" not in stats:
                raise ValueError(
                    f"{str(folder)!r} was prepared by an older DiffCredit (no Ward clusters): delete it and rerun "
                    "the `reference` rule"
                )
            arrays = {key: stats[key] for key in ("features", "mu", "sigma", "centres", "ward_means")}
        return cls(extractor=extractor, **arrays)


def load_property(name: str, reference_dir: str | Path, *, device: str | torch.device = "cpu", **options) -> Property:
    """The property `name` scored against the reference folder made by `prepare_reference`.

    Options: kid: seed, num_subsets, max_subset_size; inception_score: classifier (a local TorchScript or
    torch.export file giving class logits; default: the reference's digit classifier); diversity: bins ("auto",
    "classes" or "clusters") and clustering ("ward", the paper's, or "kmeans");
    aesthetic: predictor (a local file, required), quantile (0.9); precision, recall, density, coverage: k (5).
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
    reference: Reference,
    *,
    seed: int = 0,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
) -> KID:
    return KID(
        reference.extractor, reference.features, seed=seed, num_subsets=num_subsets, max_subset_size=max_subset_size
    )


def _inception_score(reference: Reference, *, classifier: str | Path | None = None) -> InceptionScore:
    if classifier is not None:  # a staged classifier (the paper's Inception), independent of the reference
        return InceptionScore.from_file(classifier, module_device(reference.extractor))
    if not isinstance(reference.extractor, DigitClassifier):
        raise ValueError(
            "inception_score needs class probabilities, which a local feature extractor does not give: stage a "
            "classifier of the images (utility.property_options.classifier: a TorchScript file mapping images to "
            "class logits, e.g. Inception-v3), prepare the reference with labels (no extractor), or use fid, kid or "
            "diversity"
        )
    return InceptionScore(reference.extractor)


def _diversity(reference: Reference, *, bins: str = "auto", clustering: str = "ward") -> Diversity:
    if bins not in ("auto", "classes", "clusters"):
        raise ValueError(f"bins={bins!r}: choose 'auto', 'classes' (classifier predictions) or 'clusters'")
    if bins == "classes" or (bins == "auto" and isinstance(reference.extractor, DigitClassifier)):
        return Diversity(reference.extractor)
    centres = reference.ward_means if clustering == "ward" else reference.centres
    return Diversity(reference.extractor, centres, clustering)


def _aesthetic(reference: Reference, *, predictor: str | Path | None = None, quantile: float = 0.9) -> AestheticScore:
    if predictor is None:
        raise ValueError("the aesthetic property needs predictor=<local TorchScript or safetensors file>")
    return AestheticScore(reference.extractor, load_predictor(predictor, module_device(reference.extractor)), quantile)


def _manifold(name: str):
    def factory(reference: Reference, *, k: int = 5) -> ManifoldScore:
        return ManifoldScore(name, reference.extractor, reference.features, k=k)

    return factory


_FACTORIES = {
    "fid": _fid,
    "kid": _kid,
    "inception_score": _inception_score,
    "diversity": _diversity,
    "aesthetic": _aesthetic,
    **{name: _manifold(name) for name in SCORES},
}
PROPERTY_NAMES = tuple(_FACTORIES)
