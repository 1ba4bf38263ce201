from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffcredit.models import build_model
from diffcredit.sampling import generate, save_grid

QUICK = {"inference_steps": 4, "device": "cpu"}


class NoisePeek(nn.Module):
    """A stand-in model that records its inputs and predicts a constant."""

    def __init__(self, constant: float):
        super().__init__()
        self.config = SimpleNamespace(sample_size=8, in_channels=1)
        self.constant = constant
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(self, sample: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        self.calls.append((int(t), sample.clone()))
        return SimpleNamespace(sample=torch.full_like(sample, self.constant))

    def starting_noise(self) -> torch.Tensor:
        """The inputs at the first (noisiest) timestep, over all batches."""
        return torch.cat([sample for t, sample in self.calls if t == self.calls[0][0]])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_generate_shape_range_and_determinism(tiny_model, sampler):
    images = generate(tiny_model, 5, seed=3, sampler=sampler, **QUICK)
    assert images.shape == (5, 1, 8, 8) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1
    np.testing.assert_array_equal(images, generate(tiny_model, 5, seed=3, sampler=sampler, **QUICK))
    assert not np.allclose(images, generate(tiny_model, 5, seed=4, sampler=sampler, **QUICK))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_noise_does_not_depend_on_batch_size_or_n(tiny_model, sampler):
    """DDPM also draws fresh noise at every step: per-item generators keep it independent of the batching."""
    reference = generate(tiny_model, 5, seed=7, sampler=sampler, batch_size=5, **QUICK)
    np.testing.assert_allclose(generate(tiny_model, 5, seed=7, sampler=sampler, batch_size=2, **QUICK), reference,
                               atol=1e-5)
    np.testing.assert_allclose(generate(tiny_model, 3, seed=7, sampler=sampler, **QUICK), reference[:3], atol=1e-5)


def test_every_model_starts_from_the_same_noise():
    """Common random numbers: two different models see identical starting noise for one seed."""
    a, b = NoisePeek(0.0), NoisePeek(0.3)
    generate(a, 4, seed=11, batch_size=3, **QUICK)
    generate(b, 4, seed=11, batch_size=4, **QUICK)
    start_a, start_b = a.starting_noise(), b.starting_noise()
    assert start_a.shape == (4, 1, 8, 8)
    assert torch.equal(start_a, start_b)
    assert abs(start_a.std().item() - 1) < 0.15  # standard normal noise


def test_generate_zero_and_bad_arguments(tiny_model):
    assert generate(tiny_model, 0, seed=0, **QUICK).shape == (0, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        generate(tiny_model, 1, seed=0, sampler="euler")
    with pytest.raises(ValueError, match="need n >= 0, batch_size >= 1"):
        generate(tiny_model, 1, seed=0, batch_size=0)


def test_generation_leaves_training_reproducible(tiny_config):
    """Sampling must not consume the global random stream that other code may rely on."""
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    generate(build_model(tiny_config, seed=0), 2, seed=1, sampler="ddpm", **QUICK)
    assert torch.equal(torch.rand(2), expected)


def test_save_grid_layout_and_pixels(tmp_path):
    images = -np.ones((10, 1, 8, 8), np.float32)
    images[5] = 1.0  # the sixth image is white: row 1, column 1 with 4 per row
    save_grid(images, tmp_path / "g.png", nrow=4, scale=2)
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    cell = 8 * 2 + 1
    assert grid.shape == (3 * cell + 1, 4 * cell + 1, 3)
    top, left = 1 + cell, 1 + cell
    assert (grid[top : top + 16, left : left + 16] == 255).all()
    assert (grid[1:17, 1:17] == 0).all()


def test_save_grid_panels_side_by_side(tmp_path):
    panels = {"real": np.zeros((4, 1, 8, 8), np.float32), "model": np.zeros((2, 3, 8, 8), np.float32)}
    save_grid(panels, tmp_path / "p.png", nrow=2, scale=1)
    width, height = Image.open(tmp_path / "p.png").size
    cell = 9
    assert (width, height) == ((2 * cell + 1) * 2 + 2, 14 + 2 * cell + 1)
    with pytest.raises(ValueError, match=r"1 or 3 channels, got \(1, 2, 8, 8\)"):
        save_grid(np.zeros((1, 2, 8, 8), np.float32), tmp_path / "bad.png")
