"""One denoising training loop for every stage: training from scratch, recovery after pruning, per-coalition fine-tune.

A per-coalition fine-tune is this loop on the coalition's items only (``ContributorData.subset(...).images``). The
empty coalition has no items; its model is defined by the caller (in the paper: the untrained model).

On CUDA the loop keeps the GPU busy: data, batch indices and noise live on the device (nothing is copied from the host
per step), matmuls and convolutions may use TF32, ``precision="bf16"`` runs the forward pass under bfloat16 autocast,
and the peak memory is measured. On the CPU all of that is a no-op: fp32, CPU random streams, the same bytes as ever.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.modeling_utils import ModelMixin
from diffusers.training_utils import EMAModel, compute_snr

from diffcredit.models import make_scheduler
from diffcredit.progress import Progress

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
PRECISIONS = ("fp32", "bf16")
logger = logging.getLogger(__name__)


def select_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` explicitly."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return device


def prepare_device(device: torch.device) -> None:
    """Let CUDA use TF32 tensor cores for fp32 matmuls and convolutions (a no-op elsewhere)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def reset_peak_memory(device: torch.device) -> None:
    """Restart CUDA's count of peak memory (a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Bytes of CUDA memory allocated at the peak since :func:`reset_peak_memory`; None off CUDA."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """The context of a forward pass in ``precision``: bf16 autocast on a CUDA device that supports it, else fp32.

    bf16 is not applied on the CPU (slower on most CPUs, and it would change the CPU results); a warning says so.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        logger.warning("precision bf16 needs a CUDA device with bfloat16 support; running fp32 on %s", device)
    return contextlib.nullcontext()


@dataclass
class TrainingResult:
    """What a run of :func:`train` did: ``losses`` holds the loss of every step; ``peak_memory`` the CUDA bytes at
    the peak (None on the CPU)."""

    steps: int
    seconds: float
    losses: list[float] = field(repr=False)
    device: str
    peak_memory: int | None = None
    # with an EMA: the parameters before the average replaced them (CPU), to save beside the model
    raw_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)


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
    ema_step: int = 0,
    ema_start: list[torch.Tensor] | None = None,
    keep_raw: bool = False,
    grad_clip: float | None = 1.0,
    schedule: dict[str, Any] | None = None,
    device: str | None = None,
    precision: str = "fp32",
    log_every: int | None = None,
    observer: Any = None,
    snr_gamma: float | None = None,
) -> TrainingResult:
    """Train ``model`` in place on ``images`` (float32 ``[N, C, H, W]`` in ``[-1, 1]``) with the DDPM loss.

    Batches are drawn from successive seeded permutations of the items (so an item recurs only after all others have
    been seen), timesteps uniformly and noise from a standard normal; both streams come from ``seed`` alone and are
    drawn on the training device (CPU generators on the CPU, CUDA generators on CUDA), so a run is reproducible on one
    kind of device. With ``ema_decay`` the model ends with the exponential moving average of its weights. The model
    returns to the device it came on.

    Args:
        schedule: DDPMScheduler kwargs over ``models.DEFAULT_SCHEDULE``; its ``prediction_type`` sets the target.
        device: ``auto``/``cpu``/``cuda[:N]``; None means ``auto``.
        precision: ``fp32`` or ``bf16`` (autocast of the forward pass on CUDA; fp32 elsewhere, see :func:`autocast`).
        log_every: log step, mean loss, rate and ETA to the ``diffcredit.training`` logger every this many steps
            (None: about ten times per run; 0: never).
        ema_step: with ``ema_decay``, the EMA's step count to start from. 0 starts a fresh EMA (its first step
            replaces the average); the model's own run's step count continues that run's EMA, whose weights the model
            then holds (diffusers' decay min(ema_decay, n/(n+9)) at step n: ~0.9991 after 10,000 steps).
        ema_start: with ``ema_decay``, the average to start from, one tensor per parameter (default: the model's own
            weights); a continued EMA whose model starts from that run's raw weights passes the run's average here.
        keep_raw: with ``ema_decay``, return the raw weights (``raw_weights``) of a run that is saved (train_full,
            recover); a coalition's fine-tune does not need them, so it skips the copy.
        observer: called as ``observer(model, index, clean, timesteps, noise)`` before each step's forward pass (so
            it can replay the step's dropout masks); what it returns is called with the SGD step size applied (lr
            times the clipping factor) before the update (In-Run Data Shapley, :mod:`diffcredit.attribution.inrun`).
        snr_gamma: weight each item's loss by Min-SNR-γ (Hang et al. 2023; diffusers' ``--snr_gamma``, see
            :func:`min_snr_weights`), which spends the run on the noisy timesteps where an image's content is decided.
            An observer that replays the step (In-Run Data Shapley) assumes the plain loss, so the two do not mix.
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
    if snr_gamma is not None and snr_gamma <= 0:
        raise ValueError(f"snr_gamma must be positive (5 in Hang et al.), got {snr_gamma}; None trains unweighted")

    target_device = select_device(device or "auto")
    forward_precision = autocast(target_device, precision)
    home_device = next(model.parameters()).device
    scheduler = make_scheduler("ddpm", schedule)
    prepare_device(target_device)
    reset_peak_memory(target_device)
    data = torch.from_numpy(images.astype(np.float32, copy=False)).to(target_device)
    stream_device = target_device if target_device.type == "cuda" else torch.device("cpu")
    order_generator, noise_generator = (
        torch.Generator(stream_device).manual_seed(int(child.generate_state(1)[0]))
        for child in np.random.SeedSequence(seed).spawn(2)
    )
    batches = _batch_indices(len(data), batch_size, order_generator)

    model.to(target_device).train()
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=lr, weight_decay=weight_decay)
    ema = EMAModel(model.parameters(), decay=ema_decay, foreach=True) if ema_decay is not None else None
    if ema is not None:  # ema_step > 0 continues the run the model comes from, past its decay warm-up
        ema.optimization_step = ema_step
        if ema_start is not None:
            ema.shadow_params = [
                tensor.detach().to(p.device, p.dtype, copy=True)
                for tensor, p in zip(ema_start, model.parameters(), strict=True)
            ]
    losses = []
    progress = Progress(logger, "train", steps, every=log_every)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        index = next(batches)
        clean = data[index]
        noise = torch.randn(clean.shape, generator=noise_generator, device=stream_device)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(clean),), generator=noise_generator, device=stream_device
        )
        pending = observer(model, index, clean, timesteps, noise) if observer is not None else None
        with forward_precision:
            prediction = model(scheduler.add_noise(clean, noise, timesteps), timesteps).sample
        target = denoising_target(scheduler, clean, noise, timesteps)
        if snr_gamma is None:
            loss = F.mse_loss(prediction.float(), target)
        else:
            if pending is not None:
                raise ValueError("this observer replays the plain DDPM loss; train it without snr_gamma")
            item_losses = (prediction.float() - target).square().flatten(1).mean(1)
            loss = (item_losses * min_snr_weights(scheduler, timesteps, snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if pending is not None:
            clipped = 1.0 if grad_clip is None else min(1.0, grad_clip / (float(norm) + 1e-6))  # as clip_grad_norm_
            pending(opt.param_groups[0]["lr"] * clipped)
        opt.step()
        if ema is not None:
            ema.step(model.parameters())
        losses.append(loss.detach())
        if progress.due(step):  # the mean loss since the last report (the only host sync of the loop)
            progress.update(step, f"loss {torch.stack(losses[progress.done - step :]).mean().item():.4f}")
    raw_weights = None
    if ema is not None:
        if keep_raw:
            raw_weights = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
        ema.copy_to(model.parameters())
    seconds = time.perf_counter() - start
    model.to(home_device)
    return TrainingResult(
        steps=steps,
        seconds=seconds,
        losses=torch.stack(losses).cpu().tolist() if losses else [],
        device=str(target_device),
        peak_memory=peak_memory(target_device),
        raw_weights=raw_weights,
    )


def _batch_indices(n: int, batch_size: int, generator: torch.Generator):
    """Endless batches of item indices, cutting through successive random permutations (on the generator's
    device)."""
    pending = torch.empty(0, dtype=torch.long, device=generator.device)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator, device=generator.device)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights of ``timesteps`` for the scheduler's prediction type, as diffusers' training scripts
    compute them: min(SNR, γ) on the clean image's error, divided by SNR for an ε target and by SNR + 1 for a v
    target (the factors that turn that error into theirs)."""
    snr = compute_snr(scheduler, timesteps)
    weights = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return weights / snr
    if kind == "v_prediction":
        return weights / (snr + 1)
    return weights


def denoising_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict, as the scheduler's ``prediction_type`` says."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    if kind == "sample":
        return clean
    raise ValueError(f"unsupported prediction_type {kind!r}; use epsilon, v_prediction or sample")
