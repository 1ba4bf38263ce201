"""First-order In-Run Data Shapley (Wang, Mittal, Song & Jia 2024), accumulated over one training run.

At step t the run updates w_{t+1} = w_t − η_t (1/|B_t|) Σ_{z∈B_t} ∇ℓ(w_t, z). To first order, item z's share of that
step changes the validation loss by −(η_t/|B_t|) ∇L_val(w_t)·∇ℓ(w_t, z). Each item is credited with the loss
reduction it caused, summed over the steps in which it was in the batch:

    φ_z = Σ_{t: z∈B_t} (η_t/|B_t|) ∇L_val(w_t) · ∇ℓ(w_t, z)        (higher = more helpful)

ℓ(w, z) is the denoising loss of z at the (t, ε) the step draws (the training loss itself). L_val is the mean denoising
loss of the validation images (the held-out real images that are FID's reference), each with one (t, ε) drawn once
for the whole run, so it is one fixed objective. A contributor's value is the sum over its items.

Optimizer: the formula is derived for SGD, for which it is the exact first-order term, so the run uses plain SGD
without gradient clipping by default. With ``optimizer="adam"`` the run follows Adam and the same dot products are
only a proxy (Adam steps along a preconditioned, momentum-averaged gradient, not along ∇ℓ).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import DDPMScheduler
from torch import nn
from torch.func import grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffcredit.attribution import Params, contributor_totals, detached_params, model_output, save_values
from diffcredit.contributors import ContributorData
from diffcredit.models import make_scheduler
from diffcredit.seeds import derive_seed
from diffcredit.training import _batch_indices, _target, select_device

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def contributor_scores(
    model: nn.Module, data: ContributorData, validation_images: np.ndarray, **options: Any
) -> pd.Series:
    """In-Run Data Shapley of each contributor: the sum of :func:`item_scores` (same options) over its items."""
    return contributor_totals(item_scores(model, data.images, validation_images, **options), data)


def item_scores(
    model: nn.Module,
    images: np.ndarray,
    validation_images: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    optimizer: str = "sgd",
    validation_batch_size: int | None = None,
    schedule: dict[str, Any] | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> np.ndarray:
    """φ_z of every item of `images` (see the module docstring).

    Batches, timesteps and noise are drawn as :func:`diffcredit.training.train` draws them for the same seed. With
    `validation_batch_size`, each step estimates ∇L_val on a random subset of the validation images (unbiased, cheaper).
    """
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and lr > 0; got {steps}, {batch_size}, {lr}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r} for In-Run Data Shapley; use one of {', '.join(OPTIMIZERS)}")
    validation_images = np.asarray(validation_images, dtype=np.float32)
    if len(validation_images) == 0 or validation_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"validation images of shape {validation_images.shape} do not match the training images "
                         f"{images.shape[1:]}")
    n_val = len(validation_images)
    if validation_batch_size is not None and not 1 <= validation_batch_size <= n_val:
        raise ValueError(f"validation_batch_size={validation_batch_size}: choose 1..{n_val} or None (all)")

    target_device = select_device(device or "auto")
    model = copy.deepcopy(model).to(target_device).train()
    scheduler = make_scheduler("ddpm", schedule)
    n_train = scheduler.config.num_train_timesteps
    data = torch.from_numpy(np.ascontiguousarray(images)).to(target_device)
    val = torch.from_numpy(validation_images).to(target_device)
    val_generator = torch.Generator().manual_seed(derive_seed(seed, "inrun-validation"))
    val_noise = torch.randn(val.shape, generator=val_generator).to(target_device)
    val_timesteps = torch.randint(0, n_train, (n_val,), generator=val_generator).to(target_device)
    order_generator, noise_generator = (  # the two streams of diffcredit.training.train
        torch.Generator().manual_seed(int(child.generate_state(1)[0]))
        for child in np.random.SeedSequence(seed).spawn(2)
    )
    batches = _batch_indices(len(data), batch_size, order_generator)
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=lr)

    values = np.zeros(len(images))
    tic = time.perf_counter()
    for step in range(1, steps + 1):
        params = detached_params(model)
        chosen = (torch.randperm(n_val, generator=val_generator)[:validation_batch_size]
                  if validation_batch_size is not None else slice(None))
        val_grad = grad(_mean_loss)(params, model, val[chosen], val_timesteps[chosen], val_noise[chosen], scheduler)
        index = next(batches)
        clean = data[index.to(target_device)]
        noise = torch.randn(clean.shape, generator=noise_generator).to(target_device)
        timesteps = torch.randint(0, n_train, (len(clean),), generator=noise_generator).to(target_device)
        dots = gradient_dots(model, params, clean, timesteps, noise, val_grad, scheduler)
        eta = opt.param_groups[0]["lr"]
        np.add.at(values, index.numpy(), eta / len(clean) * dots.double().cpu().numpy())  # an item may recur in a batch
        step_grad = grad(_mean_loss)(params, model, clean, timesteps, noise, scheduler)
        for name, p in model.named_parameters():
            p.grad = step_grad[name]
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"In-Run step {step}/{steps}: {step / (time.perf_counter() - tic):.2f} steps/s")
    return values


def denoising_losses(
    model: nn.Module, params: Params, clean: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
    scheduler: DDPMScheduler,
) -> torch.Tensor:
    """Per-item denoising loss ℓ(w, z) [B] at the given (t, ε): the training loss before the batch mean."""
    prediction = model_output(model, params, scheduler.add_noise(clean, noise, timesteps), timesteps)
    return (prediction - _target(scheduler, clean, noise, timesteps)).pow(2).flatten(1).mean(1)


def gradient_dots(
    model: nn.Module, params: Params, clean: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
    direction: Params, scheduler: DDPMScheduler,
) -> torch.Tensor:
    """∇_w ℓ(w, z_i) · `direction` for every item of the batch, in one forward-mode pass.

    The items' losses are independent outputs of one batched forward (GroupNorm normalises per item; there is no
    batch statistic), so the JVP of the loss vector along `direction` is the vector of per-item dot products.
    """
    with sdpa_kernel(SDPBackend.MATH):  # forward-mode AD is not implemented for the fused CPU attention kernels
        _, dots = jvp(lambda p: denoising_losses(model, p, clean, timesteps, noise, scheduler), (params,),
                      ({name: direction[name] for name in params},))
    return dots


def _mean_loss(
    params: Params, model: nn.Module, clean: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
    scheduler: DDPMScheduler,
) -> torch.Tensor:
    return denoising_losses(model, params, clean, timesteps, noise, scheduler).mean()


def write_values(
    *, model: str, train_data: str, heldout_data: str, out: str, schedule: dict[str, Any] | None = None, seed: int,
    log: Callable[[str], None] = print, **options,
) -> pd.Series:
    """The workflow's In-Run stage: a run from `model` on all training data, validated on the held-out images.

    `options` (steps, batch_size, lr, optimizer, validation_batch_size) go to :func:`contributor_scores`.
    """
    from diffcredit.models import load_model

    tic = time.perf_counter()
    scores = contributor_scores(load_model(model), ContributorData.load(train_data),
                                ContributorData.load(heldout_data).images, seed=derive_seed(seed, "inrun-train"),
                                schedule=schedule, log=log, **options)
    seconds = time.perf_counter() - tic
    log(f"In-Run Data Shapley: {seconds:.1f} s")
    save_values(scores, Path(out), seconds=seconds)
    return scores
