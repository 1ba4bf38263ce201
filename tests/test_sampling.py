from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffcredit.models import DEFAULT_SCHEDULE, build_model, make_scheduler
from diffcredit.sampling import SAMPLERS, generate, save_grid

QUICK = {"inference_steps": 4, "device": "cpu"}
ALL_SAMPLERS = list(SAMPLERS)


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


class GlobalNoiseConsumer(NoisePeek):
    """Predicts the same constant as NoisePeek but draws from the global random stream (as dropout would)."""

    def forward(self, sample: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        torch.randn(100)
        return super().forward(sample, t)


class PointMassOracle(nn.Module):
    """The exact noise predictor for data that is one constant image `value`: ε = (x_t − √ᾱ_t·value) / √(1 − ᾱ_t).

    Its prediction of the clean image is exact at every step, so any correct sampler ends at `value` from any noise.
    """

    def __init__(self, value: float):
        super().__init__()
        self.config = SimpleNamespace(sample_size=8, in_channels=1)
        self.value = value
        self.alphas_cumprod = make_scheduler("ddpm", DEFAULT_SCHEDULE).alphas_cumprod

    def forward(self, sample: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        alpha = self.alphas_cumprod[int(t)]
        return SimpleNamespace(sample=(sample - alpha.sqrt() * self.value) / (1 - alpha).sqrt())


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_every_sampler_lands_on_the_data_of_an_exact_model(sampler):
    """Wiring check of each solver (timesteps, parametrisation, state between batches) against a known answer."""
    images = generate(PointMassOracle(0.5), 6, seed=0, sampler=sampler, batch_size=4, **QUICK)
    np.testing.assert_allclose(images, 0.5, atol=2e-3)


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_latents_are_not_clipped(sampler):
    """``clip=False`` (the latent families): data outside the pixel range, here an exact model of a point mass at 1.5,
    is sampled where it lies; with the pixels' clipping every sampler ends at the range's edge."""
    oracle = PointMassOracle(1.5)
    np.testing.assert_allclose(generate(oracle, 3, seed=0, sampler=sampler, clip=False, **QUICK), 1.5, atol=2e-3)
    np.testing.assert_array_equal(generate(oracle, 3, seed=0, sampler=sampler, **QUICK), 1.0)


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_generate_shape_range_and_determinism(tiny_model, sampler):
    images = generate(tiny_model, 5, seed=3, sampler=sampler, **QUICK)
    assert images.shape == (5, 1, 8, 8) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1
    np.testing.assert_array_equal(images, generate(tiny_model, 5, seed=3, sampler=sampler, **QUICK))
    assert not np.allclose(images, generate(tiny_model, 5, seed=4, sampler=sampler, **QUICK))


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_noise_does_not_depend_on_batch_size_or_n(tiny_model, sampler):
    """DDPM also draws fresh noise at every step: per-item generators keep it independent of the batching. The
    multistep solvers must forget the previous batch's history (a leak moves pixels by tenths; the tolerance is the
    float round-off of other batch shapes)."""
    reference = generate(tiny_model, 5, seed=7, sampler=sampler, batch_size=5, **QUICK)
    np.testing.assert_allclose(
        generate(tiny_model, 5, seed=7, sampler=sampler, batch_size=2, **QUICK), reference, atol=1e-4
    )
    np.testing.assert_allclose(generate(tiny_model, 3, seed=7, sampler=sampler, **QUICK), reference[:3], atol=1e-4)


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_every_model_starts_from_the_same_noise(sampler):
    """Common random numbers: two different models see identical starting noise for one seed."""
    a, b = NoisePeek(0.0), NoisePeek(0.3)
    generate(a, 4, seed=11, batch_size=3, sampler=sampler, **QUICK)
    generate(b, 4, seed=11, batch_size=4, sampler=sampler, **QUICK)
    start_a, start_b = a.starting_noise(), b.starting_noise()
    assert start_a.shape == (4, 1, 8, 8)
    assert torch.equal(start_a, start_b)
    assert abs(start_a.std().item() - 1) < 0.15  # standard normal noise


def test_the_unclipped_ddim_differs_from_diffusers_ddim_by_the_clipping_only():
    """Inside the data range the two DDIMs take the same steps; when the predicted clean image leaves [-1, 1] (a
    constant noise prediction, at high noise) diffusers' DDIM projects it back at every step and the other does not."""
    inside = PointMassOracle(0.5)
    np.testing.assert_allclose(
        generate(inside, 3, seed=1, sampler="ddim", **QUICK),
        generate(inside, 3, seed=1, sampler="ddim-unclipped", **QUICK),
        atol=1e-6,
    )
    clipped, unclipped = NoisePeek(0.5), NoisePeek(0.5)
    generate(clipped, 3, seed=1, sampler="ddim", **QUICK)
    generate(unclipped, 3, seed=1, sampler="ddim-unclipped", **QUICK)
    assert torch.equal(clipped.calls[0][1], unclipped.calls[0][1])  # the same starting noise
    # the second step's input: the clipped DDIM's, sqrt(alpha_prev)·clip(x0) + ..., stays far nearer the data range
    assert clipped.calls[1][1].abs().max() < 2 < unclipped.calls[1][1].abs().max()


def test_ddpm_step_noise_is_shared_across_models():
    """DDPM's per-step noise comes from the generation seed alone: a model that uses the global random stream (as
    dropout does) gets exactly the trajectory of one that does not, and other seeds give other trajectories."""
    plain, consumer, other = NoisePeek(0.2), GlobalNoiseConsumer(0.2), NoisePeek(0.2)
    images = generate(plain, 3, seed=5, sampler="ddpm", **QUICK)
    np.testing.assert_array_equal(images, generate(consumer, 3, seed=5, sampler="ddpm", **QUICK))
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(plain.calls, consumer.calls, strict=True))
    generate(other, 3, seed=6, sampler="ddpm", **QUICK)
    assert not torch.equal(plain.calls[1][1], other.calls[1][1])


def test_generation_logs_progress(tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="diffcredit.sampling"):
        generate(tiny_model, 6, seed=0, batch_size=3, log_every=None, sampler="unipc", **QUICK)
    lines = [r.getMessage() for r in caplog.records if r.name == "diffcredit.sampling"]
    assert [line.split(": ")[1].split()[0] for line in lines] == [f"{i}/8" for i in range(1, 9)]
    assert "model evaluations/s" in lines[-1] and "ETA 00:00" in lines[-1]
    caplog.clear()
    generate(tiny_model, 2, seed=0, **QUICK)  # silent unless asked
    assert not [r for r in caplog.records if r.name == "diffcredit.sampling"]


def test_bf16_on_the_cpu_runs_fp32_and_says_so(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="diffcredit.training"):
        images = generate(tiny_model, 3, seed=2, precision="bf16", **QUICK)
    assert "precision bf16 needs a CUDA device" in caplog.text
    np.testing.assert_array_equal(images, generate(tiny_model, 3, seed=2, **QUICK))
    with pytest.raises(ValueError, match="unknown precision 'fp16'; use one of fp32, bf16"):
        generate(tiny_model, 1, seed=0, precision="fp16", **QUICK)


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


def test_package_defaults_are_the_schemas():
    """One default sampler and step count: the package's, the settings' and the schema's agree."""
    from pathlib import Path

    import yaml

    from diffcredit.sampling import DEFAULT_INFERENCE_STEPS, DEFAULT_SAMPLER
    from diffcredit.utility import UtilitySettings

    schema = yaml.safe_load((Path(__file__).parent.parent / "workflow/schemas/config.schema.yaml").read_text())
    utility = schema["properties"]["utility"]["properties"]
    assert (utility["sampler"]["default"], utility["inference_steps"]["default"]) == (
        DEFAULT_SAMPLER,
        DEFAULT_INFERENCE_STEPS,
    )
    fields = UtilitySettings.__dataclass_fields__
    assert (fields["sampler"].default, fields["inference_steps"].default) == (DEFAULT_SAMPLER, DEFAULT_INFERENCE_STEPS)
    assert utility["sampler"]["enum"] == list(SAMPLERS)
