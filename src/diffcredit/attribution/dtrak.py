"""D-TRAK (Zheng, Pang, Du, Lin & Lin, ICLR 2024): TRAK with the squared norm of the noise prediction as output.

Features. For an image x, with S timesteps t_s spread evenly over the schedule and noise ε_s shared by every image
(training items and targets alike, so a feature is a deterministic function of the image),

    L(x) = (1/S) Σ_s mean ‖ε_θ(√ᾱ_s x + √(1−ᾱ_s) ε_s, t_s)‖²,      φ(x) = Pᵀ ∇_θ L(x),

with P a seeded Gaussian projection to k dimensions (entries N(0, 1/k)).

Scores. With F the [N, k] features of the training items and λ = lam · tr(FᵀF)/k (a ridge relative to the mean
eigenvalue, so `lam` means the same for any model or k),

    τ = φ_target (FᵀF + λI)⁻¹ Fᵀ,

one score per item; a contributor's score is the sum over its items. Equivalently τ are the ridge coefficients that
write φ_target as a combination of the training items' features. Sign (TRAK's): positive means the item's gradient
points like the target's, a proponent whose training makes the target more likely; higher = more valuable.

The target. D-TRAK attributes a single generated image, while DiffCredit credits a property of the whole generation
set. τ is linear in φ_target, so taking φ_target = the mean feature over the generated images (`targets`, e.g. the
full model's samples under the run's generation noise) gives exactly the mean of the per-image D-TRAK scores: credit
for supporting what the model generates, on average. It is blind to the property itself (good and bad generations
count alike); held-out real images as targets credit support for real data instead, which is closer to −FID.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import DDPMScheduler
from torch import nn
from torch.func import grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffcredit.attribution import Params, contributor_totals, detached_params, model_output, save_values
from diffcredit.contributors import ContributorData
from diffcredit.models import make_scheduler
from diffcredit.seeds import derive_seed
from diffcredit.training import select_device

TARGETS = ("generated", "heldout")


def contributor_scores(
    model: nn.Module,
    data: ContributorData,
    targets: np.ndarray,
    *,
    projection_dim: int = 256,
    timesteps: int = 10,
    seed: int,
    lam: float = 1e-2,
    schedule: dict[str, Any] | None = None,
    batch_size: int = 32,
    device: str | None = None,
) -> pd.Series:
    """D-TRAK score of each contributor for the mean feature of `targets` (float32 [M, C, H, W] in [-1, 1])."""
    scores = item_scores(model, data.images, targets, projection_dim=projection_dim, timesteps=timesteps, seed=seed,
                         lam=lam, schedule=schedule, batch_size=batch_size, device=device)
    return contributor_totals(scores, data)


def item_scores(
    model: nn.Module,
    images: np.ndarray,
    targets: np.ndarray,
    *,
    projection_dim: int,
    timesteps: int,
    seed: int,
    lam: float,
    schedule: dict[str, Any] | None = None,
    batch_size: int = 32,
    device: str | None = None,
) -> np.ndarray:
    """τ_i for every item of `images` (see the module docstring)."""
    if projection_dim < 1 or timesteps < 1 or batch_size < 1:
        raise ValueError(f"need projection_dim, timesteps, batch_size >= 1; got {projection_dim}, {timesteps}, "
                         f"{batch_size}")
    if not lam > 0:
        raise ValueError(f"lam={lam}: the relative ridge must be > 0 (e.g. 1e-2)")
    targets = np.asarray(targets, dtype=np.float32)
    if len(targets) == 0 or targets.shape[1:] != images.shape[1:]:
        raise ValueError(f"targets of shape {targets.shape} do not match the training images {images.shape[1:]}")
    scheduler = make_scheduler("ddpm", schedule)
    n_train = scheduler.config.num_train_timesteps
    if timesteps > n_train:
        raise ValueError(f"timesteps={timesteps} exceeds the schedule's {n_train} training timesteps")
    target_device = select_device(device or "auto")
    model.to(target_device).eval()
    steps = torch.linspace(0, n_train - 1, timesteps).round().long().to(target_device)
    generator = torch.Generator().manual_seed(derive_seed(seed, "dtrak-noise"))
    noise = torch.randn((timesteps, *images.shape[1:]), generator=generator).to(target_device)
    params = detached_params(model)
    projection = projection_matrix(params, projection_dim, derive_seed(seed, "dtrak-projection"))

    def featurize(batch: np.ndarray) -> torch.Tensor:
        return features(model, params, batch, projection=projection, timesteps=steps, noise=noise,
                        scheduler=scheduler, batch_size=batch_size)

    train_features, target_features = featurize(images).double(), featurize(targets).double()
    kernel = train_features.T @ train_features
    ridge = lam * kernel.trace() / projection_dim
    weights = torch.linalg.solve(kernel + ridge * torch.eye(projection_dim, dtype=kernel.dtype, device=kernel.device),
                                 target_features.mean(0))
    return (train_features @ weights).cpu().numpy()


def projection_matrix(params: Params, dim: int, seed: int) -> Params:
    """A seeded Gaussian projection [numel, dim] per parameter tensor, entries N(0, 1/dim).

    Held in memory: 4 · n_parameters · dim bytes (1.1 GB for the digits UNet at dim 256).
    """
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(p.numel(), dim, generator=generator) / math.sqrt(dim)).to(p.device)
            for name, p in params.items()}


def features(
    model: nn.Module,
    params: Params,
    images: np.ndarray,
    *,
    projection: Params,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    scheduler: DDPMScheduler,
    batch_size: int,
) -> torch.Tensor:
    """Projected per-image gradients of the D-TRAK loss, float32 [N, dim] (per-example gradients via vmap(grad))."""

    def loss(p: Params, noisy: torch.Tensor) -> torch.Tensor:  # noisy: one image at every timestep
        return model_output(model, p, noisy, timesteps).pow(2).mean()

    per_image_grad = vmap(grad(loss), in_dims=(None, 0))
    rows = []
    # The math kernel: torch.func cannot differentiate the fused CPU attention kernels.
    with sdpa_kernel(SDPBackend.MATH):
        for batch in torch.from_numpy(np.ascontiguousarray(images)).split(batch_size):
            batch = batch.to(noise.device)
            n, s = len(batch), len(timesteps)
            noisy = scheduler.add_noise(batch.repeat_interleave(s, 0), noise.repeat(n, 1, 1, 1), timesteps.repeat(n))
            grads = per_image_grad(params, noisy.view(n, s, *batch.shape[1:]))
            rows.append(sum(grads[name].flatten(1) @ projection[name] for name in projection))
    return torch.cat(rows)


def write_values(
    *, model: str, train_data: str, out: str, target: str = "generated", heldout_data: str | None = None,
    n_targets: int = 256, inference_steps: int = 50, sampler: str = "ddim", schedule: dict[str, Any] | None = None,
    seed: int, log: Callable[[str], None] = print, **options,
) -> pd.Series:
    """The workflow's D-TRAK stage: score the training data of `model` against its samples or held-out real images.

    `target`: ``generated`` (`n_targets` samples of `model` under the run's generation noise, as the coalitions use)
    or ``heldout`` (the first `n_targets` images of `heldout_data`). `options` go to :func:`contributor_scores`.
    """
    from diffcredit.models import load_model
    from diffcredit.sampling import generate

    if target not in TARGETS:
        raise ValueError(f"unknown D-TRAK target {target!r}: choose one of {', '.join(TARGETS)}")
    tic = time.perf_counter()
    full = load_model(model)
    if target == "generated":
        targets = generate(full, n_targets, seed=derive_seed(seed, "generation-noise"),
                           inference_steps=inference_steps, sampler=sampler, schedule=schedule)
    else:
        if heldout_data is None:
            raise ValueError("D-TRAK target 'heldout' needs heldout_data (the held-out real images)")
        targets = ContributorData.load(heldout_data).images[:n_targets]
    scores = contributor_scores(full, ContributorData.load(train_data), targets, seed=seed, schedule=schedule,
                                **options)
    seconds = time.perf_counter() - tic
    log(f"D-TRAK on {len(targets)} {target} targets: {seconds:.1f} s")
    save_values(scores, Path(out), seconds=seconds)
    return scores
