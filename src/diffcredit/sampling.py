"""Seeded, batched DDIM/DDPM generation with common random numbers, and image grids for looking at the results.

Item ``i`` of a generation draws all its noise (the starting image and DDPM's per-step noise) from its own generator,
seeded from ``(seed, i)``. So the noise does not depend on the model, the batch size or ``n``: every coalition's model
denoises the same starting points, and utility differences are not drowned in sampling noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel

from diffcredit.models import make_scheduler
from diffcredit.training import select_device


def generate(
    model: UNet2DModel,
    n: int,
    *,
    seed: int,
    inference_steps: int = 50,
    sampler: str = "ddim",
    schedule: dict[str, Any] | None = None,
    batch_size: int = 256,
    device: str | None = None,
) -> np.ndarray:
    """Generate ``n`` images, float32 ``[n, C, H, W]`` in ``[-1, 1]``.

    ``schedule`` must be the training schedule (DDPMScheduler kwargs). DDIM runs deterministically (eta 0) from the
    starting noise. The model is moved to ``device`` (None: ``auto``) and left in eval mode.
    """
    if n < 0 or batch_size < 1 or inference_steps < 1:
        raise ValueError(
            f"need n >= 0, batch_size >= 1, inference_steps >= 1; got {n}, {batch_size}, {inference_steps}"
        )
    scheduler = make_scheduler(sampler, schedule)
    scheduler.set_timesteps(inference_steps)
    target_device = select_device(device or "auto")
    model.to(target_device).eval()
    size = model.config.sample_size
    shape = (model.config.in_channels, size, size)
    seeds = np.random.SeedSequence(seed).generate_state(n, dtype=np.uint64)  # entry i depends on (seed, i) only
    batches = []
    for start in range(0, n, batch_size):
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        sample = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(target_device)
        sample = sample * scheduler.init_noise_sigma
        with torch.inference_mode():
            for t in scheduler.timesteps:
                prediction = model(scheduler.scale_model_input(sample, t), t).sample
                # a list of CPU generators keeps DDPM's per-step noise per item
                sample = scheduler.step(prediction, t, sample, generator=generators).prev_sample
        batches.append(sample.clamp(-1, 1).float().cpu().numpy())
    return np.concatenate(batches) if batches else np.zeros((0, *shape), dtype=np.float32)


def save_grid(
    images: np.ndarray | Mapping[str, np.ndarray], path: str | Path, nrow: int = 16, *, scale: int = 4
) -> None:
    """Write images (``[N, C, H, W]`` in ``[-1, 1]``) as a PNG grid, ``nrow`` images per row.

    A mapping ``{label: images}`` puts one labelled grid per entry side by side (e.g. real digits beside samples).
    Pixels are enlarged ``scale`` times (nearest neighbour) so that 8×8 images are visible.
    """
    from PIL import Image, ImageDraw

    panels = images if isinstance(images, Mapping) else {"": images}
    grids = [_grid(np.asarray(batch), nrow, scale) for batch in panels.values()]
    header = 14 if any(panels) else 0
    gap = 2 * scale
    width = sum(grid.shape[1] for grid in grids) + gap * (len(grids) - 1)
    height = header + max(grid.shape[0] for grid in grids)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    left = 0
    for label, grid in zip(panels, grids):
        canvas.paste(Image.fromarray(grid), (left, header))
        draw.text((left + 2, 1), label, fill="black")
        left += grid.shape[1] + gap
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _grid(images: np.ndarray, nrow: int, scale: int) -> np.ndarray:
    """uint8 RGB ``[rows*H, nrow*W, 3]`` tiling of ``[N, C, H, W]`` images in ``[-1, 1]``, 1-pixel gaps, black fill."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"save_grid needs non-empty [N, C, H, W] images with 1 or 3 channels, got {images.shape}")
    n, channels, height, width = images.shape
    pixels = np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    pixels = np.repeat(pixels, 3 // channels, axis=3)
    columns = min(nrow, n)
    rows = -(-n // columns)
    cell_h, cell_w = height * scale + 1, width * scale + 1
    grid = np.zeros((rows * cell_h + 1, columns * cell_w + 1, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        top, left = 1 + (i // columns) * cell_h, 1 + (i % columns) * cell_w
        grid[top : top + height * scale, left : left + width * scale] = image.repeat(scale, 0).repeat(scale, 1)
    return grid
