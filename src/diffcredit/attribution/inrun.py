"""In-Run Data Shapley (Wang, Mittal, Song & Jia 2024), first and second order, accumulated during a training run.

At step t SGD updates w_{t+1} = w_t − η Σ_{z∈B_t} g_z with g_z = ∇ℓ(w_t, z) and η = lr_t/|B_t| (the step size the
optimiser applied, times the gradient-clipping factor, over the batch size of the mean loss). The utility of a subset
S of the batch is the validation-loss reduction U(S) = L_val(w_t) − L_val(w_t − η g_S); to second order

    U(S) ≈ η ∇L_val·g_S − (η²/2) g_Sᵀ H_val g_S,

a quadratic game whose Shapley values are exact (their Theorem 4): the linear term goes to each item and each
pairwise term is split evenly, so

    φ_z(t) = η ∇L_val·g_z  −  (η²/2) g_zᵀ H_val (Σ_{j∈B_t} g_j)       (first order + second order)

and Σ_z φ_z(t) is the second-order Taylor expansion of the step's actual loss reduction. Values add up over the
steps in which z is in the batch; higher = more helpful. A group's Shapley value in each step's game is the sum of its
items' (the game is quadratic), so a contributor's value is the sum over its items, at either order.

How it is computed: the run itself calls :class:`InRunShapley` through ``training.train(observer=...)`` before each
step's forward pass, at w_t. ∇L_val is one backward pass and H_val (Σ g_j) a second one through it (double backward,
:class:`ValidationGradient`); Σ g_j and the per-item dot products g_z·v come from one training-mode forward pass and
a double backward (:class:`BatchGradients`).

Dropout: the dot products and Σ g_j must see the masks the step's update sees. The observer records the random state
before the step, replays it for its own training-mode forward pass (plain autograd, the same ops as the step: forward
mode AD and vmap draw other masks) and restores it, so the training forward pass that follows draws the same masks
(and the run is bit-identical with and without the observer). The validation
loss is taken in eval mode (no dropout), as the quantity being credited.

Validation objective: the mean denoising loss of the held-out images (FID's reference; or the user's reference set),
each with one (t, ε) drawn once for the whole run, so it is one fixed function of w. It is taken where the UNet
trains (:func:`observer_for`): a latent family's on the images' latents, a text family's under each held-out image's
caption, whose run trains the LoRA alone (so g and H_val are over the LoRA's parameters only, the base being
frozen).

Optimiser: exact under SGD (``train.optimizer: sgd``); under Adam the update is a preconditioned, momentum-averaged
gradient, and the same formula with η = lr/|B| is only a proxy (the values keep their sign and relative order only
as far as Adam's step points along the gradient). With ``ema_decay`` the saved model is the EMA of the trajectory;
the values credit the trajectory.

Cost per step, beside the step itself: a validation forward and backward (and a second backward for H_val v), and a
batch forward with a double backward. Measured on the digits UNet (CPU, batch 64, 128 validation images): a step with
the observer costs ~4x a plain step at first order and ~9x at second order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import DDPMScheduler
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffcredit.attribution import Params, contributor_totals, detached_params, model_output, save_values
from diffcredit.contributors import ContributorData
from diffcredit.families import Family
from diffcredit.models import make_scheduler
from diffcredit.seeds import derive_seed
from diffcredit.training import denoising_target

ORDERS = (1, 2)
OBSERVER_OPTIONS = ("order", "validation_batch_size")  # the keywords of a run's settings that go to the observer


class InRunShapley:
    """An observer for :func:`diffcredit.training.train` that accumulates φ of every training item over the run.

    ``first`` and ``second`` hold the two orders' totals per item (indices of the images given to ``train``).
    """

    def __init__(
        self,
        n_items: int,
        validation_images: np.ndarray,
        *,
        seed: int,
        order: int = 2,
        validation_batch_size: int | None = None,
        schedule: dict[str, Any] | None = None,
        validation_conditions: torch.Tensor | None = None,
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"order={order}: In-Run Data Shapley is implemented to order 1 or 2")
        validation_images = np.asarray(validation_images, dtype=np.float32)
        n_val = len(validation_images)
        if n_val == 0:
            raise ValueError("In-Run Data Shapley needs validation images (the held-out or reference set)")
        if validation_batch_size is not None and validation_batch_size < 1:
            raise ValueError(f"validation_batch_size={validation_batch_size}: choose at least 1, or None (all)")
        if validation_conditions is not None and len(validation_conditions) != n_val:
            raise ValueError(f"{len(validation_conditions)} validation conditionings for {n_val} validation images")
        self.val_conditions = validation_conditions
        # A batch as large as the validation set is all of it (as the TRAK targets are "the first n_targets").
        self.order = order
        self.validation_batch_size = (
            None if validation_batch_size is None or validation_batch_size >= n_val else validation_batch_size
        )
        self.scheduler = make_scheduler("ddpm", schedule)
        generator = torch.Generator().manual_seed(derive_seed(seed, "inrun-validation"))
        self.val = torch.from_numpy(validation_images)
        self.val_noise = torch.randn(self.val.shape, generator=generator)
        self.val_timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (n_val,), generator=generator)
        self.subsets = generator  # the per-step validation subsets continue this stream
        self.first, self.second = np.zeros(n_items), np.zeros(n_items)
        self.steps = 0

    @classmethod
    def for_run(cls, n_items: int, validation_images: np.ndarray, *, seed: int, **options: Any) -> InRunShapley:
        """The observer of a training run seeded `seed` (its validation draws derive from it); `options` as
        the constructor's (order, validation_batch_size, schedule, validation_conditions)."""
        return cls(n_items, validation_images, seed=derive_seed(seed, "inrun"), **options)

    def validation_loss(
        self, model: nn.Module, params: Params | None = None, chosen: Any = slice(None)
    ) -> torch.Tensor:
        """L_val at `params` (default: the model's own), in eval mode."""
        was_training = model.training
        model.eval()
        try:
            params = params if params is not None else detached_params(model)
            batch = self._validation_batch(chosen, next(model.parameters()).device)
            return denoising_losses(model, params, *batch).mean()
        finally:
            model.train(was_training)

    def _validation_batch(self, chosen: Any, device: torch.device) -> tuple:
        """L_val's data: the `chosen` validation images with their fixed (t, ε) on `device`, the schedule and the
        images' conditioning (None: unconditional)."""
        return (
            self.val[chosen].to(device),
            self.val_timesteps[chosen].to(device),
            self.val_noise[chosen].to(device),
            self.scheduler,
            self.val_conditions[chosen].to(device) if self.val_conditions is not None else None,
        )

    def __call__(
        self, model: nn.Module, index: torch.Tensor, clean: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor
    ) -> Callable[[float], None]:
        if len(clean) != len(index) or index.max() >= len(self.first):
            raise ValueError(
                f"batch of {len(clean)} items with indices up to {int(index.max())} does not fit the "
                f"{len(self.first)} items this observer was made for"
            )
        device = clean.device
        chosen = (
            torch.randperm(len(self.val), generator=self.subsets)[: self.validation_batch_size]
            if self.validation_batch_size is not None
            else slice(None)
        )
        replay = _RandomState(device)
        model.eval()
        validation = ValidationGradient(model, *self._validation_batch(chosen, device), curvature=self.order == 2)
        model.train()
        with replay:  # the step's dropout masks
            batch = BatchGradients(model, clean, timesteps, noise, self.scheduler)
        first = batch.dots(validation.grad)
        second = batch.dots(validation.hvp(batch.total)) if self.order == 2 else None
        replay.restore()  # the step's own forward pass draws the masks the observer used
        items = index.cpu().numpy()

        def finish(lr: float) -> None:
            eta = lr / len(clean)
            np.add.at(self.first, items, eta * first.double().cpu().numpy())  # an item may recur in a batch
            if second is not None:
                np.add.at(self.second, items, -0.5 * eta**2 * second.double().cpu().numpy())
            self.steps += 1

        return finish

    def table(self, data: ContributorData) -> pd.DataFrame:
        """Contributor values: ``value`` (to the observer's order), ``first_order``, ``second_order``."""
        first = contributor_totals(self.first, data)
        second = contributor_totals(self.second, data)
        return pd.DataFrame({"value": first + second, "first_order": first, "second_order": second})


class _RandomState:
    """The global random state (CPU, and the CUDA device's) at creation: ``with`` sets it, :meth:`restore` too."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def __enter__(self) -> None:
        self.restore()

    def __exit__(self, *exc: object) -> None:
        return None


def denoising_losses(
    model: nn.Module,
    params: Params,
    clean: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    scheduler: DDPMScheduler,
    conditions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-item denoising loss ℓ(w, z) [B] at the given (t, ε) (under ``conditions``, a conditional UNet's
    ``encoder_hidden_states``): the training loss before the batch mean."""
    prediction = model_output(model, params, scheduler.add_noise(clean, noise, timesteps), timesteps, conditions)
    return _item_losses(prediction, clean, timesteps, noise, scheduler)


def _item_losses(
    prediction: torch.Tensor,
    clean: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    scheduler: DDPMScheduler,
) -> torch.Tensor:
    """Per-item mean squared error of a prediction against the schedule's denoising target [B]."""
    return (prediction - denoising_target(scheduler, clean, noise, timesteps)).pow(2).flatten(1).mean(1)


def _trainable(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """The names and tensors of the parameters a training step updates (those that require gradients)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [name for name, _ in named], [p for _, p in named]


class ValidationGradient:
    """∇L_val at the model's weights, and with `curvature` the Hessian-vector products H_val v (double backward)."""

    def __init__(
        self,
        model: nn.Module,
        clean: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        scheduler: DDPMScheduler,
        conditions: torch.Tensor | None = None,
        *,
        curvature: bool,
    ) -> None:
        self.names, self.weights = _trainable(model)
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            params = dict(zip(self.names, self.weights, strict=True))
            loss = denoising_losses(model, params, clean, timesteps, noise, scheduler, conditions).mean()
            self.grads = torch.autograd.grad(loss, self.weights, create_graph=curvature)
        self.grad = {name: g.detach() for name, g in zip(self.names, self.grads, strict=True)}

    def hvp(self, vector: Params) -> Params:
        with sdpa_kernel(SDPBackend.MATH):
            products = torch.autograd.grad(
                self.grads, self.weights, grad_outputs=[vector[n] for n in self.names], retain_graph=True
            )
        return {name: h.detach() for name, h in zip(self.names, products, strict=True)}


class BatchGradients:
    """Σ_j g_j of a batch and the per-item dot products g_i·v, from one training-mode forward pass.

    u(c) = ∇_w Σ_j c_j ℓ(w, z_j) is kept differentiable in c, so ∂(u·v)/∂c_i = g_i·v for any v by one more backward
    pass (reverse over reverse). Unlike forward mode or vmap, this is the very autograd forward of a training step:
    it draws the step's dropout masks exactly as the step does (same ops, same random state).
    """

    def __init__(
        self,
        model: nn.Module,
        clean: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        scheduler: DDPMScheduler,
    ) -> None:
        self.names, weights = _trainable(model)
        self.coefficients = torch.ones(len(clean), device=clean.device, requires_grad=True)
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            prediction = model(scheduler.add_noise(clean, noise, timesteps), timesteps).sample
            losses = _item_losses(prediction, clean, timesteps, noise, scheduler)
            self.grads = torch.autograd.grad((self.coefficients * losses).sum(), weights, create_graph=True)
        self.total = {name: g.detach() for name, g in zip(self.names, self.grads, strict=True)}

    def dots(self, direction: Params) -> torch.Tensor:
        """g_i · `direction` for every item i of the batch [B]."""
        with sdpa_kernel(SDPBackend.MATH):
            inner = sum((g * direction[name]).sum() for name, g in zip(self.names, self.grads, strict=True))
            return torch.autograd.grad(inner, self.coefficients, retain_graph=True)[0].detach()


def item_scores(
    model: nn.Module,
    images: np.ndarray,
    validation_images: np.ndarray,
    *,
    seed: int,
    schedule: dict[str, Any] | None = None,
    **settings,
) -> InRunShapley:
    """Train `model` in place on `images` while accumulating In-Run Data Shapley; returns the observer.

    `settings`: the observer's :data:`OBSERVER_OPTIONS` (order, validation_batch_size; see :class:`InRunShapley`) and
    :func:`diffcredit.training.train`'s (e.g. steps, batch_size, lr, optimizer, grad_clip).
    """
    from diffcredit.training import train

    options, training = _observer_options(settings)
    observer = InRunShapley.for_run(len(images), validation_images, seed=seed, schedule=schedule, **options)
    train(model, images, seed=seed, schedule=schedule, observer=observer, **training)
    return observer


def observer_for(
    family: Family, train_data: ContributorData, validation_data: str, *, seed: int, **options: Any
) -> InRunShapley:
    """The observer the workflow's training of the full model in `family` carries, validated on `validation_data`
    where the family's UNet trains (its latents, under each image's caption) with the family's schedule; `options`
    as :class:`InRunShapley`'s (order, validation_batch_size)."""
    validation = ContributorData.load(validation_data)
    return InRunShapley.for_run(
        len(train_data),
        family.encode(validation.images),
        seed=seed,
        schedule=family.schedule,
        validation_conditions=family.conditions(validation),
        **options,
    )


def _observer_options(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`settings` split into the observer's options and the training's."""
    options = {key: value for key, value in settings.items() if key in OBSERVER_OPTIONS}
    return options, {key: value for key, value in settings.items() if key not in OBSERVER_OPTIONS}


def write_values(
    observer: InRunShapley, data: ContributorData, *, out: str, first_order_out: str | None = None, seconds: float
) -> pd.DataFrame:
    """``values.csv`` of In-Run Data Shapley (value = first + second order) and, optionally, of the first order."""
    table = observer.table(data)
    save_values(
        table["value"],
        Path(out),
        first_order=table["first_order"],
        second_order=table["second_order"],
        steps=observer.steps,
        seconds=seconds,
    )
    if first_order_out is not None:
        save_values(table["first_order"], Path(first_order_out), steps=observer.steps, seconds=seconds)
    return table


def replay_values(
    *,
    train_data: str,
    heldout_data: str,
    full_model: str,
    out: str,
    first_order_out: str | None = None,
    unet: dict | None = None,
    schedule: dict | None = None,
    family: dict | None = None,
    seed: int,
    log: Callable[[str], None] = print,
    **settings,
) -> pd.DataFrame:
    """In-Run Data Shapley of the full model's training run, replayed: the same initial weights, seed and recipe as
    :func:`diffcredit.stages.train_full` in the run's `family` (None: pixel, of `unet` and `schedule`), so the run is
    the one that produced `full_model` (checked and logged). `settings`: the observer's options (order,
    validation_batch_size) and the training's, as for :func:`item_scores`."""
    from diffcredit.stages import model_family

    tic = time.perf_counter()
    data = ContributorData.load(train_data)
    kind = model_family(data, family, unet=unet, schedule=schedule)
    model = kind.build(seed=derive_seed(seed, "full-init"))
    options, training = _observer_options(settings)
    observer = observer_for(kind, data, heldout_data, seed=seed, **options)
    kind.fit(model, data, seed=derive_seed(seed, "full-train"), observer=observer, **training)
    saved = kind.load(full_model).state_dict()
    gap = max(float((tensor.cpu() - saved[name].cpu()).abs().max()) for name, tensor in model.state_dict().items())
    log(f"replayed run ends {gap:.3g} (max abs weight difference) from the saved full model")
    seconds = time.perf_counter() - tic
    log(f"In-Run Data Shapley over {observer.steps} steps: {seconds:.1f} s")
    return write_values(observer, data, out=out, first_order_out=first_order_out, seconds=seconds)
