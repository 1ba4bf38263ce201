"""Shared tiny fixtures: models and data small enough that each test runs in seconds on one core."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from diffcredit.contributors import ContributorData, load_digits
from diffcredit.models import build_model, tiny_unet_config

torch.set_num_threads(1)  # two cores are shared by everyone running tests


@pytest.fixture(scope="session")
def tiny_config() -> dict[str, Any]:
    """The package's tiny UNet for 8×8 grayscale images (diffcredit.models.tiny_unet_config)."""
    return tiny_unet_config()


@pytest.fixture
def tiny_model(tiny_config):
    return build_model(tiny_config, seed=0)


@pytest.fixture
def tiny_schedule() -> dict[str, Any]:
    """A 20-step noise schedule: gradient-based pruning makes one pass per timestep."""
    return {"num_train_timesteps": 20, "beta_schedule": "linear"}


@pytest.fixture(scope="session")
def digits() -> ContributorData:
    return load_digits()


@pytest.fixture(scope="session")
def digit_images(digits: ContributorData) -> np.ndarray:
    """64 real 8×8 digits in [-1, 1]."""
    return digits.images[:64]
