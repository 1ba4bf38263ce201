"""The base text-to-image pipeline: a ``UNet2DConditionModel`` conditioned on a frozen CLIP text encoder's embeddings.

The base is a local diffusers folder with ``unet/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` (and
``vae/`` for a latent model such as miniSD), or, for the CPU stand-in, built from small configs by :func:`tiny_base`
with a tokenizer whose ``vocab.json``/``merges.txt`` are built from the captions themselves (nothing downloaded).

The text encoder is frozen while a LoRA trains, so every distinct caption is encoded once (:class:`PromptTable`);
items point at their caption's row. Only the stand-in's pre-training (:func:`pretrain`) trains it, with the UNet, since
a freshly initialised encoder, unlike CLIP, has learnt nothing to tell the captions apart. :class:`ConditionedUNet`
gives the UNet the signature of an unconditional one, ``model(sample, t)``, so the one training loop of
:mod:`diffcredit.training` trains it: the loop hands each batch's item indices to its ``observer`` before the forward
pass, and the wrapper looks up those items' embeddings. Generation uses the same
per-item noise as :func:`diffcredit.sampling.generate` (common random numbers), with classifier-free guidance.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffcredit.io import atomic_dir

REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
SPECIAL = ("<|startoftext|>", "<|endoftext|>")
logger = logging.getLogger(__name__)


@dataclass
class TextPipeline:
    """The parts of a text-to-image model. ``schedule``: the training noise schedule (DDPMScheduler kwargs);
    ``autoencoder``/``scaling_factor``: the frozen latent autoencoder and its factor, None for a pixel-space base."""

    unet: Any
    text_encoder: Any
    tokenizer: Any
    schedule: dict
    autoencoder: Any = None
    scaling_factor: float | None = None


def check_captions(item_ids: Sequence[str], captions: dict[str, str] | None, prompt: str | None) -> list[str]:
    """One caption per item: from ``captions`` (item id -> text) or the one shared ``prompt``, never both.

    Raises ValueError naming the items without a caption, before anything trains.
    """
    if (captions is None) == (prompt is None):
        raise ValueError("give either captions per item or one shared prompt (data.prompt), not both or neither")
    if prompt is not None:
        return [prompt] * len(item_ids)
    missing = [str(item) for item in item_ids if not str(captions.get(str(item), "")).strip()]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(item_ids)} items have no caption, e.g. {missing[:3]}; add them to "
            "the captions file or set one shared prompt"
        )
    return [str(captions[str(item)]) for item in item_ids]


def write_tokenizer(directory: str | Path, texts: Sequence[str], max_length: int = 16):
    """A CLIP tokenizer whose vocabulary is built from ``texts`` (written to ``directory``) and returned.

    The vocabulary holds the special tokens, the 256 byte-level symbols alone and word-final (so any text encodes
    without unknown tokens) and, for every word of ``texts``, the chain of merges that builds it from its letters.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIAL, *symbols, *(s + "</w>" for s in symbols)])}
    merges = []
    words = sorted({word for text in texts for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())})
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, len(vocab))
    merges = list(dict.fromkeys(merges))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=max_length)
    tokenizer.save_pretrained(directory)  # records model_max_length beside the vocabulary
    return tokenizer


def tiny_unet_config(sample_size: int = 16, channels: int = 1, cross_attention_dim: int = 32) -> dict[str, Any]:
    """A small ``UNet2DConditionModel`` for the stand-in: channels 16/32, cross-attention at the half resolution
    only (at the full one it costs twice as much per step on a CPU). Pre-trained 1,800 steps it draws the prompted
    letter more often than channels 32/64 do after 1,200 (92% against 79% guided), in two thirds of the time (README,
    "Text-to-image LoRA")."""
    return {
        "sample_size": sample_size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": [16, 32],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def tiny_text_encoder_config(tokenizer, hidden_size: int = 32) -> dict[str, Any]:
    """A small CLIP text encoder for ``tokenizer``; its ids and positions match the tokenizer's."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_base(
    texts: Sequence[str],
    *,
    sample_size: int = 16,
    channels: int = 1,
    seed: int = 0,
    schedule: dict | None = None,
    unet: dict | None = None,
) -> TextPipeline:
    """A freshly initialised pixel-space base for the stand-in, with a tokenizer built from ``texts``."""
    import tempfile

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffcredit.models import DEFAULT_SCHEDULE

    with tempfile.TemporaryDirectory() as folder:  # save_base writes the tokenizer with the rest
        tokenizer = write_tokenizer(folder, texts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_encoder_config(tokenizer)))
        unet_model = UNet2DConditionModel(**{**tiny_unet_config(sample_size, channels), **(unet or {})})
    return TextPipeline(unet_model, _frozen(text_encoder), tokenizer, {**DEFAULT_SCHEDULE, **(schedule or {})})


def save_base(pipeline: TextPipeline, directory: str | Path) -> None:
    """Write the base as a diffusers folder (atomically) that :func:`load_base` reads back."""
    from diffusers import DDPMScheduler

    with atomic_dir(directory) as staging:
        pipeline.unet.save_pretrained(staging / "unet", safe_serialization=True)
        pipeline.text_encoder.save_pretrained(staging / "text_encoder", safe_serialization=True)
        pipeline.tokenizer.save_pretrained(staging / "tokenizer")
        DDPMScheduler(**pipeline.schedule).save_pretrained(staging / "scheduler")
        if pipeline.autoencoder is not None:
            pipeline.autoencoder.save_pretrained(staging / "vae", safe_serialization=True)


def load_base(directory: str | Path, device: str | torch.device = "cpu") -> TextPipeline:
    """The base pipeline in a local diffusers folder (e.g. a staged miniSD), all parts frozen.

    Raises FileNotFoundError naming every missing component before anything loads.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffcredit.families.autoencoder import load_autoencoder

    directory = Path(directory)
    wanted = {
        "unet": "config.json",
        "text_encoder": "config.json",
        "tokenizer": "tokenizer_config.json",
        "scheduler": "scheduler_config.json",
    }
    missing = [f"{part}/{name}" for part, name in wanted.items() if not (directory / part / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the base model folder {directory} lacks {', '.join(missing)}: a text-to-image base needs the "
            f"diffusers components {', '.join(REQUIRED)} (and vae/ for a latent model); stage the whole pipeline"
        )
    scheduler = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(directory / "text_encoder", use_safetensors=True)
    if text_encoder.config.eos_token_id != tokenizer.eos_token_id:
        text_encoder.config.eos_token_id = tokenizer.eos_token_id  # pooled outputs are read at the eos token
    unet = UNet2DConditionModel.from_pretrained(directory / "unet", use_safetensors=True)
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError(
            f"{directory}: the UNet attends to {unet.config.cross_attention_dim}-dimensional text but "
            f"the text encoder gives {text_encoder.config.hidden_size}; the components do not match"
        )
    autoencoder = factor = None
    if (directory / "vae" / "config.json").is_file():
        autoencoder = load_autoencoder(directory / "vae", device)
        factor = float(autoencoder.config.scaling_factor)  # the base UNet was trained with this factor
    return TextPipeline(
        _frozen(unet.to(device)),
        _frozen(text_encoder.to(device)),
        tokenizer,
        {k: scheduler[k] for k in SCHEDULE_KEYS if k in scheduler},
        autoencoder,
        factor,
    )


def tokenize(pipeline: TextPipeline, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``[len(prompts), max_length]``, padded and truncated to the tokenizer's length."""
    return pipeline.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipeline.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.inference_mode()
def encode_ids(pipeline: TextPipeline, ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Last hidden states of the frozen text encoder for token ``ids`` (from :func:`tokenize`), float32
    ``[len(ids), max_length, dim]`` on the CPU."""
    device = next(pipeline.text_encoder.parameters()).device
    return torch.cat(
        [
            pipeline.text_encoder(ids[start : start + batch_size].to(device))[0].float().cpu()
            for start in range(0, len(ids), batch_size)
        ]
    )


@dataclass
class PromptTable:
    """Each distinct caption's embedding once (``embeddings [P, L, D]``) and each item's row (``codes [N]``);
    ``input_ids [P, L]``: the distinct captions' tokens, for an encoder that trains (:class:`ConditionedUNet`)."""

    embeddings: torch.Tensor
    codes: torch.Tensor

    distinct: tuple[str, ...] = ()
    input_ids: torch.Tensor | None = None

    @classmethod
    def build(cls, pipeline: TextPipeline, captions: Sequence[str], extra: Sequence[str] = ()) -> PromptTable:
        """The table of ``captions`` (one code per caption); ``extra`` texts are encoded too without items."""
        distinct = np.unique(np.asarray([*captions, *extra], dtype=str))
        codes = np.searchsorted(distinct, np.asarray(captions, dtype=str))
        ids = tokenize(pipeline, distinct)
        return cls(encode_ids(pipeline, ids), torch.from_numpy(codes.astype(np.int64)), tuple(distinct), ids)

    def code_of(self, text: str) -> int:
        if text not in self.distinct:
            raise ValueError(f"{text!r} is not in the prompt table; build it with extra=[{text!r}]")
        return self.distinct.index(text)


class ConditionedUNet(nn.Module):
    """``model(sample, t)`` of a conditional UNet over a :class:`PromptTable`: the training loop's observer
    (:meth:`observe`) names the batch's items, whose embeddings the next forward pass attends to."""

    def __init__(
        self,
        unet,
        table: PromptTable,
        *,
        caption_dropout: float = 0.0,
        seed: int = 0,
        text_encoder: nn.Module | None = None,
    ) -> None:
        """``caption_dropout``: the share of training items that see the empty prompt instead of their caption
        (drawn per batch from ``seed``), which trains the unconditional branch that classifier-free guidance
        pushes against; ``table`` must then hold the empty caption. ``text_encoder``: encode the table's
        ``input_ids`` anew in every forward pass instead of reading its embeddings, so that the encoder trains with
        the UNet."""
        super().__init__()
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {caption_dropout}")
        if text_encoder is not None and (table.input_ids is None or len(table.input_ids) != len(table.embeddings)):
            raise ValueError("a trained text encoder needs the token ids of every caption of the table, in its order")
        self.unet = unet
        self.text_encoder = text_encoder
        self.register_buffer("input_ids", table.input_ids if text_encoder is not None else None, persistent=False)
        self.register_buffer("embeddings", table.embeddings, persistent=False)
        self.register_buffer("codes", table.codes, persistent=False)
        self.caption_dropout = float(caption_dropout)
        self._empty = table.code_of("") if caption_dropout else None
        self._generator = torch.Generator().manual_seed(seed)
        self._batch: torch.Tensor | None = None

    @property
    def config(self):
        return self.unet.config

    def observe(self, model, index: torch.Tensor, *_) -> None:
        codes = self.codes[index]
        if self.caption_dropout:
            dropped = torch.rand(len(index), generator=self._generator) < self.caption_dropout
            codes = torch.where(dropped.to(codes.device), self._empty, codes)
        self._batch = codes

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None):
        """The UNet under the observed batch's captions, or under ``encoder_hidden_states`` when given (inputs that
        are not training items: In-Run Data Shapley's validation images)."""
        if encoder_hidden_states is None:
            if self._batch is None or len(self._batch) != len(sample):
                raise RuntimeError(
                    "ConditionedUNet needs its batch's item indices: pass observer=model.observe to train"
                )
            embeddings = self.embeddings if self.text_encoder is None else self.text_encoder(self.input_ids)[0]
            encoder_hidden_states = embeddings[self._batch]
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)


def pretrain(
    pipeline: TextPipeline,
    images: np.ndarray,
    captions: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    caption_dropout: float = 0.0,
    train_text_encoder: bool = True,
    **training,
):
    """Train the whole base UNet on captioned ``images``: the stand-in's pre-training, with ``caption_dropout`` of
    the items shown the empty prompt (:class:`ConditionedUNet`), and the text encoder trained with it unless
    ``train_text_encoder`` is false (a frozen random encoder barely separates the captions: benchmarks/RESULTS.md,
    "Text conditioning: what the figures say"). ``training``: more options of :func:`diffcredit.training.train`,
    e.g. ``snr_gamma``. Both are frozen again afterwards."""
    from diffcredit.seeds import derive_seed
    from diffcredit.training import train

    table = PromptTable.build(pipeline, captions, extra=[""] if caption_dropout else ())
    encoder = pipeline.text_encoder.requires_grad_(True) if train_text_encoder else None
    conditioned = ConditionedUNet(
        pipeline.unet.requires_grad_(True),
        table,
        caption_dropout=caption_dropout,
        seed=derive_seed(seed, "caption-dropout"),
        text_encoder=encoder,
    )
    result = train(
        conditioned,
        images,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        schedule=pipeline.schedule,
        observer=conditioned.observe,
        **training,
    )
    _frozen(pipeline.unet)
    _frozen(pipeline.text_encoder)
    return result


def generate(
    pipeline: TextPipeline,
    unet,
    prompts: Sequence[str],
    n: int,
    *,
    seed: int,
    guidance_scale: float = 1.0,
    batch_size: int = 64,
    device: str | None = None,
    **sampling,
) -> np.ndarray:
    """``n`` images (float32 ``[n, C, H, W]`` in ``[-1, 1]``) of ``unet``; image ``i`` is prompted with
    ``prompts[i % len(prompts)]`` and starts from the noise of item ``i`` of :func:`diffcredit.sampling.generate`, whose
    loop it runs (``sampling``: its inference_steps, sampler, precision, on_step, log_every).

    ``guidance_scale`` > 1 applies classifier-free guidance against the empty prompt. Latents are decoded by the
    pipeline's autoencoder (after dividing by its scaling factor).
    """
    from diffcredit.families.autoencoder import decode
    from diffcredit.sampling import generate as sample
    from diffcredit.training import select_device

    if n < 0 or not prompts:
        raise ValueError(f"need n >= 0 and prompts; got {n}, {len(prompts)}")
    target = select_device(device or "auto")
    pipeline.text_encoder.to(target)
    guided = guidance_scale != 1.0
    table = PromptTable.build(pipeline, prompts, extra=[""] if guided else ())
    embeddings = table.embeddings.to(target)
    empty = embeddings[table.code_of("")] if guided else None
    codes = table.codes[torch.arange(n) % len(prompts)].to(target)

    def predict(model_input: torch.Tensor, t: torch.Tensor, items: slice) -> torch.Tensor:
        states = embeddings[codes[items]]
        if not guided:
            return unet(model_input, t, encoder_hidden_states=states).sample
        both = torch.cat([empty.expand_as(states), states])
        unconditional, conditional = unet(
            torch.cat([model_input, model_input]), t, encoder_hidden_states=both
        ).sample.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    latent = pipeline.autoencoder is not None
    images = sample(
        unet,
        n,
        seed=seed,
        schedule=pipeline.schedule,
        batch_size=batch_size,
        device=str(target),
        clip=not latent,
        predict=predict,
        **sampling,
    )
    if latent:
        return decode(pipeline.autoencoder, images / pipeline.scaling_factor, batch_size=batch_size, device=str(target))
    return images


def _frozen(model):
    return model.eval().requires_grad_(False)
