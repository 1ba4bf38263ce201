"""Diffusion models and noise schedules built from JSON-able configs, saved as safetensors + JSON.

A pruned model no longer matches its config, and diffusers' ``save_pretrained``/``from_pretrained`` cannot rebuild it.
So :func:`save_model` also records every parameter's shape, and :func:`load_model` builds the model from its config,
shrinks each tensor to the saved shape and then loads the weights. Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.models.downsampling import Downsample2D
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.upsampling import Upsample2D
from safetensors.torch import load_file, save_file
from torch import nn

from diffcredit.io import atomic_dir

WEIGHTS = "model.safetensors"
ARCHITECTURE = "architecture.json"
# The raw (not averaged) parameters of a run with an EMA, beside its averaged ones: the SFT-Shapley authors start each
# fine-tune from their checkpoint's raw weights and average from there.
RAW_WEIGHTS = "raw.safetensors"

DEFAULT_SCHEDULE: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def digits_unet_config(sample_size: int = 8, channels: int = 1) -> dict[str, Any]:
    """``UNet2DModel`` kwargs of the embedded default: a small DDPM for 8×8 digits.

    Channels 32/64/64 with attention at the middle resolution. ``norm_num_groups=8`` (not diffusers' 32) leaves
    4-8 channels per GroupNorm group, so pruning half the channels keeps at least 2 per group; with one channel per
    group the normalisation removes the per-channel time embedding and the model ignores the timestep.
    """
    return {
        "sample_size": sample_size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 8,
    }


def tiny_unet_config(sample_size: int = 8, channels: int = 1) -> dict[str, Any]:
    """A two-level ``UNet2DModel`` small enough that a test or a script check runs in seconds on one core: 8/16
    channels, 4 and 8 per GroupNorm group, attention (2 heads) at the lower resolution, with both a Downsample2D and an
    Upsample2D (so pruning and every block type are exercised)."""
    return {
        "sample_size": sample_size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 2,
        "attention_head_dim": 8,
    }


def unet_config_for(image_shape: tuple[int, ...], overrides: dict | None = None) -> dict:
    """The UNet config for images of `image_shape` (items, channels, height, width): the digits default with the
    user's overrides on top."""
    _, channels, height, width = image_shape
    if height != width:
        raise ValueError(f"images are {height}x{width}: the UNet needs square images; crop or resize them first")
    return {**digits_unet_config(sample_size=height, channels=channels), **(overrides or {})}


def model_class(config: dict[str, Any]) -> type[ModelMixin]:
    """The diffusers model class named by ``config["_class_name"]`` (default ``UNet2DModel``)."""
    name = config.get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise ValueError(f"_class_name {name!r} is not a diffusers model class (e.g. UNet2DModel)")
    return cls


def build_model(config: dict[str, Any], seed: int | None = None) -> UNet2DModel:
    """Build a freshly initialised model; with ``seed``, the initial weights depend on it alone."""
    kwargs = {key: value for key, value in config.items() if not key.startswith("_")}
    with torch.random.fork_rng(devices=[]):  # leave the caller's global random state untouched
        if seed is not None:
            torch.manual_seed(seed)
        return model_class(config)(**kwargs)


def make_scheduler(sampler: str, schedule: dict[str, Any] | None = None) -> DDPMScheduler | DDIMScheduler:
    """A diffusers scheduler (``ddpm`` or ``ddim``) over :data:`DEFAULT_SCHEDULE` updated by ``schedule``."""
    if sampler not in SCHEDULERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[sampler](**{**DEFAULT_SCHEDULE, **(schedule or {})})


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(parameter.numel() for parameter in model.parameters())


def save_model(model: ModelMixin, directory: str | Path, raw: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model.safetensors`` and ``architecture.json`` (config + tensor shapes) into ``directory``, and with
    ``raw`` (the parameters before the EMA replaced them, :attr:`training.TrainingResult.raw_weights`) ``raw.safetensors``.

    The files are written to a temporary sibling directory that then replaces ``directory``.
    """
    directory = Path(directory)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    config = {key: value for key, value in dict(model.config).items() if not key.startswith("_")}
    architecture = {
        "config": {"_class_name": type(model).__name__, **config},
        "shapes": {name: list(tensor.shape) for name, tensor in state.items()},
    }
    with atomic_dir(directory) as staging:
        save_file(state, staging / WEIGHTS)
        if raw is not None:
            save_file({name: tensor.detach().cpu().contiguous() for name, tensor in raw.items()}, staging / RAW_WEIGHTS)
        (staging / ARCHITECTURE).write_text(json.dumps(architecture, indent=1) + "\n")


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> UNet2DModel:
    """Rebuild a model written by :func:`save_model`, pruned or not."""
    directory = Path(directory)
    for name in (ARCHITECTURE, WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found; {directory} is not a model saved by save_model")
    architecture = json.loads((directory / ARCHITECTURE).read_text())
    model = build_model(architecture["config"])
    shapes = {name: torch.Size(shape) for name, shape in architecture["shapes"].items()}
    for name, tensor in model.state_dict().items():
        if name not in shapes:
            raise ValueError(f"{directory / ARCHITECTURE}: no shape for {name!r}; the file does not match its config")
        if tensor.shape != shapes[name]:
            module_name, _, attribute = name.rpartition(".")
            module = model.get_submodule(module_name)
            resized = torch.empty(shapes[name], dtype=tensor.dtype)
            if attribute in module._parameters:
                setattr(module, attribute, nn.Parameter(resized))
            else:
                module.register_buffer(attribute, resized)
    sync_channel_attributes(model)
    model.load_state_dict(load_file(directory / WEIGHTS), strict=True)
    return model.to(device).eval()


def load_raw_weights(model: nn.Module, directory: str | Path) -> bool:
    """Put the raw parameters that :func:`save_model` kept beside the averaged ones into ``model`` (loaded from the
    same ``directory``); False, and ``model`` unchanged, where the run kept none (it had no EMA)."""
    path = Path(directory) / RAW_WEIGHTS
    if not path.is_file():
        return False
    raw = load_file(path)
    parameters = dict(model.named_parameters())
    if set(raw) != set(parameters):
        raise ValueError(f"{path} does not hold the parameters of the model in {directory}: it is not from this run")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(raw[name])
    return True


def sync_channel_attributes(model: nn.Module) -> None:
    """Make the modules' channel attributes agree with their (pruned) weight shapes.

    Forward passes read ``channels`` on Upsample2D/Downsample2D (asserted against the input); the other attributes
    only describe the module, but stale values would mislead anyone reading ``print(model)``.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.GroupNorm) and module.weight is not None:
            module.num_channels = module.weight.shape[0]
    for module in model.modules():
        if isinstance(module, (Upsample2D, Downsample2D)) and isinstance(module.conv, nn.Conv2d):
            module.channels, module.out_channels = module.conv.in_channels, module.conv.out_channels
