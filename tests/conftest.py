"""Shared tiny fixtures: models and data small enough that each test runs in seconds on one core."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from diffcredit.contributors import ContributorData, load_digits
from diffcredit.models import build_model

torch.set_num_threads(1)  # two cores are shared by everyone running tests


@pytest.fixture(scope="session")
def tiny_config() -> dict[str, Any]:
    """A two-level UNet2DModel for 8×8 grayscale images: 8/16 channels, 4 and 8 per GroupNorm group, attention
    (2 heads) at 4×4, with both a Downsample2D and an Upsample2D."""
    return {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 2,
        "attention_head_dim": 8,
    }


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
