"""The TRAK family for diffusion models, on one streamed random projection (:mod:`.projection`).

Features. For an image x, S timesteps t_s spread evenly over the schedule and noise ε_s shared by every image (train
items and targets alike, so a feature is a deterministic function of the image, as in the D-TRAK code),

    φ(x) = Pᵀ ∇_θ (1/S) Σ_s f(ε_θ(√ᾱ_s x + √(1−ᾱ_s) ε_s, t_s)),

with the output function f either the denoising ``loss`` ‖ε_θ − target‖² (TRAK; Georgiev et al. 2023) or the
``squared_norm`` ‖ε_θ‖² (D-TRAK; Zheng et al. 2024), both pixel means. Journey-TRAK (Georgiev et al. 2023) keeps the
loss features for the training items but takes the targets' features along their sampling trajectories: the sampler's
state x_{t_s} at S evenly spaced sampling steps, each scored with the loss against ε_s, as the SFT-Shapley authors'
baseline code does.

x is what the model family's UNet denoises (:mod:`diffcredit.families`): the image, or its latent (targets are
encoded as the training latents were cached), with ε_θ under the item's conditioning (a caption's text states; the
targets': their prompts) and θ the LoRA's parameters only in the text family. Trajectories are the family's own
sampling (``Family.generate``'s ``on_step``).

Scores, with F [N, k] the training features, φ_T one target's feature and λ = lam · tr(FᵀF)/k (a ridge relative to
the mean eigenvalue, so `lam` means the same for any model or k):

- ``trak``, ``dtrak``, ``journey_trak``: τ_i = φ_T (FᵀF + λI)⁻¹ φ_i;
- ``relative_influence`` (Barshan et al. 2020): τ_i / ‖(FᵀF + λI)⁻¹ φ_i‖;
- ``renormalized_influence`` (Diffusion-ReTrac, Xie et al. 2024): τ_i / ‖φ_i‖, removing the timestep-induced norm;
- ``gradient_similarity``: cos(φ_T, φ_i).

An item's score is the mean over the targets (the full model's generations, or held-out real images); it is positive
when the item's gradient points like the targets', a proponent (higher = more valuable). A contributor's score
aggregates its items: the sum by default (linear datamodel), or the mean or max as in the SFT-Shapley authors' code.
The scores are blind to the property itself: good and bad generations count alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffcredit.attribution import Params, contributor_totals, detached_params, model_output, save_values
from diffcredit.attribution.projection import StreamedProjection
from diffcredit.contributors import ContributorData
from diffcredit.families import Family, family_of
from diffcredit.models import make_scheduler
from diffcredit.seeds import derive_seed
from diffcredit.training import denoising_target, select_device

OUTPUTS = ("loss", "squared_norm")
TARGETS = ("generated", "heldout")


@dataclass(frozen=True)
class Method:
    output: str  # the training items' output function
    journey: bool  # targets along their sampling trajectories
    normalise: str | None  # None, "relative", "renormalized" or "cosine"


METHODS = {
    "trak": Method("loss", False, None),
    "dtrak": Method("squared_norm", False, None),
    "journey_trak": Method("loss", True, None),
    "relative_influence": Method("loss", False, "relative"),
    "renormalized_influence": Method("loss", False, "renormalized"),
    "gradient_similarity": Method("loss", False, "cosine"),
}


@dataclass(frozen=True)
class FeatureSpace:
    """What fixes φ: the model's parameters, the S timesteps, the shared noise and the projection."""

    model: nn.Module
    params: Params
    timesteps: torch.Tensor  # [S]
    noise: torch.Tensor  # [S, C, H, W]
    projection: StreamedProjection
    scheduler: Any
    batch_size: int

    @classmethod
    def build(
        cls,
        model: nn.Module,
        image_shape: tuple[int, ...],
        *,
        projection_dim: int,
        timesteps: int,
        seed: int,
        schedule: dict | None = None,
        batch_size: int = 32,
        projection: str = "gaussian",
        device: str | None = None,
    ) -> FeatureSpace:
        if timesteps < 1 or batch_size < 1:
            raise ValueError(f"need timesteps, batch_size >= 1; got {timesteps}, {batch_size}")
        scheduler = make_scheduler("ddpm", schedule)
        n_train = scheduler.config.num_train_timesteps
        if timesteps > n_train:
            raise ValueError(f"timesteps={timesteps} exceeds the schedule's {n_train} training timesteps")
        target_device = select_device(device or "auto")
        model.to(target_device).eval()
        steps = torch.linspace(0, n_train - 1, timesteps).round().long().to(target_device)
        generator = torch.Generator().manual_seed(derive_seed(seed, "trak-noise"))
        noise = torch.randn((timesteps, *image_shape), generator=generator).to(target_device)
        params = detached_params(model)  # for a LoRA model: the adapter's parameters only
        sizes = {name: p.numel() for name, p in params.items()}
        return cls(
            model,
            params,
            steps,
            noise,
            StreamedProjection(sizes, projection_dim, derive_seed(seed, "trak-projection"), projection),
            scheduler,
            batch_size,
        )

    def image_features(self, inputs: np.ndarray, output: str, conditions: torch.Tensor | None = None) -> torch.Tensor:
        """φ of every input (float32 [N, ...], what the UNet denoises) for output function `output`: float32 [N, k].
        `conditions` [N, L, D]: each input's ``encoder_hidden_states`` for a conditional UNet."""
        if output not in OUTPUTS:
            raise ValueError(f"unknown output function {output!r}; use one of {', '.join(OUTPUTS)}")
        steps, noise, scheduler = self.timesteps, self.noise, self.scheduler

        def f(p: Params, clean: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
            clean = clean.expand(len(steps), *clean.shape)  # one input, at every feature timestep
            prediction = model_output(
                self.model, p, scheduler.add_noise(clean, noise, steps), steps, _repeat(condition, len(steps))
            )
            if output == "squared_norm":
                return prediction.pow(2).mean()
            return (prediction - denoising_target(scheduler, clean, noise, steps)).pow(2).mean()

        return self._features(f, torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)), conditions)

    def trajectory_features(
        self, states: torch.Tensor, times: torch.Tensor, conditions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Journey-TRAK φ of trajectories: `states` [M, S, ...] are the sampler's states at timesteps `times` [S]
        (`conditions` [M, L, D]: each trajectory's conditioning); float32 [M, k]."""
        if self.scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                "Journey-TRAK scores trajectory states against the shared noise: it needs an epsilon-"
                f"prediction schedule, not {self.scheduler.config.prediction_type!r}"
            )
        if states.shape[1] != len(self.noise):
            raise ValueError(f"{states.shape[1]} states per trajectory but {len(self.noise)} feature timesteps")
        noise, times = self.noise, times.to(self.noise.device)

        def f(p: Params, state: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
            prediction = model_output(self.model, p, state, times, _repeat(condition, len(times)))
            return (prediction - noise).pow(2).mean()

        return self._features(f, states, conditions)

    def _features(self, f: Callable, inputs: torch.Tensor, conditions: torch.Tensor | None) -> torch.Tensor:
        columns = [inputs]
        if conditions is not None:
            if len(conditions) != len(inputs):
                raise ValueError(f"{len(conditions)} conditionings for {len(inputs)} inputs: give one per input")
            columns.append(torch.as_tensor(conditions, dtype=torch.float32))
        per_item_grad = vmap(grad(f), in_dims=(None, *[0] * len(columns)))  # per-item gradients of every tensor
        rows = []
        with sdpa_kernel(SDPBackend.MATH):  # torch.func cannot differentiate the fused CPU attention kernels
            for batch in zip(*(column.split(self.batch_size) for column in columns), strict=True):
                gradients = per_item_grad(self.params, *(part.to(self.noise.device) for part in batch))
                rows.append(self.projection.project(gradients))
        return torch.cat(rows) if rows else torch.zeros((0, self.projection.dim))


def _repeat(condition: torch.Tensor | None, times: int) -> torch.Tensor | None:
    """One item's conditioning [L, D], once per timestep [S, L, D] (None: unconditional)."""
    return None if condition is None else condition.expand(times, *condition.shape)


def sampling_trajectories(
    family: Family,
    model: nn.Module,
    n: int,
    *,
    steps: int,
    seed: int,
    sampler: str = "ddim",
    inference_steps: int = 50,
    device: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `n` images of `model` as ``family.generate`` does (starting noise of item i from ``(seed, i)``),
    keeping the sampler's state at `steps` evenly spaced sampling steps: states [n, steps, ...] and their
    timesteps [steps]."""
    if inference_steps < steps:
        raise ValueError(
            f"inference_steps={inference_steps} gives fewer sampling steps than the {steps} feature timesteps"
        )
    kept = torch.linspace(0, inference_steps - 1, steps).round().long().tolist()
    states: dict[int, list[np.ndarray]] = {i: [] for i in kept}  # step -> that state of each batch, in order
    times: dict[int, int] = {}

    def keep(i: int, t: torch.Tensor, sample: torch.Tensor) -> None:
        if i in states:
            states[i].append(sample.cpu().numpy().copy())  # out of inference mode: autograd may use it
            times[i] = int(t)

    family.generate(model, n, seed=seed, sampler=sampler, inference_steps=inference_steps, device=device, on_step=keep)
    trajectories = np.stack([np.concatenate(states[i]) for i in kept], axis=1)
    return torch.from_numpy(trajectories), torch.tensor([times[i] for i in kept])


def item_scores(
    train: torch.Tensor, targets: torch.Tensor, *, normalise: str | None = None, lam: float = 1e-2
) -> np.ndarray:
    """Mean score over the targets [M, k] of every training item [N, k] (see the module docstring)."""
    if not lam > 0:
        raise ValueError(f"lam={lam}: the relative ridge must be > 0 (e.g. 1e-2)")
    if len(targets) == 0:
        raise ValueError("no target features: give at least one target")
    train, targets = train.double(), targets.double()
    if normalise == "cosine":
        unit = torch.nn.functional.normalize
        return (unit(targets, dim=1) @ unit(train, dim=1).T).mean(0).cpu().numpy()
    kernel = train.T @ train
    dim = kernel.shape[0]
    ridge = lam * kernel.trace() / dim
    weighted = torch.linalg.solve(
        kernel + ridge * torch.eye(dim, dtype=kernel.dtype, device=kernel.device), train.T
    )  # (FᵀF + λI)⁻¹ φ_i, one column per item
    scores = targets.mean(0) @ weighted  # τ is linear in φ_T: the mean target's scores are the mean scores
    if normalise == "relative":
        scores = scores / weighted.norm(dim=0)
    elif normalise == "renormalized":
        scores = scores / train.norm(dim=1)
    elif normalise is not None:
        raise ValueError(f"unknown normalisation {normalise!r}")
    return scores.cpu().numpy()


def contributor_scores(
    method: str,
    model: nn.Module,
    data: ContributorData,
    targets: np.ndarray | None = None,
    *,
    seed: int,
    lam: float = 1e-2,
    aggregate_by: str = "sum",
    **settings,
) -> pd.Series:
    """Score of each contributor by `method` (a key of :data:`METHODS`) for `targets` (pixel images, float32
    [M, C, H, W]).

    `settings` are :func:`compute_features`'s (family, target_conditions, projection_dim, timesteps,
    n_trajectories, sampler, inference_steps, and :meth:`FeatureSpace.build`'s batch_size, projection, device).
    Journey-TRAK ignores `targets`: it samples `n_trajectories` trajectories of `model` itself.
    """
    spec = _method(method)
    features = compute_features(model, data, targets, output=spec.output, journey=spec.journey, seed=seed, **settings)
    return score_features(method, features, data, lam=lam, aggregate_by=aggregate_by)


def compute_features(
    model: nn.Module,
    data: ContributorData,
    targets: np.ndarray | None,
    *,
    output: str,
    journey: bool = False,
    family: Family | None = None,
    schedule: dict | None = None,
    target_conditions: torch.Tensor | None = None,
    projection_dim: int = 256,
    timesteps: int = 10,
    seed: int,
    n_trajectories: int = 64,
    sampler: str = "ddim",
    inference_steps: int = 50,
    **space,
) -> dict[str, torch.Tensor]:
    """``train`` [N, k], ``targets`` [M, k] (when targets are given) and ``journey`` [M', k] (when asked).

    The features live where `family`'s UNet denoises (None: the pixel family of `schedule`): the training items
    are its inputs under their own conditioning, the pixel `targets` are encoded the family's way and conditioned
    by `target_conditions` (:meth:`Family.generation_conditions` for its generations), and the trajectories are
    the family's own sampling, each under its prompt."""
    images = data.images
    if targets is not None:
        targets = np.asarray(targets, dtype=np.float32)
        if len(targets) == 0 or targets.shape[1:] != images.shape[1:]:
            raise ValueError(f"targets of shape {targets.shape} do not match the training images {images.shape[1:]}")
    if family is None:
        family = family_of(None, tuple(images.shape[1:]), schedule=schedule)
    inputs = family.inputs(data)
    fs = FeatureSpace.build(
        model,
        inputs.shape[1:],
        projection_dim=projection_dim,
        timesteps=timesteps,
        seed=seed,
        schedule=family.schedule,
        **space,
    )
    features = {"train": fs.image_features(inputs, output, family.conditions(data))}
    if targets is not None:
        features["targets"] = fs.image_features(family.encode(targets), output, target_conditions)
    if journey:
        states, times = sampling_trajectories(
            family,
            model,
            n_trajectories,
            steps=timesteps,
            seed=derive_seed(seed, "journey-trajectories"),
            sampler=sampler,
            inference_steps=inference_steps,
            device=space.get("device"),
        )
        features["journey"] = fs.trajectory_features(states, times, family.generation_conditions(n_trajectories))
    return features


def score_features(
    method: str,
    features: dict[str, torch.Tensor],
    data: ContributorData,
    *,
    lam: float = 1e-2,
    aggregate_by: str = "sum",
) -> pd.Series:
    """Contributor scores of `method` from computed features (see :func:`compute_features`)."""
    spec = _method(method)
    targets = features["journey" if spec.journey else "targets"]
    scores = item_scores(features["train"], targets, normalise=spec.normalise, lam=lam)
    return contributor_totals(scores, data, aggregate_by)


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown TRAK-family method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]


def write_features(
    *,
    output: str,
    model: str,
    train_data: str,
    out: str,
    target: str = "generated",
    heldout_data: str | None = None,
    family: dict | None = None,
    n_targets: int = 256,
    n_trajectories: int = 64,
    inference_steps: int = 50,
    sampler: str = "ddim",
    schedule: dict[str, Any] | None = None,
    seed: int,
    projection_dim: int = 256,
    timesteps: int = 10,
    batch_size: int = 32,
    projection: str = "gaussian",
    log: Callable[[str], None] = print,
) -> None:
    """The workflow's feature stage: projected gradients of the training items and the targets, as an npz.

    `target`: ``generated`` (`n_targets` samples of `model` under the run's generation noise, as the coalitions use)
    or ``heldout`` (the first `n_targets` held-out real images). The ``loss`` features also hold those of
    `n_trajectories` sampling trajectories of `model` (Journey-TRAK's targets, on the same projection). `family`:
    the run's model family (:func:`diffcredit.stages.model_family`; None: pixel, of `schedule`).
    """
    from diffcredit.attribution.similarity import targets_for
    from diffcredit.io import save_npz
    from diffcredit.stages import model_family

    if target not in TARGETS:
        raise ValueError(f"unknown TRAK target {target!r}: choose one of {', '.join(TARGETS)}")
    if target == "heldout" and heldout_data is None:
        raise ValueError("TRAK target 'heldout' needs heldout_data (the held-out real images)")
    tic = time.perf_counter()
    data = ContributorData.load(train_data)
    kind = model_family(data, family, schedule=schedule)
    full = kind.load(model)
    # The generated targets and Journey-TRAK's trajectories come from the same sampler under the same seed.
    generation = {"seed": seed, "inference_steps": inference_steps, "sampler": sampler}
    targets = targets_for(
        target=target, family=kind, model=full, heldout_data=heldout_data, n_targets=n_targets, **generation
    )
    device = select_device("auto")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    features = compute_features(
        full,
        data,
        targets,
        output=output,
        journey=output == "loss",
        family=kind,
        target_conditions=_target_conditions(kind, target, heldout_data, len(targets)),
        projection_dim=projection_dim,
        timesteps=timesteps,
        n_trajectories=n_trajectories,
        batch_size=batch_size,
        projection=projection,
        **generation,
    )
    seconds = time.perf_counter() - tic
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else -1
    log(
        f"TRAK features ({output}, k={projection_dim}) of {len(features['train'])} items and {len(targets)} "
        f"{target} targets: {seconds:.1f} s" + (f", peak GPU memory {peak / 2**20:.0f} MiB" if peak >= 0 else "")
    )
    save_npz(
        out,
        seconds=np.float64(seconds),
        peak_gpu_bytes=np.int64(peak),
        **{name: value.cpu().numpy() for name, value in features.items()},
    )


def _target_conditions(family: Family, target: str, heldout_data: str | None, n: int) -> torch.Tensor | None:
    """The conditioning of the `n` targets: the generation prompts' or the held-out images' captions (None:
    unconditional)."""
    if target == "generated":
        return family.generation_conditions(n)
    conditions = family.conditions(ContributorData.load(heldout_data))
    return conditions[:n] if conditions is not None else None


def write_values(
    *,
    method: str,
    features: str,
    train_data: str,
    out: str,
    lam: float = 1e-2,
    aggregate: str = "sum",
    log: Callable[[str], None] = print,
) -> pd.Series:
    """The workflow's scoring stage: one method's contributor scores from the features npz."""
    tic = time.perf_counter()
    with np.load(features) as stored:
        arrays = {name: torch.from_numpy(stored[name]) for name in ("train", "targets", "journey") if name in stored}
        feature_seconds = float(stored["seconds"])
    if _method(method).journey and "journey" not in arrays:
        raise ValueError(f"{features} has no Journey-TRAK trajectory features; recompute it with journey=True")
    scores = score_features(method, arrays, ContributorData.load(train_data), lam=lam, aggregate_by=aggregate)
    seconds = feature_seconds + time.perf_counter() - tic
    log(f"{method}: {seconds:.1f} s (features and scoring)")
    save_values(scores, Path(out), seconds=seconds)
    return scores
