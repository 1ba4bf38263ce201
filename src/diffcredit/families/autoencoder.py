"""The frozen autoencoder of latent diffusion: load or train it, cache every item's latents once, decode samples.

A latent diffusion model (Rombach et al. 2022) trains its UNet on an autoencoder's latents instead of pixels; the
autoencoder stays frozen. Its latents are computed once per item and cached, with the item ids and the autoencoder's
digest, so a coalition's fine-tune never runs the encoder. The UNet needs unit-variance inputs: the scaling factor is
measured as 1/std of the cached latents and recorded beside them (a tiny VQModel's latents have std ~0.12; with a
factor of 1 the UNet's samples stay noise).

The autoencoder is a diffusers ``VQModel`` (the paper's ldm-celebahq-256) or ``AutoencoderKL`` (Stable Diffusion's),
loaded from a local diffusers folder, or a tiny VQModel built from :func:`tiny_autoencoder_config` and trained by
:func:`train_autoencoder` for the CPU stand-in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffcredit.io import atomic_dir, save_npz

AUTOENCODERS = ("VQModel", "AutoencoderKL")
logger = logging.getLogger(__name__)


def tiny_autoencoder_config(channels: int = 1, latent_channels: int = 3) -> dict[str, Any]:
    """A small VQModel (blocks 32/64, so latents are half the image size) for the CPU stand-in."""
    return {
        "_class_name": "VQModel",
        "in_channels": channels,
        "out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "num_vq_embeddings": 256,
        "norm_num_groups": 8,
    }


def build_autoencoder(config: dict[str, Any], seed: int):
    """A freshly initialised autoencoder (it reconstructs nothing until trained)."""
    from diffcredit.models import build_model

    _check_class(config.get("_class_name"), "the autoencoder config")
    return build_model(config, seed=seed)


def load_autoencoder(directory: str | Path, device: str | torch.device = "cpu"):
    """A frozen VQModel or AutoencoderKL from a local diffusers folder (``config.json`` + weights)."""
    import diffusers

    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found: the autoencoder must be a local diffusers folder (config.json and "
            "diffusion_pytorch_model.safetensors), e.g. the vqvae/ or vae/ folder of a staged pipeline"
        )
    name = json.loads(config_file.read_text()).get("_class_name")
    _check_class(name, str(config_file))
    model = getattr(diffusers, name).from_pretrained(directory, use_safetensors=True)
    return _frozen(model.to(device))


def save_autoencoder(model, directory: str | Path) -> None:
    """Write the autoencoder as a diffusers folder (atomically), so :func:`load_autoencoder` reads it back."""
    with atomic_dir(directory) as staging:
        model.save_pretrained(staging, safe_serialization=True)


def downsampling(config: dict[str, Any]) -> int:
    """How many times smaller than the image the latents are (each encoder block but the last halves the size)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def latent_shape(config: dict[str, Any], image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the latents of images of ``image_shape`` (``[..., C, H, W]``)."""
    *_, channels, height, width = image_shape
    if channels != config["in_channels"]:
        raise ValueError(f"images have {channels} channels but the autoencoder takes {config['in_channels']}")
    factor = downsampling(config)
    if height % factor or width % factor:
        raise ValueError(
            f"images of {height}x{width} do not divide by the autoencoder's downsampling factor {factor}; "
            "resize the images or use an autoencoder with fewer blocks"
        )
    return config["latent_channels"], height // factor, width // factor


def check_fits(autoencoder_config: dict[str, Any], image_shape: tuple[int, ...], unet_config: dict[str, Any]) -> None:
    """Refuse a UNet config that does not fit the autoencoder's latents, before anything trains."""
    channels, height, _ = latent_shape(autoencoder_config, image_shape)
    problems = []
    if unet_config.get("in_channels") != channels or unet_config.get("out_channels") != channels:
        problems.append(
            f"in/out_channels {unet_config.get('in_channels')}/{unet_config.get('out_channels')} "
            f"but the latents have {channels} channels"
        )
    if unet_config.get("sample_size") != height:
        problems.append(f"sample_size {unet_config.get('sample_size')} but the latents are {height}x{height}")
    levels = len(unet_config.get("block_out_channels", ())) - 1
    if height % (2**levels):
        problems.append(f"{levels} downsamplings do not divide latents of {height}x{height}")
    if problems:
        raise ValueError(
            f"the UNet config does not fit the autoencoder's latents of images {tuple(image_shape[-3:])}: "
            f"{'; '.join(problems)}. Set model.unet to match the latents (channels {channels}, size {height})"
        )


def train_autoencoder(
    model,
    images: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str | None = None,
    kl_weight: float = 1e-6,
) -> list[float]:
    """Train ``model`` in place to reconstruct ``images`` (float32 ``[N, C, H, W]`` in ``[-1, 1]``); returns the losses.

    The loss is the reconstruction MSE plus the VQModel's codebook/commitment loss (straight-through quantizer), or
    ``kl_weight`` times the KL term for an AutoencoderKL. Batches are seeded permutations of the items.
    """
    from diffcredit.training import select_device

    if len(images) == 0 or steps < 1:
        raise ValueError(f"training an autoencoder needs images and steps >= 1, got {len(images)} images, {steps}")
    target = select_device(device or "auto")
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(np.asarray(images, dtype=np.float32)).to(target)
    model.to(target).train().requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = np.empty(0, dtype=np.int64)
    losses = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(data))])
        batch, order = data[torch.from_numpy(order[:batch_size]).to(target)], order[batch_size:]
        loss = _loss(model, batch, kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    _frozen(model.cpu())
    return losses


def _loss(model, batch: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """Reconstruction MSE plus the regulariser, from one forward pass (two cost 1.6x the step)."""
    if type(model).__name__ == "VQModel":
        output = model(batch)
        return F.mse_loss(output.sample, batch) + output.commit_loss.mean()
    posterior = model.encode(batch).latent_dist
    return F.mse_loss(model.decode(posterior.sample()).sample, batch) + kl_weight * posterior.kl().mean()


@torch.inference_mode()
def encode(model, images: np.ndarray, *, batch_size: int = 256, device: str | None = None) -> np.ndarray:
    """Unscaled latents of ``images``: the VQModel's pre-quantisation output, or the AutoencoderKL's posterior mode
    (deterministic, so a cached latent does not depend on a noise draw)."""
    from diffcredit.training import select_device

    target = select_device(device or "auto")
    model.to(target).eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.asarray(images[start : start + batch_size], dtype=np.float32)).to(target)
        encoded = model.encode(batch)
        latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mode()
        out.append(latents.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,), dtype=np.float32)


def scaled_latents(model, images: np.ndarray, factor: float, *, device: str | None = None) -> np.ndarray:
    """What a latent UNet denoises for ``images`` that are not cached: their latents times the scaling factor, as
    :func:`load_latents` serves the cached ones."""
    return encode(model, images, device=device) * np.float32(factor)


@torch.inference_mode()
def decode(
    model, latents: np.ndarray | torch.Tensor, *, batch_size: int = 256, device: str | None = None
) -> np.ndarray:
    """Images in ``[-1, 1]`` from unscaled latents (a VQModel quantises them first, as its decoder was trained)."""
    from diffcredit.training import select_device

    target = select_device(device or "auto")
    model.to(target).eval()
    latents = torch.as_tensor(np.asarray(latents, dtype=np.float32))
    out = [
        model.decode(latents[start : start + batch_size].to(target)).sample.clamp(-1, 1).float().cpu().numpy()
        for start in range(0, len(latents), batch_size)
    ]
    return np.concatenate(out)


def scaling_factor(latents: np.ndarray) -> float:
    """1/std of the latents: scaled by it, the UNet's inputs have unit variance like the noise it adds."""
    std = float(np.asarray(latents, dtype=np.float64).std())
    if not np.isfinite(std) or std < 1e-8:
        raise ValueError(f"the latents have std {std:g}: the autoencoder encodes every image alike; train it first")
    return 1.0 / std


def cache_latents(
    model,
    images: np.ndarray,
    item_ids: np.ndarray,
    path: str | Path,
    *,
    autoencoder_digest: str,
    factor: float | None = None,
    batch_size: int = 256,
    device: str | None = None,
) -> float:
    """Encode every item once and write ``latents``, ``item_ids``, ``scaling_factor`` and the autoencoder's digest
    to ``path`` (npz); returns the scaling factor (measured unless ``factor`` is given)."""
    latents = encode(model, images, batch_size=batch_size, device=device)
    factor = scaling_factor(latents) if factor is None else float(factor)
    logger.info(
        "cached %d latents %s, std %.4g, scaling factor %.4g", len(latents), latents.shape[1:], latents.std(), factor
    )
    save_npz(
        path,
        latents=latents,
        item_ids=np.asarray(item_ids, dtype=str),
        scaling_factor=np.float64(factor),
        autoencoder=np.asarray(autoencoder_digest),
    )
    return factor


def load_latents(
    path: str | Path, item_ids: np.ndarray, autoencoder_digest: str | None = None
) -> tuple[np.ndarray, float]:
    """The cached latents of ``item_ids`` (in that order), already multiplied by the scaling factor, and the factor.

    Raises ValueError if the cache lacks an item or was made by another autoencoder.
    """
    with np.load(path, allow_pickle=False) as cache:
        latents, cached_ids = cache["latents"], cache["item_ids"]
        factor, digest = float(cache["scaling_factor"]), str(cache["autoencoder"])
    if autoencoder_digest is not None and digest != autoencoder_digest:
        raise ValueError(
            f"{path} was made by another autoencoder ({digest[:12]}, not {autoencoder_digest[:12]}); "
            "delete it so that the latents are computed again"
        )
    position = {item: i for i, item in enumerate(cached_ids)}
    missing = [str(item) for item in item_ids if item not in position]
    if missing:
        raise ValueError(
            f"{path} has no latents for {len(missing)} item(s), e.g. {missing[0]!r}; "
            "it was cached for other data: delete it so that the latents are computed again"
        )
    return latents[[position[item] for item in item_ids]] * np.float32(factor), factor


def _check_class(name: str | None, where: str) -> None:
    if name not in AUTOENCODERS:
        raise ValueError(f"{where}: _class_name {name!r} is not an autoencoder; use one of {', '.join(AUTOENCODERS)}")


def _frozen(model):
    return model.eval().requires_grad_(False)
