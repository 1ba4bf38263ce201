"""Structural pruning of a diffusers UNet with torch-pruning: the paper's one-shot recipe and its fix-ups.

``ratio`` is torch-pruning's channel ratio: every prunable layer loses that share of its channels (per GroupNorm
group and per attention head, so groups and heads stay equal). Convolutions lose channels on both sides, so the
share of parameters removed is about ``1 - (1 - ratio)**2`` (0.5 -> ~0.75, the paper's 0.3 -> ~0.5).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

from diffcredit.models import make_scheduler, sync_channel_attributes

IMPORTANCES = ("magnitude", "taylor", "diff-pruning")


def prune(
    model: UNet2DModel,
    ratio: float,
    *,
    importance: str = "magnitude",
    images: np.ndarray | None = None,
    seed: int = 0,
    schedule: dict[str, Any] | None = None,
    batch_size: int = 64,
    threshold: float = 0.05,
) -> UNet2DModel:
    """Return a pruned copy of ``model`` (which is left unchanged), on the model's device.

    Importance: ``magnitude`` (L2 norm of the weights, the paper's choice), ``taylor`` (first-order Taylor, gradients
    of the denoising loss summed over all timesteps) or ``diff-pruning`` (Fang et al. 2023: Taylor over the timesteps
    from 0 until the loss falls below ``threshold`` times its maximum). The gradient-based ones use up to
    ``batch_size`` of ``images`` with one seeded noise draw.

    Raises:
        ValueError: if pruning would leave a GroupNorm group with a single channel. Such a group normalises away the
            per-channel time embedding added just before it, so the model stops depending on the timestep and its
            samples stay noise while the training loss looks normal. Lower ``ratio`` or ``norm_num_groups``.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; use one of {', '.join(IMPORTANCES)}")
    if importance != "magnitude" and (images is None or len(images) == 0):
        raise ValueError(f"importance {importance!r} needs training images (images=...) to compute gradients")

    pruned = copy.deepcopy(model).eval()
    _check_groups(pruned, ratio)
    device = next(pruned.parameters()).device
    sample_size = pruned.config.sample_size
    example = {
        "sample": torch.zeros(1, pruned.config.in_channels, sample_size, sample_size, device=device),
        "timestep": torch.ones(1, dtype=torch.long, device=device),
    }
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=_importance(importance),
        pruning_ratio=ratio,
        ignored_layers=[pruned.conv_out],  # the output must keep the image's channels
        # q, k and v are pruned alike within every head, so the attention keeps its head count
        num_heads={
            linear: attention.heads
            for attention in pruned.modules()
            if isinstance(attention, Attention)
            for linear in (attention.to_q, attention.to_k, attention.to_v)
        },
    )
    if importance != "magnitude":
        _accumulate_gradients(pruned, images, seed, schedule, batch_size, importance, threshold)
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    sync_channel_attributes(pruned)  # Upsample2D/Downsample2D assert their stale `channels` in forward
    return pruned


def _importance(name: str) -> tp.importance.Importance:
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    # As in the Diff-Pruning code: the Taylor baseline scores the group jointly, Diff-Pruning weight by weight.
    return tp.importance.TaylorImportance(multivariable=name == "taylor")


def _check_groups(model: nn.Module, ratio: float) -> None:
    """Refuse a ratio that would leave one channel per GroupNorm group (torch-pruning keeps groups equal)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.GroupNorm):
            per_group = module.num_channels // module.num_groups
            kept = int(per_group * (1 - ratio))
            if kept < 2:
                raise ValueError(
                    f"pruning ratio {ratio} would leave {kept} channel(s) per group in GroupNorm {name!r} "
                    f"({module.num_channels} channels, {module.num_groups} groups): the model would ignore the "
                    "timestep. Use a lower ratio or fewer groups (norm_num_groups)."
                )


def _accumulate_gradients(
    model: UNet2DModel,
    images: np.ndarray,
    seed: int,
    schedule: dict[str, Any] | None,
    batch_size: int,
    importance: str,
    threshold: float,
) -> None:
    """Sum the denoising-loss gradients over timesteps 0, 1, ... into ``.grad`` for the Taylor importances."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(images), generator=generator)[:batch_size]
    device = next(model.parameters()).device
    clean = torch.from_numpy(np.asarray(images, dtype=np.float32))[chosen].to(device)
    noise = torch.randn(clean.shape, generator=generator).to(device)
    scheduler = make_scheduler("ddpm", schedule)
    model.zero_grad(set_to_none=True)
    loss_max = 0.0
    for t in range(scheduler.config.num_train_timesteps):
        timesteps = torch.full((len(clean),), t, dtype=torch.long, device=device)
        loss = F.mse_loss(model(scheduler.add_noise(clean, noise, timesteps), timesteps).sample, noise)
        loss.backward()
        loss_max = max(loss_max, loss.item())
        if importance == "diff-pruning" and loss.item() < threshold * loss_max:
            break  # later timesteps are mostly noise and barely constrain the weights
