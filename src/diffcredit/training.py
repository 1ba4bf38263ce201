"""One denoising training loop for every stage: training from scratch, recovery after pruning, per-coalition fine-tune.

A per-coalition fine-tune is this loop on the coalition's items only (``ContributorData.subset(...).images``). The
empty coalition has no items; its model is defined by the caller (in the paper: the untrained model).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.modeling_utils import ModelMixin
from diffusers.training_utils import EMAModel

from diffcredit.models import make_scheduler

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def select_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` explicitly."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return device


@dataclass
class TrainingResult:
    """What a run of :func:`train` did: ``losses`` holds the loss of every step."""

    steps: int
    seconds: float
    losses: list[float] = field(repr=False)
    device: str


def train(
    model: ModelMixin,
    images: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    ema_decay: float | None = None,
    grad_clip: float | None = 1.0,
    schedule: dict[str, Any] | None = None,
    device: str | None = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> TrainingResult:
    """Train ``model`` in place on ``images`` (float32 ``[N, C, H, W]`` in ``[-1, 1]``) with the DDPM loss.

    Batches are drawn from successive seeded permutations of the items (so an item recurs only after all others have
    been seen), timesteps uniformly and noise from a standard normal; both streams come from ``seed`` alone and are
    drawn on the CPU, so a run is reproducible on CPU and uses the same data order and noise on any device. With
    ``ema_decay`` the model ends with the exponential moving average of its weights. The model returns to the device
    it came on.

    Args:
        schedule: DDPMScheduler kwargs over ``models.DEFAULT_SCHEDULE``; its ``prediction_type`` sets the target.
        device: ``auto``/``cpu``/``cuda[:N]``; None means ``auto``.
        log_every: report the mean loss and speed every this many steps (0: never).
    """
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"train needs a non-empty [N, C, H, W] image array, got shape {images.shape}; the empty coalition "
            "has no training run (use the untrained model)"
        )
    in_channels = model.config.get("in_channels")
    if in_channels is not None and images.shape[1] != in_channels:
        raise ValueError(f"images have {images.shape[1]} channels but the model takes {in_channels}")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got steps={steps}, batch_size={batch_size}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")

    target_device = select_device(device or "auto")
    home_device = next(model.parameters()).device
    scheduler = make_scheduler("ddpm", schedule)
    data = torch.from_numpy(images.astype(np.float32, copy=False)).to(target_device)
    order_generator, noise_generator = (
        torch.Generator().manual_seed(int(child.generate_state(1)[0]))
        for child in np.random.SeedSequence(seed).spawn(2)
    )
    batches = _batch_indices(len(data), batch_size, order_generator)

    model.to(target_device).train()
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=lr, weight_decay=weight_decay)
    ema = EMAModel(model.parameters(), decay=ema_decay, foreach=True) if ema_decay is not None else None
    losses = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        clean = data[next(batches).to(target_device)]
        noise = torch.randn(clean.shape, generator=noise_generator).to(target_device)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(clean),), generator=noise_generator
        ).to(target_device)
        prediction = model(scheduler.add_noise(clean, noise, timesteps), timesteps).sample
        loss = F.mse_loss(prediction, _target(scheduler, clean, noise, timesteps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.detach())
        if log_every and step % log_every == 0:
            recent = torch.stack(losses[-log_every:]).mean().item()
            rate = step / (time.perf_counter() - start)
            log(f"step {step}/{steps}  loss {recent:.4f}  {rate:.1f} steps/s")
    if ema is not None:
        ema.copy_to(model.parameters())
    seconds = time.perf_counter() - start
    model.to(home_device)
    return TrainingResult(
        steps=steps,
        seconds=seconds,
        losses=torch.stack(losses).cpu().tolist() if losses else [],
        device=str(target_device),
    )


def _batch_indices(n: int, batch_size: int, generator: torch.Generator):
    """Endless batches of item indices, cutting through successive random permutations."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict, as the scheduler's ``prediction_type`` says."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    if kind == "sample":
        return clean
    raise ValueError(f"unsupported prediction_type {kind!r}; use epsilon, v_prediction or sample")
