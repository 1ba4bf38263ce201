"""Aesthetic score: a quantile of a local predictor's scores over the generated images.

The paper scores Stable Diffusion art with the LAION aesthetic predictor (an MLP on CLIP image embeddings) and credits
its 90th percentile over 50 generations. Here the predictor is a head on the reference extractor's features (for
LAION: a CLIP image encoder as the extractor, the MLP as the predictor), given as a local file: TorchScript or
torch.export .pt2 (features [N, d] -> scores [N] or [N, 1]), or safetensors holding a linear head (`weight` [1, d],
optional `bias` [1]).

Yardstick: the predictor file and the extractor, no reference images; both must come from the buyer, not from
a contributor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from diffcredit.properties.features import extract_features, load_module, module_device


def load_predictor(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load an aesthetic head from a local safetensors (linear head), TorchScript or torch.export (.pt2) file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_module(path, device, role="aesthetic predictor (option predictor=)")
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic predictor (option predictor=) {str(path)!r} not found")
    tensors = load_file(path)
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or set(tensors) - {"weight", "bias"} or weight.numel() != weight.shape[-1]:
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        raise ValueError(
            f"{path}: a safetensors predictor is a linear head, 'weight' [1, d] and optionally 'bias' [1]; found {shapes}"
        )
    head = nn.Linear(weight.shape[-1], 1, bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight.reshape(1, -1))
        if bias is not None:
            head.bias.copy_(bias.reshape(1))
    return head.to(device).eval()


class AestheticScore:
    """The `quantile` of predicted aesthetic scores over the generated images (higher is better)."""

    name = "aesthetic"
    higher_is_better = True

    def __init__(self, extractor: nn.Module, predictor: nn.Module, quantile: float = 0.9) -> None:
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile={quantile}: choose a value in [0, 1] (the paper uses 0.9)")
        self.extractor, self.predictor, self.quantile = extractor, predictor, quantile

    def __call__(self, images: np.ndarray) -> float:
        feats = torch.from_numpy(extract_features(self.extractor, images)).float()
        with torch.no_grad():
            scores = self.predictor(feats.to(module_device(self.extractor)))
        if scores.shape not in {(len(feats),), (len(feats), 1)}:
            raise ValueError(f"the aesthetic predictor returned shape {tuple(scores.shape)}: expected [N] or [N, 1]")
        return float(np.quantile(scores.double().cpu().numpy(), self.quantile))
