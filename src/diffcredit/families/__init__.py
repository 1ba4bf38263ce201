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
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from diffcredit.contributors import ContributorData

# what prepare writes inside its folder when nothing is staged (the summary names a staged folder instead), so that
# the folder can be prepared in a temporary place and moved
TRAINED_AUTOENCODER = "autoencoder"
STANDIN_BASE = "base"
HELDOUT_CAPTIONS = "heldout_captions.tsv"


class Family:
    """The pixel family: an unconditional ``UNet2DModel`` trained on the images themselves.

    Args:
        unet_config: ``UNet2DModel`` kwargs (see :func:`diffcredit.models.unet_config_for`).
        schedule: the training noise schedule (DDPMScheduler kwargs over ``models.DEFAULT_SCHEDULE``).
    """

    name = "pixel"
    # the keys of the config's ``model.<family>`` section that prepare and open take
    prepare_options: tuple[str, ...] = ()
    open_options: tuple[str, ...] = ()
    clip_samples = True  # the model denoises pixels, whose range [-1, 1] the samplers keep (sampling.make_sampler)
    conditional = False  # whether the UNet attends to each item's conditioning (see conditions)
    null_has_noise = True  # v(∅) depends on the seed (null_model): plans then repeat ∅ as well as N

    def __init__(self, unet_config: dict[str, Any], schedule: dict[str, Any] | None = None) -> None:
        self.unet_config = dict(unet_config)
        self.schedule = dict(schedule or {})

    @classmethod
    def prepare(cls, directory: str | Path, *, data: ContributorData, seed: int, log=print, **options) -> dict:
        """Make what the family needs besides the data in ``directory``, once per run; returns its summary (also
        written to ``family.json``). The pixel family needs nothing."""
        if options:
            raise ValueError(f"model family {cls.name!r} takes no family options, got {', '.join(options)}")
        return _write_summary(directory, {"family": cls.name})

    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        image_shape: tuple[int, ...],
        unet: dict | None = None,
        schedule: dict | None = None,
        **options,
    ) -> Family:
        """The family of a prepared ``directory`` for images of ``image_shape`` (``[N, C, H, W]``)."""
        from diffcredit.models import unet_config_for

        _read_summary(directory, cls.name)
        return cls(unet_config_for(tuple(image_shape), unet), schedule)

    def build(self, seed: int):
        from diffcredit.models import build_model

        return build_model(self.unet_config, seed=seed)

    def null_model(self, seed: int):
        """v(∅): the untrained model, as in the paper (each seed another initialisation)."""
        return self.build(seed)

    def inputs(self, data: ContributorData) -> np.ndarray:
        """What the UNet is trained on for ``data``'s items."""
        return data.images

    def encode(self, images: np.ndarray) -> np.ndarray:
        """What the UNet denoises for pixel ``images`` that are not training items (an attribution's targets)."""
        return images

    def conditions(self, data: ContributorData):
        """Each of ``data``'s items' conditioning of the UNet (``encoder_hidden_states``), None if unconditional."""
        return None

    def generation_conditions(self, n: int):
        """The conditioning of the first ``n`` images :meth:`generate` makes, None if unconditional."""
        return None

    def fit(self, model, data: ContributorData, *, steps: int, batch_size: int, lr: float, seed: int, **training):
        """Train ``model`` in place on ``data``'s items (``training``: the rest of :func:`diffcredit.training.train`)."""
        from diffcredit.training import train

        return train(
            model,
            self.inputs(data),
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            schedule=self.schedule,
            **training,
        )

    def prune(
        self, model, ratio: float, *, importance: str = "magnitude", data: ContributorData | None = None, seed: int = 0
    ):
        """A pruned copy of ``model`` and what pruning did (parameters before and after)."""
        from diffcredit.pruning import prune

        images = self.inputs(data) if importance != "magnitude" else None
        pruned = prune(model, ratio, importance=importance, images=images, seed=seed, schedule=self.schedule)
        return pruned, {
            "parameters_before": self.count_parameters(model),
            "parameters_after": self.count_parameters(pruned),
            "ratio": ratio,
            "importance": importance,
        }

    def generate(self, model, n: int, *, seed: int, **sampling) -> np.ndarray:
        """``n`` images in ``[-1, 1]`` with the common noise of ``seed`` (``sampling``: see
        :func:`diffcredit.sampling.generate`)."""
        from diffcredit.sampling import generate

        return generate(model, n, seed=seed, schedule=self.schedule, clip=self.clip_samples, **sampling)

    def save(self, model, directory: str | Path, raw: dict | None = None) -> None:
        """Save ``model`` (with an EMA: its averaged weights, and the ``raw`` ones beside them)."""
        from diffcredit.models import save_model

        save_model(model, directory, raw)

    def load(self, directory: str | Path):
        from diffcredit.models import load_model

        return load_model(directory)

    def load_raw(self, model, directory: str | Path) -> bool:
        """Replace the averaged weights of ``model`` (loaded from ``directory``) by the raw ones saved beside them;
        False where there are none."""
        from diffcredit.models import load_raw_weights

        return load_raw_weights(model, directory)

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
    prepare_options = ("autoencoder", "latent_channels", "steps", "batch_size", "lr", "scaling_factor")
    takes_unet = True  # prepare checks the UNet config against the latents before training anything
    clip_samples = False  # unit-variance latents have no [-1, 1] range; the decoder's pixels are clipped instead

    def __init__(
        self,
        unet_config: dict[str, Any],
        schedule: dict[str, Any] | None = None,
        *,
        autoencoder,
        latents: str | Path,
        image_shape: tuple[int, int, int],
    ) -> None:
        from diffcredit.families.autoencoder import check_fits

        check_fits(dict(autoencoder.config), tuple(image_shape), unet_config)
        super().__init__(unet_config, schedule)
        self.autoencoder = autoencoder
        self.latents = Path(latents)
        with np.load(self.latents, allow_pickle=False) as cache:
            self.scaling_factor = float(cache["scaling_factor"])

    @classmethod
    def prepare(
        cls,
        directory: str | Path,
        *,
        data: ContributorData,
        seed: int,
        log=print,
        autoencoder: str | None = None,
        latent_channels: int = 3,
        steps: int = 400,
        batch_size: int = 64,
        lr: float = 1e-3,
        scaling_factor: float | None = None,
        device: str | None = None,
        unet: dict | None = None,
    ) -> dict:
        """Load the staged ``autoencoder`` folder (or train a tiny VQModel on ``data`` for the stand-in) and cache
        every item's latents with the measured scaling factor (or ``scaling_factor``). A ``unet`` config (overrides
        of the default, see :meth:`open`) that does not fit the latents is refused before anything trains."""
        from diffcredit.families import autoencoder as ae
        from diffcredit.io import file_digest
        from diffcredit.seeds import derive_seed

        directory = Path(directory)
        summary: dict[str, Any] = {"family": cls.name}
        if autoencoder is None:
            model = ae.build_autoencoder(
                ae.tiny_autoencoder_config(data.images.shape[1], latent_channels),
                seed=derive_seed(seed, "autoencoder-init"),
            )
            cls._check_unet(dict(model.config), data.images.shape, unet)
            losses = ae.train_autoencoder(
                model,
                data.images,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                seed=derive_seed(seed, "autoencoder-train"),
                device=device,
            )
            ae.save_autoencoder(model, directory / TRAINED_AUTOENCODER)
            summary["autoencoder_final_loss"] = float(np.mean(losses[-20:]))
            log(
                f"trained a tiny VQModel for {steps} steps: loss {losses[0]:.4f} -> {summary['autoencoder_final_loss']:.4f}"
            )
        else:
            model = ae.load_autoencoder(autoencoder)
            cls._check_unet(dict(model.config), data.images.shape, unet)
        digest = file_digest(_weights_file(autoencoder or directory / TRAINED_AUTOENCODER))
        shape = ae.latent_shape(dict(model.config), data.images.shape)
        factor = ae.cache_latents(
            model,
            data.images,
            data.item_ids,
            directory / "latents.npz",
            autoencoder_digest=digest,
            factor=scaling_factor,
            device=device,
        )
        recon = ae.decode(model, ae.encode(model, data.images[:256], device=device), device=device)
        summary.update(
            autoencoder=autoencoder,
            autoencoder_digest=digest,
            latent_shape=list(shape),
            scaling_factor=factor,
            scaling="given" if scaling_factor is not None else "measured (1/std)",
            reconstruction_mse=float(np.mean((recon - data.images[:256]) ** 2)),
        )
        log(
            f"latents {shape}, scaling factor {factor:.4g} ({summary['scaling']}), "
            f"reconstruction MSE {summary['reconstruction_mse']:.4f}"
        )
        return _write_summary(directory, summary)

    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        image_shape: tuple[int, ...],
        unet: dict | None = None,
        schedule: dict | None = None,
        device: str | None = None,
        **options,
    ) -> LatentFamily:
        """The latent family of a prepared ``directory``; the UNet's default config is the digits one at the
        latents' size and channels, under the user's ``unet`` overrides."""
        from diffcredit.families.autoencoder import load_autoencoder

        summary = _read_summary(directory, cls.name)
        config = cls._unet_config(summary["latent_shape"], unet)
        folder = summary["autoencoder"] or Path(directory) / TRAINED_AUTOENCODER
        return cls(
            config,
            schedule,
            autoencoder=load_autoencoder(folder, device or "cpu"),
            latents=Path(directory) / "latents.npz",
            image_shape=tuple(image_shape)[-3:],
        )

    @staticmethod
    def _unet_config(latent_shape: Sequence[int], unet: dict | None) -> dict:
        """The digits UNet at the latents' size and channels, under the user's overrides."""
        from diffcredit.models import digits_unet_config

        channels, size, _ = latent_shape
        return {**digits_unet_config(sample_size=size, channels=channels), **(unet or {})}

    @classmethod
    def _check_unet(cls, autoencoder_config: dict, image_shape: tuple[int, ...], unet: dict | None) -> None:
        from diffcredit.families.autoencoder import check_fits, latent_shape

        check_fits(
            autoencoder_config, image_shape, cls._unet_config(latent_shape(autoencoder_config, image_shape), unet)
        )

    def inputs(self, data: ContributorData) -> np.ndarray:
        from diffcredit.families.autoencoder import load_latents

        return load_latents(self.latents, data.item_ids)[0]

    def encode(self, images: np.ndarray) -> np.ndarray:
        from diffcredit.families.autoencoder import scaled_latents

        return scaled_latents(self.autoencoder, images, self.scaling_factor)

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
        heldout_captions: the held-out (or reference) items' captions, where the caption source has them: the
            conditioning of In-Run Data Shapley's validation loss and of TRAK's held-out targets.
        rank: the rank of a fresh LoRA (:meth:`build`).
        prompts: the generation prompts, image ``i`` prompted with ``prompts[i % len(prompts)]`` (default: the
            distinct captions, sorted).
        guidance_scale: classifier-free guidance of generation (1: none).
        latents: for a latent base (with a ``vae``), the cache of the items' latents (made with the base's factor).
    """

    name = "text_lora"
    prepare_options = (
        "base",
        "captions",
        "prompt",
        "steps",
        "batch_size",
        "lr",
        "caption_dropout",
        "snr_gamma",
        "train_text_encoder",
    )
    takes_heldout = True  # prepare captions the held-out items too, where the caption source has them
    conditional = True
    null_has_noise = False  # v(∅) is the base itself: plans measure it once and repeat N instead
    open_options = ("rank", "prompts", "guidance_scale")

    def __init__(
        self,
        base,
        captions: dict[str, str],
        *,
        heldout_captions: dict[str, str] | None = None,
        rank: int,
        prompts: Sequence[str] | None = None,
        guidance_scale: float = 1.0,
        latents: str | Path | None = None,
    ) -> None:
        if base.autoencoder is not None and latents is None:
            raise ValueError("the base model has a vae: pass the cache of the items' latents (latents=...)")
        # the base UNet's config as kwargs; where it was loaded from (``_name_or_path``) is not what it is
        super().__init__({k: v for k, v in base.unet.config.items() if k != "_name_or_path"}, base.schedule)
        self.base = base
        self.captions = dict(captions)
        self.heldout_captions = dict(heldout_captions or {})
        self.rank = int(rank)
        self.prompts = list(prompts) if prompts else sorted(set(self.captions.values()))
        self.guidance_scale = float(guidance_scale)
        self.latents = Path(latents) if latents is not None else None

    @classmethod
    def prepare(
        cls,
        directory: str | Path,
        *,
        data: ContributorData,
        seed: int,
        log=print,
        heldout: ContributorData | None = None,
        base: str | None = None,
        captions: str | None = None,
        prompt: str | None = None,
        steps: int = 800,
        batch_size: int = 32,
        lr: float = 1e-3,
        caption_dropout: float = 0.0,
        snr_gamma: float | None = None,
        train_text_encoder: bool = True,
        device: str | None = None,
    ) -> dict:
        """Check the captions (``captions``: a TSV ``item``, ``caption``; ``glyphs``: read from glyph item ids; or
        one shared ``prompt``) and write them to ``captions.tsv``, those of the ``heldout`` items the source
        captions to ``heldout_captions.tsv``; load the staged ``base`` folder (validating its
        components) or pre-train the stand-in base on glyphs of fonts no contributor owns; cache the items' latents
        if the base has a vae."""
        import pandas as pd

        from diffcredit.families import text_conditioning as tc
        from diffcredit.io import write_table
        from diffcredit.seeds import derive_seed

        directory = Path(directory)
        texts = tc.check_captions(data.item_ids, _read_captions(captions, data.item_ids), prompt)
        write_table(pd.DataFrame({"item": data.item_ids, "caption": texts}), directory / "captions.tsv")
        summary: dict[str, Any] = {"family": cls.name, "n_captions": len(set(texts))}
        if heldout is not None:
            known = _heldout_captions(captions, prompt, heldout.item_ids)
            write_table(
                pd.DataFrame({"item": list(known), "caption": list(known.values())}), directory / HELDOUT_CAPTIONS
            )
            summary["heldout_captioned"] = f"{len(known)} of {len(heldout)}"
        if base is None:
            from diffcredit.glyphs import BASE_FONTS, load_glyphs

            _, channels, size, _ = data.images.shape
            pretraining, pre_captions = load_glyphs(BASE_FONTS, size=size, seed=derive_seed(seed, "base-glyphs"))
            if channels != 1:
                raise ValueError(
                    f"the stand-in base is pre-trained on grayscale glyphs, but the data has {channels} "
                    "channels: stage a base model (model.text_lora.base)"
                )
            pipeline = tc.tiny_base([*texts, *pre_captions], sample_size=size, seed=derive_seed(seed, "base-init"))
            result = tc.pretrain(
                pipeline,
                pretraining.images,
                pre_captions,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                seed=derive_seed(seed, "base-train"),
                caption_dropout=caption_dropout,
                train_text_encoder=train_text_encoder,
                snr_gamma=snr_gamma,
                device=device,
                log_every=max(1, steps // 10),
            )
            tc.save_base(pipeline, directory / STANDIN_BASE)
            summary.update(base_pretraining_items=len(pretraining), base_final_loss=float(np.mean(result.losses[-50:])))
            log(f"pre-trained the stand-in base on {len(pretraining)} glyphs of {len(BASE_FONTS)} fonts, {steps} steps")
        pipeline = tc.load_base(base or directory / STANDIN_BASE)
        summary["base"] = base
        if pipeline.autoencoder is not None:
            from diffcredit.families.autoencoder import cache_latents
            from diffcredit.io import file_digest

            digest = file_digest(_weights_file(Path(base or directory / STANDIN_BASE) / "vae"))
            cache_latents(
                pipeline.autoencoder,
                data.images,
                data.item_ids,
                directory / "latents.npz",
                autoencoder_digest=digest,
                factor=pipeline.scaling_factor,
                device=device,
            )
            summary.update(scaling_factor=pipeline.scaling_factor, autoencoder_digest=digest)
        return _write_summary(directory, summary)

    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        image_shape: tuple[int, ...] | None = None,
        unet: dict | None = None,
        schedule: dict | None = None,
        rank: int = 4,
        prompts: Sequence[str] | None = None,
        guidance_scale: float = 1.0,
        device: str | None = None,
        **options,
    ) -> TextLoraFamily:
        """The text-LoRA family of a prepared ``directory``. The UNet and the noise schedule are the base's
        (``unet/config.json``, ``scheduler/scheduler_config.json``): ``schedule`` is not used and ``unet`` must be
        empty."""
        import pandas as pd

        from diffcredit.families.text_conditioning import load_base

        if unet:
            raise ValueError("model.unet comes from the base model in the text_lora family; leave it empty")
        summary = _read_summary(directory, cls.name)

        def captions(name: str) -> dict[str, str]:
            path = Path(directory) / name
            if not path.exists():  # a folder prepared without held-out items
                return {}
            table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
            return dict(zip(table["item"], table["caption"], strict=True))

        latents = Path(directory) / "latents.npz" if "autoencoder_digest" in summary else None
        base = summary["base"] or Path(directory) / STANDIN_BASE
        return cls(
            load_base(base, device or "cpu"),
            captions("captions.tsv"),
            heldout_captions=captions(HELDOUT_CAPTIONS),
            rank=rank,
            prompts=prompts,
            guidance_scale=guidance_scale,
            latents=latents,
        )

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

    def encode(self, images: np.ndarray) -> np.ndarray:
        if self.base.autoencoder is None:
            return images
        from diffcredit.families.autoencoder import scaled_latents

        return scaled_latents(self.base.autoencoder, images, self.base.scaling_factor)

    def conditions(self, data: ContributorData):
        """The text encoder's states of each item's caption (a training or a held-out item's), float32 [N, L, D]."""
        from diffcredit.families.text_conditioning import check_captions

        return self._states(check_captions(data.item_ids, {**self.heldout_captions, **self.captions}, None))

    def generation_conditions(self, n: int):
        """The states of the prompt of each generated image (image ``i``: ``prompts[i % len(prompts)]``)."""
        return self._states([self.prompts[i % len(self.prompts)] for i in range(n)])

    def _states(self, captions: Sequence[str]):
        from diffcredit.families.text_conditioning import PromptTable

        table = PromptTable.build(self.base, captions)
        return table.embeddings[table.codes]

    def fit(self, model, data: ContributorData, *, steps: int, batch_size: int, lr: float, seed: int, **training):
        from diffcredit.families.text_conditioning import ConditionedUNet, PromptTable, check_captions
        from diffcredit.training import train

        captions = check_captions(data.item_ids, self.captions, None)
        conditioned = ConditionedUNet(model, PromptTable.build(self.base, captions))
        watcher = training.pop("observer", None)  # In-Run Data Shapley's, which sees the conditioned UNet

        def observe(model, index, *batch):
            conditioned.observe(model, index)
            return watcher(model, index, *batch) if watcher is not None else None

        return train(
            conditioned,
            self.inputs(data),
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            schedule=self.schedule,
            observer=observe,
            **training,
        )

    def prune(
        self, model, ratio: float, *, importance: str = "magnitude", data: ContributorData | None = None, seed: int = 0
    ):
        """A copy of ``model`` with its LoRA pruned by rank until at most a share ``ratio`` of its parameters stays.

        As in the paper's prune_lora, a LoRA's ratio is the share *kept* (a UNet's is torch-pruning's channel ratio).
        """
        from diffcredit.families.lora import prune_lora

        if importance != "magnitude":
            raise ValueError(
                f"a LoRA is pruned by magnitude (the paper's prune_lora), not {importance!r}; "
                "set prune.importance: magnitude"
            )
        pruned = copy.deepcopy(model)
        stats = prune_lora(pruned, ratio)
        return pruned, {
            "parameters_before": stats["lora_parameters_before"],
            "parameters_after": stats["lora_parameters_after"],
            "ratio": ratio,
            "importance": importance,
            "ranks": stats["ranks"],
        }

    def generate(self, model, n: int, *, seed: int, **sampling) -> np.ndarray:
        from diffcredit.families.text_conditioning import generate

        return generate(self.base, model, self.prompts, n, seed=seed, guidance_scale=self.guidance_scale, **sampling)

    def save(self, model, directory: str | Path, raw: dict | None = None) -> None:
        """Save the adapters; a LoRA run keeps only its (averaged, with an EMA) adapters, so ``raw`` is not kept."""
        from diffcredit.families.lora import save_lora

        save_lora(model, directory)

    def load_raw(self, model, directory: str | Path) -> bool:
        return False

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


def prepare_family(
    model: dict,
    directory: str | Path,
    *,
    data: ContributorData,
    seed: int,
    heldout: ContributorData | None = None,
    device: str | None = None,
    log=print,
) -> dict:
    """Prepare the family of the config's ``model`` section (``family`` and its ``model.<family>`` options) for the
    training ``data`` (and the ``heldout`` items, which a text family captions)."""
    cls = family_class(model.get("family", "pixel"))
    options = _options(model, cls, cls.prepare_options)
    if cls.name != "pixel":
        options["device"] = device
    if getattr(cls, "takes_unet", False):
        options["unet"] = model.get("unet")
    if getattr(cls, "takes_heldout", False):
        options["heldout"] = heldout
    return cls.prepare(directory, data=data, seed=seed, log=log, **options)


def open_family(
    model: dict, directory: str | Path, *, image_shape: tuple[int, ...], device: str | None = None
) -> Family:
    """The family of the config's ``model`` section, from the folder :func:`prepare_family` wrote."""
    cls = family_class(model.get("family", "pixel"))
    options = _options(model, cls, cls.open_options)
    if cls.name != "pixel":
        options["device"] = device
    return cls.open(
        directory, image_shape=image_shape, unet=model.get("unet"), schedule=model.get("schedule"), **options
    )


def family_of(
    spec: dict | None, item_shape: tuple[int, ...], *, unet: dict | None = None, schedule: dict | None = None
) -> Family:
    """The family a workflow spec names (``{model: the config's model section, directory: its prepared folder}``),
    opened once per process for items of ``item_shape`` (``(C, H, W)``); without a spec, the pixel family of
    ``unet`` (overrides of the digits config) and ``schedule``."""
    from diffcredit.models import unet_config_for

    if spec is None:
        return Family(unet_config_for((0, *item_shape), unet), schedule)
    return _opened(json.dumps(spec, sort_keys=True), tuple(item_shape))


@lru_cache(maxsize=2)
def _opened(spec: str, item_shape: tuple[int, ...]) -> Family:
    family = json.loads(spec)
    return open_family(family["model"], family["directory"], image_shape=(0, *item_shape))


def _options(model: dict, cls: type[Family], keys: tuple[str, ...]) -> dict:
    section = model.get(cls.name) or {}
    return {key: section[key] for key in keys if key in section}


def _write_summary(directory: str | Path, summary: dict) -> dict:
    from diffcredit.io import write_json

    write_json(Path(directory) / "family.json", summary)
    return summary


def _read_summary(directory: str | Path, name: str) -> dict:
    path = Path(directory) / "family.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: prepare the {name!r} family first (Family.prepare)")
    summary = json.loads(path.read_text())
    if summary.get("family") != name:
        raise ValueError(f"{directory} was prepared for the {summary.get('family')!r} family, not {name!r}")
    return summary


def family_digest(directory: str | Path, name: str) -> str:
    """A digest of the files of a folder prepared for family ``name`` and of the staged folders its summary names (a
    base, an autoencoder): what the folder holds, not where it lies, so a copied run folder keeps its stored
    utilities and weights replaced under the same path do not."""
    from diffcredit.io import folder_digest

    summary = _read_summary(directory, name)
    return folder_digest(directory, *(summary[key] for key in ("base", "autoencoder") if summary.get(key)))


def _weights_file(folder: str | Path) -> Path:
    found = sorted(Path(folder).glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no .safetensors weights in {folder}; stage the diffusers folder with safetensors")
    return found[0]


def _heldout_captions(captions: str | None, prompt: str | None, item_ids: np.ndarray) -> dict[str, str]:
    """The captions the source of the training items' (``captions`` or the shared ``prompt``) has for the held-out
    items ``item_ids``; items it does not caption (say, a reference that is not glyphs) are left out."""
    if prompt is not None:
        return dict.fromkeys(map(str, item_ids), prompt)
    if captions == "glyphs":
        from diffcredit.glyphs import is_glyph_id

        item_ids = [item for item in map(str, item_ids) if is_glyph_id(item)]
    known = _read_captions(captions, np.asarray(item_ids, dtype=str))
    return {str(item): known[str(item)] for item in item_ids if str(known.get(str(item), "")).strip()}


def _read_captions(captions: str | None, item_ids: np.ndarray) -> dict[str, str] | None:
    """Item id -> caption from a TSV (``item``, ``caption``), or from glyph item ids (``glyphs``)."""
    if captions is None:
        return None
    if captions == "glyphs":
        from diffcredit.glyphs import captions_of

        return dict(zip(map(str, item_ids), captions_of(item_ids), strict=True))
    import pandas as pd

    table = pd.read_csv(captions, sep="\t", dtype=str, keep_default_na=False)
    missing = {"item", "caption"} - set(table.columns)
    if missing:
        raise ValueError(
            f"{captions}: a captions TSV needs columns item and caption; missing {', '.join(sorted(missing))}"
        )
    return dict(zip(table["item"], table["caption"], strict=True))


def family_class(name: str) -> type[Family]:
    """The class of ``model.family`` ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
