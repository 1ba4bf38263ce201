"""The Inception Score under a staged classifier file (the paper's CIFAR-20 property), on planted classifiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diffcredit.properties import load_property, prepare_reference


class Brightness(nn.Module):
    """Class logits from the mean pixel: bright images are class 0, dark ones class 1, each with near certainty."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3))
        return torch.stack([60.0 * mean, -60.0 * mean], dim=1)


class Flat(nn.Module):
    """Not a classifier: one number per image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A reference folder with a local feature extractor (no class probabilities) and two staged classifier files."""
    folder = tmp_path_factory.mktemp("staged")
    for name, module in (("extractor", Flatten()), ("brightness", Brightness()), ("flat", Flat())):
        torch.jit.save(torch.jit.script(module), folder / f"{name}.pt")
    reference = np.random.default_rng(0).uniform(-1, 1, (30, 1, 4, 4)).astype(np.float32)
    prepare_reference(
        folder / "reference", reference_images=reference, seed=0, n_clusters=3, extractor=folder / "extractor.pt"
    )
    return folder


def images(bright: int, dark: int) -> np.ndarray:
    return np.concatenate([np.full((bright, 1, 4, 4), 0.5), np.full((dark, 1, 4, 4), -0.5)]).astype(np.float32)


def test_a_staged_classifier_scores_confident_varied_images_by_their_number_of_classes(staged):
    score = load_property("inception_score", staged / "reference", classifier=staged / "brightness.pt")
    assert score.higher_is_better
    assert score(images(8, 8)) == pytest.approx(2.0, rel=1e-6)  # two classes, evenly: IS = 2
    assert score(images(8, 0)) == pytest.approx(1.0, rel=1e-6)  # one class only: IS = 1
    p = 0.75  # three quarters bright: exp(H(p)) for confident predictions
    assert score(images(12, 4)) == pytest.approx(np.exp(-p * np.log(p) - (1 - p) * np.log(1 - p)), rel=1e-6)


def test_without_a_classifier_a_feature_extractor_is_refused_naming_the_option(staged):
    with pytest.raises(ValueError, match=r"class probabilities.*utility.property_options.classifier"):
        load_property("inception_score", staged / "reference")


def test_a_classifier_that_gives_no_class_logits_or_is_missing_is_named(staged):
    flat = load_property("inception_score", staged / "reference", classifier=staged / "flat.pt")
    with pytest.raises(ValueError, match=r"returned shape \(16,\): it must map images to class logits \[N, K >= 2\]"):
        flat(images(8, 8))
    with pytest.raises(FileNotFoundError, match=r"Inception Score classifier .*missing\.pt"):
        load_property("inception_score", staged / "reference", classifier=staged / "missing.pt")
