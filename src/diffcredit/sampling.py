"""Seeded, batched generation with common random numbers (DDIM, DDPM, DPM-Solver++, UniPC), and image grids.

Item ``i`` of a generation draws all its noise (the starting image and, for the stochastic DDPM sampler, the noise
of every step) from its own CPU generator, seeded from ``(seed, i)``. So the noise does not depend on the model, the
device, the batch size or ``n``: every coalition's model denoises the same starting points with the same per-step
noise, and utility differences are not drowned in sampling noise.

The multistep solvers (DPM-Solver++ of Lu et al. 2022, UniPC of Zhao et al. 2023) reach DDIM's samples in far fewer
model evaluations; they are deterministic given the starting noise. Which sampler and how many steps a preset uses is
chosen by ``benchmarks/bench_samplers.py``: the fewest steps whose coalition utilities keep a Spearman of at least
min(0.99, noise floor) with the probability-flow ODE solved finely (DDIM at 100 steps without clipping). On digits
DPM-Solver++ does from 7 steps (0.999). Diffusers' default DDIM (``ddim``, the SFT-Shapley paper's sampler) clips
each predicted clean image but not the noise it steps along: a projection per step that does not shrink with the
step size, so its ranking moves with the step count (DDIM 200 agrees with DDIM 100 at 0.92) and no solver meets it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    SchedulerMixin,
    UNet2DModel,
    UniPCMultistepScheduler,
)

from diffcredit.models import DEFAULT_SCHEDULE
from diffcredit.progress import Progress
from diffcredit.training import autocast, prepare_device, select_device

# The schema's defaults (utility.sampler, utility.inference_steps), from benchmarks/RESULTS.md ("Samplers"): 7 steps
# are the fewest that keep Spearman 0.99 with the reference on digits; 10 are also the fewest from which Journey-TRAK's
# default 10 feature timesteps (baselines.trak.timesteps) lie on the coalitions' own sampling trajectories.
DEFAULT_SAMPLER = "dpmsolver++"
DEFAULT_INFERENCE_STEPS = 10

logger = logging.getLogger(__name__)

# name -> (scheduler class, its settings beyond the training schedule, whether each step draws fresh noise).
# Order 3 is what both solvers' authors recommend for unconditional models; the last steps fall back to lower orders.
# Thresholding with sample_max_value 1 clips each predicted clean image to the data range [-1, 1], as DDIM's and
# DDPM's clip_sample does, so that all samplers solve the same clipped problem.
_CLIPPED = {"solver_order": 3, "thresholding": True, "sample_max_value": 1.0}
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any], bool]] = {
    "ddim": (DDIMScheduler, {}, False),
    # diffusers' DDIM clips the predicted clean image but steps along the unclipped noise prediction, a projection
    # per step that does not vanish as steps grow; without it DDIM solves the probability-flow ODE the solvers solve.
    "ddim-unclipped": (DDIMScheduler, {"clip_sample": False}, False),
    "ddpm": (DDPMScheduler, {}, True),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", **_CLIPPED}, False),
    "unipc": (UniPCMultistepScheduler, _CLIPPED, False),
}


def make_sampler(sampler: str, schedule: dict[str, Any] | None = None, *, clip: bool = True) -> SchedulerMixin:
    """The diffusers scheduler named ``sampler`` over the training schedule (:data:`models.DEFAULT_SCHEDULE` updated
    by ``schedule``). ``clip=False`` clips nothing, for samples without a data range: latents have unit variance, so
    clipping their clean-image predictions to [-1, 1] (diffusers' DDIM and DDPM default) would cut a third of them."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    cls, settings, _ = SAMPLERS[sampler]
    options = {**DEFAULT_SCHEDULE, **(schedule or {}), **settings}
    if not clip:
        options["thresholding"] = False
        if "clip_sample" in inspect.signature(cls.__init__).parameters:
            options["clip_sample"] = False
    return cls(**options)


def generate(
    model: UNet2DModel,
    n: int,
    *,
    seed: int,
    inference_steps: int = DEFAULT_INFERENCE_STEPS,
    sampler: str = DEFAULT_SAMPLER,
    schedule: dict[str, Any] | None = None,
    batch_size: int = 256,
    device: str | None = None,
    precision: str = "fp32",
    log_every: int | None = 0,
    clip: bool = True,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    predict: Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor] | None = None,
) -> np.ndarray:
    """Generate ``n`` images, float32 ``[n, C, H, W]`` in ``[-1, 1]`` (with ``clip=False``, latents: unclipped, see
    :func:`make_sampler`).

    ``schedule`` must be the training schedule (DDPMScheduler kwargs); ``sampler`` is one of :data:`SAMPLERS` (DDIM
    runs deterministically, eta 0). The model is moved to ``device`` (None: ``auto``) and left in eval mode; with
    ``precision="bf16"`` its forward passes run under bfloat16 autocast on CUDA (the solver's arithmetic stays fp32).
    ``batch_size`` images are denoised together: on a GPU, as many as memory allows. ``log_every``: log progress to
    the ``diffcredit.sampling`` logger every this many model evaluations of a batch (None: about ten times; 0: never).
    ``on_step(i, t, sample)`` sees each batch's state before its ``i``-th denoising step (Journey-TRAK's trajectories).
    ``predict(model_input, t, items)`` replaces ``model(model_input, t).sample`` for the batch of images ``items``
    (a conditional family's UNet under each image's conditioning, see ``text_conditioning.generate``).
    """
    if n < 0 or batch_size < 1 or inference_steps < 1:
        raise ValueError(
            f"need n >= 0, batch_size >= 1, inference_steps >= 1; got {n}, {batch_size}, {inference_steps}"
        )
    scheduler = make_sampler(sampler, schedule, clip=clip)
    stochastic = SAMPLERS[sampler][2]
    target_device = select_device(device or "auto")
    forward_precision = autocast(target_device, precision)
    prepare_device(target_device)
    model.to(target_device).eval()
    size = model.config.sample_size
    shape = (model.config.in_channels, size, size)
    seeds = np.random.SeedSequence(seed).generate_state(n, dtype=np.uint64)  # entry i depends on (seed, i) only
    starts = range(0, n, batch_size)
    progress = Progress(
        logger,
        f"generate {n} images ({sampler})",
        len(starts) * inference_steps,
        unit="model evaluations",
        every=log_every,
    )
    if predict is None:

        def predict(model_input: torch.Tensor, t: torch.Tensor, items: slice) -> torch.Tensor:
            return model(model_input, t).sample

    batches = []
    for batch, start in enumerate(starts):
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        sample = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(target_device)
        scheduler.set_timesteps(inference_steps)  # also clears a multistep solver's history of the last batch
        sample = sample * scheduler.init_noise_sigma
        # a list of CPU generators keeps DDPM's per-step noise per item
        noise = {"generator": generators} if stochastic else {}
        with torch.inference_mode():
            for i, t in enumerate(scheduler.timesteps, 1):
                if on_step is not None:
                    on_step(i - 1, t, sample)
                with forward_precision:
                    prediction = predict(scheduler.scale_model_input(sample, t), t, slice(start, start + len(sample)))
                sample = scheduler.step(prediction.float(), t, sample, **noise).prev_sample
                progress.update(batch * inference_steps + i)
        batches.append((sample.clamp(-1, 1) if clip else sample).float().cpu().numpy())
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
    for label, grid in zip(panels, grids, strict=True):
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
