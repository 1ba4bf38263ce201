"""Model families: the one place where the stages learn how a kind of diffusion model is built, trained, pruned,
sampled and saved.

The paper's three systems share every stage (train the full model, prune it once, recover it, fine-tune it per
coalition, generate with common noise, score) and differ only in what a "model" is:

==========  ==========================================  ========================  ==============================
family      model of a coalition                        pruned                    v(∅)
==========  ==========================================  ========================  ==============================
pixel       ``UNet2DModel`` on images                   UNet channels             the untrained UNet
latent      ``UNet2DModel`` on a frozen autoencoder's   UNet channels             the untrained UNet
            cached latents; samples decoded
text_lora   a LoRA on a base ``UNet2DConditionModel``   LoRA rank components      the base without LoRA
            conditioned on captions
==========  ==========================================  ========================  ==============================

A :class:`Family` answers ``build`` (a fresh trainable model: the full model, a retrain), ``null_model`` (v(∅)),
``fit`` (train in place on a coalition's items), ``prune``, ``generate`` (pixels in ``[-1, 1]``), ``save``/``load``
and ``count_parameters``. :data:`FAMILIES` maps the config's ``model.family`` to its class. The pixel family wraps
:mod:`diffcredit.models`, :mod:`diffcredit.training`, :mod:`diffcredit.pruning` and :mod:`diffcredit.sampling`
unchanged; the others add the concepts of :mod:`.autoencoder`, :mod:`.text_conditioning` and :mod:`.lora`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffcredit.contributors import ContributorData


class Family:
    """The pixel family: an unconditional ``UNet2DModel`` trained on the images themselves.

    Args:
        unet_config: ``UNet2DModel`` kwargs (see :func:`diffcredit.models.unet_config_for`).
        schedule: the training noise schedule (DDPMScheduler kwargs over ``models.DEFAULT_SCHEDULE``).
    """

    name = "pixel"

    def __init__(self, unet_config: dict[str, Any], schedule: dict[str, Any] | None = None) -> None:
        self.unet_config = dict(unet_config)
        self.schedule = dict(schedule or {})

    def build(self, seed: int):
        from diffcredit.models import build_model

        return build_model(self.unet_config, seed=seed)

    def null_model(self, seed: int):
        """v(∅): the untrained model, as in the paper (each seed another initialisation)."""
        return self.build(seed)

    def inputs(self, data: ContributorData) -> np.ndarray:
        """What the UNet is trained on for ``data``'s items."""
        return data.images

    def fit(self, model, data: ContributorData, *, steps: int, batch_size: int, lr: float, seed: int, **training):
        """Train ``model`` in place on ``data``'s items (``training``: the rest of :func:`diffcredit.training.train`)."""
        from diffcredit.training import train

        return train(model, self.inputs(data), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                     schedule=self.schedule, **training)

    def prune(self, model, ratio: float, *, importance: str = "magnitude", data: ContributorData | None = None,
              seed: int = 0):
        """A pruned copy of ``model`` and what pruning did (parameters before and after)."""
        from diffcredit.pruning import prune

        images = self.inputs(data) if importance != "magnitude" else None
        pruned = prune(model, ratio, importance=importance, images=images, seed=seed, schedule=self.schedule)
        return pruned, {"parameters_before": self.count_parameters(model),
                        "parameters_after": self.count_parameters(pruned), "ratio": ratio, "importance": importance}

    def generate(self, model, n: int, *, seed: int, **sampling) -> np.ndarray:
        """``n`` images in ``[-1, 1]`` with the common noise of ``seed`` (``sampling``: see
        :func:`diffcredit.sampling.generate`)."""
        from diffcredit.sampling import generate

        return generate(model, n, seed=seed, schedule=self.schedule, **sampling)

    def save(self, model, directory: str | Path) -> None:
        from diffcredit.models import save_model

        save_model(model, directory)

    def load(self, directory: str | Path):
        from diffcredit.models import load_model

        return load_model(directory)

    def count_parameters(self, model) -> int:
        from diffcredit.models import count_parameters

        return count_parameters(model)


class LatentFamily(Family):
    """Latent diffusion: the pixel family's UNet on a frozen autoencoder's cached latents; samples are decoded.

    Args:
        autoencoder: the frozen VQModel/AutoencoderKL (:func:`.autoencoder.load_autoencoder`).
        latents: the cache written by :func:`.autoencoder.cache_latents` for the training items.
        image_shape: ``(C, H, W)`` of the images; checked against ``unet_config`` (see :func:`.autoencoder.check_fits`).
    """

    name = "latent"

    def __init__(self, unet_config: dict[str, Any], schedule: dict[str, Any] | None = None, *, autoencoder,
                 latents: str | Path, image_shape: tuple[int, int, int]) -> None:
        from diffcredit.families.autoencoder import check_fits

        check_fits(dict(autoencoder.config), tuple(image_shape), unet_config)
        super().__init__(unet_config, schedule)
        self.autoencoder = autoencoder
        self.latents = Path(latents)
        with np.load(self.latents, allow_pickle=False) as cache:
            self.scaling_factor = float(cache["scaling_factor"])

    def inputs(self, data: ContributorData) -> np.ndarray:
        from diffcredit.families.autoencoder import load_latents

        return load_latents(self.latents, data.item_ids)[0]

    def generate(self, model, n: int, *, seed: int, **sampling) -> np.ndarray:
        from diffcredit.families.autoencoder import decode

        latents = super().generate(model, n, seed=seed, **sampling)
        return decode(self.autoencoder, latents / self.scaling_factor, device=sampling.get("device"))


class TextLoraFamily(Family):
    """A LoRA on the attention projections of a frozen text-to-image base, trained on captioned items.

    Args:
        base: the base pipeline (:func:`.text_conditioning.load_base`); its schedule is the family's.
        captions: one caption per training item (item id -> text), as :func:`.text_conditioning.check_captions`
            returns them; for one shared prompt, that prompt for every item.
        rank: the rank of a fresh LoRA (:meth:`build`).
        prompts: the generation prompts, image ``i`` prompted with ``prompts[i % len(prompts)]`` (default: the
            distinct captions, sorted).
        guidance_scale: classifier-free guidance of generation (1: none).
        latents: for a latent base (with a ``vae``), the cache of the items' latents (made with the base's factor).
    """

    name = "text_lora"

    def __init__(self, base, captions: dict[str, str], *, rank: int, prompts: Sequence[str] | None = None,
                 guidance_scale: float = 1.0, latents: str | Path | None = None) -> None:
        if base.autoencoder is not None and latents is None:
            raise ValueError("the base model has a vae: pass the cache of the items' latents (latents=...)")
        super().__init__(dict(base.unet.config), base.schedule)
        self.base = base
        self.captions = dict(captions)
        self.rank = int(rank)
        self.prompts = list(prompts) if prompts else sorted(set(self.captions.values()))
        self.guidance_scale = float(guidance_scale)
        self.latents = Path(latents) if latents is not None else None

    def build(self, seed: int):
        from diffcredit.families.lora import add_lora

        unet = copy.deepcopy(self.base.unet)
        add_lora(unet, self.rank, seed=seed)
        return unet

    def null_model(self, seed: int):
        """v(∅): the base model itself, without any LoRA (the same for every seed)."""
        return copy.deepcopy(self.base.unet)

    def inputs(self, data: ContributorData) -> np.ndarray:
        if self.latents is None:
            return data.images
        from diffcredit.families.autoencoder import load_latents

        return load_latents(self.latents, data.item_ids)[0]

    def fit(self, model, data: ContributorData, *, steps: int, batch_size: int, lr: float, seed: int, **training):
        from diffcredit.families.text_conditioning import ConditionedUNet, PromptTable, check_captions
        from diffcredit.training import train

        captions = check_captions(data.item_ids, self.captions, None)
        conditioned = ConditionedUNet(model, PromptTable.build(self.base, captions))
        return train(conditioned, self.inputs(data), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                     schedule=self.schedule, observer=conditioned.observe, **training)

    def prune(self, model, ratio: float, *, importance: str = "magnitude", data: ContributorData | None = None,
              seed: int = 0):
        """A copy of ``model`` with its LoRA pruned by rank until at most a share ``ratio`` of its parameters stays.

        As in the paper's prune_lora, a LoRA's ratio is the share *kept* (a UNet's is torch-pruning's channel ratio).
        """
        from diffcredit.families.lora import prune_lora

        if importance != "magnitude":
            raise ValueError(f"a LoRA is pruned by magnitude (the paper's prune_lora), not {importance!r}; "
                             "set prune.importance: magnitude")
        pruned = copy.deepcopy(model)
        stats = prune_lora(pruned, ratio)
        return pruned, {"parameters_before": stats["lora_parameters_before"],
                        "parameters_after": stats["lora_parameters_after"], "ratio": ratio,
                        "importance": importance, "ranks": stats["ranks"]}

    def generate(self, model, n: int, *, seed: int, **sampling) -> np.ndarray:
        from diffcredit.families.text_conditioning import generate

        sampling.pop("precision", None)  # fp32: the conditional sampler has no autocast
        return generate(self.base, model, self.prompts, n, seed=seed, guidance_scale=self.guidance_scale,
                        **sampling)

    def save(self, model, directory: str | Path) -> None:
        from diffcredit.families.lora import save_lora

        save_lora(model, directory)

    def load(self, directory: str | Path):
        from diffcredit.families.lora import load_lora

        unet = copy.deepcopy(self.base.unet)
        load_lora(unet, directory)
        return unet

    def count_parameters(self, model) -> int:
        """LoRA parameters: what pruning removes and a coalition trains."""
        from diffcredit.families.lora import count_lora_parameters

        return count_lora_parameters(model)


FAMILIES: dict[str, type[Family]] = {"pixel": Family, "latent": LatentFamily, "text_lora": TextLoraFamily}


def family_class(name: str) -> type[Family]:
    """The class of ``model.family`` ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
