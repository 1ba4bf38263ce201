"""LoRA (Hu et al. 2022) on a text-to-image UNet with peft: add, save and load in diffusers' format, prune by rank.

The adapter sits on the attention projections ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``, as diffusers'
``train_text_to_image_lora.py`` puts it, with ``lora_alpha = r`` (scale 1: the adapter adds ``B @ A``); only its
parameters train. Weights are saved as safetensors in diffusers' format (``pytorch_lora_weights.safetensors``) with
the peft config in the file's metadata, so ``load_lora_weights`` of a diffusers pipeline reads them too.

Pruning is the paper's ``prune_lora``: every rank component ``i`` of every module (row ``i`` of A, column ``i`` of B)
is scored by torch-pruning's ``MagnitudeImportance`` on its dependency group, which is 0.5·(‖A_i‖² + ‖B_:,i‖²) over
the module's mean, and components are removed in ascending score until the LoRA parameters left are at most
``keep`` times the original. A pruned LoRA has a rank per module; the peft config records it (``rank_pattern``) with
``alpha_pattern`` set so that every module keeps its scale, and a reload can neither fail nor silently rescale.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffcredit.io import atomic_dir

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "default"
WEIGHTS = "pytorch_lora_weights.safetensors"


def add_lora(unet, rank: int, *, seed: int) -> None:
    """Add a fresh rank-``rank`` adapter (A Gaussian, B zero: the model starts as the base) and freeze the rest."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(TARGET_MODULES)),
            adapter_name=ADAPTER,
        )
    for parameter in lora_parameters(unet):
        parameter.requires_grad_(True)


def lora_layers(unet) -> dict:
    """The peft LoRA layers of ``unet`` by module name."""
    from peft.tuners.lora.layer import LoraLayer

    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    return [
        p
        for layer in lora_layers(unet).values()
        for p in (*layer.lora_A[ADAPTER].parameters(), *layer.lora_B[ADAPTER].parameters())
    ]


def count_lora_parameters(unet) -> int:
    return sum(p.numel() for p in lora_parameters(unet))


def ranks(unet) -> dict[str, int]:
    """Each LoRA module's rank (rows of its A)."""
    return {name: layer.lora_A[ADAPTER].weight.shape[0] for name, layer in lora_layers(unet).items()}


def save_lora(unet, directory: str | Path) -> None:
    """Write the adapter as diffusers' ``pytorch_lora_weights.safetensors`` (config in its metadata), atomically."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    with atomic_dir(directory) as staging:
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            staging,
            unet_lora_layers=state,
            weight_name=WEIGHTS,
            unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
        )


def load_lora(unet, directory: str | Path) -> None:
    """Load an adapter written by :func:`save_lora` (or any diffusers LoRA of this UNet) into ``unet``.

    Raises ValueError if the weights' ranks disagree with the config recorded beside them, before loading.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    directory = Path(directory)
    if not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"{directory / WEIGHTS} not found; {directory} is not a LoRA saved by save_lora")
    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        directory, weight_name=WEIGHTS, return_lora_metadata=True
    )
    if metadata:
        _check_ranks(state, metadata, directory)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(
        state, alphas, unet=unet, adapter_name=ADAPTER, metadata=metadata
    )
    unet.requires_grad_(False)
    for parameter in lora_parameters(unet):
        parameter.requires_grad_(True)


def _check_ranks(state: dict, metadata: dict, directory: Path) -> None:
    config = _unprefixed(metadata)
    pattern = config.get("rank_pattern") or {}
    wrong = [
        f"{module}: rank {rank}, config {pattern.get(module, config['r'])}"
        for module, rank in _ranks_of(state).items()
        if rank != pattern.get(module, config["r"])
    ]
    if wrong:
        raise ValueError(
            f"{directory / WEIGHTS}: {len(wrong)} module(s) have weights whose rank disagrees with the "
            f"recorded LoRA config (r, rank_pattern), e.g. {wrong[0]}; the file was edited or pruned "
            "without updating its config: save it again with save_lora"
        )


def _ranks_of(state: dict) -> dict[str, int]:
    """Module name -> rank, from a diffusers-format state dict (``unet.<module>.lora.down.weight``)."""
    suffix = ".lora.down.weight"
    return {
        key.removeprefix("unet.").removesuffix(suffix): tensor.shape[0]
        for key, tensor in state.items()
        if key.endswith(suffix)
    }


def _unprefixed(metadata: dict) -> dict:
    """The UNet's peft config out of diffusers' metadata (keys ``unet.r``, ``unet.rank_pattern``, ...)."""
    return {key.removeprefix("unet."): value for key, value in metadata.items() if key.startswith("unet.")}


def importance(layer) -> torch.Tensor:
    """torch-pruning's magnitude importance of each rank component of one LoRA layer, on its dependency group.

    The group couples the outputs of A with the inputs of B and nothing else, so the graph of the layer alone gives
    the same group as that of the whole UNet.
    """
    import torch_pruning as tp

    down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(
            layer, example_inputs=torch.zeros(1, down.in_features, device=down.weight.device)
        )
        group = graph.get_pruning_group(down, tp.prune_linear_out_channels, idxs=list(range(down.out_features)))
        scores = tp.importance.MagnitudeImportance(p=2)(group)
    del up  # named for the reader: the group holds B's input channels
    return scores.detach().cpu()


def prune_lora(unet, keep: float) -> dict:
    """Remove LoRA rank components of ``unet`` in place until at most ``keep`` of the LoRA parameters remain.

    Components go in ascending :func:`importance` (ties in module order); a module keeps at least one component.
    Returns the parameter counts before and after, and the rank of every module after.
    """
    import torch_pruning as tp

    if not 0.0 < keep < 1.0:
        raise ValueError(f"LoRA keep ratio must be in (0, 1): the share of LoRA parameters kept; got {keep}")
    layers = lora_layers(unet)
    if not layers:
        raise ValueError("the UNet has no LoRA adapter to prune; add or load one first")
    before = count_lora_parameters(unet)
    nodes = []  # (score, order, module, component, parameters of the component)
    for name, layer in layers.items():
        down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        size = down.in_features + up.out_features
        nodes += [(float(s), len(nodes) + i, name, i, size) for i, s in enumerate(importance(layer))]
    remaining, target = before, keep * before
    removed: dict[str, list[int]] = {name: [] for name in layers}
    for _, _, name, component, size in sorted(nodes):
        if remaining <= target:
            break
        if len(removed[name]) + 1 < layers[name].lora_A[ADAPTER].out_features:
            removed[name].append(component)
            remaining -= size
    config = unet.peft_config[ADAPTER]
    for name, components in removed.items():
        if not components:
            continue
        layer = layers[name]
        scale = layer.scaling[ADAPTER]
        tp.prune_linear_out_channels(layer.lora_A[ADAPTER], idxs=components)
        tp.prune_linear_in_channels(layer.lora_B[ADAPTER], idxs=components)
        rank = layer.lora_A[ADAPTER].out_features
        layer.r[ADAPTER], layer.lora_alpha[ADAPTER] = rank, scale * rank  # the scale alpha/r stays as it was
        config.rank_pattern = {**config.rank_pattern, name: rank}
        config.alpha_pattern = {**config.alpha_pattern, name: scale * rank}
    return {
        "lora_parameters_before": before,
        "lora_parameters_after": count_lora_parameters(unet),
        "keep": keep,
        "ranks": ranks(unet),
    }


def read_ranks(directory: str | Path) -> dict[str, int]:
    """The rank of every module of a saved LoRA, from its weights."""
    from safetensors.torch import load_file

    return _ranks_of(load_file(Path(directory) / WEIGHTS))


def saved_config(directory: str | Path) -> dict:
    """The peft config recorded in a saved LoRA's metadata (empty if none was recorded)."""
    from safetensors import safe_open

    with safe_open(Path(directory) / WEIGHTS, framework="pt") as handle:
        return _unprefixed(json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}")))
