"""Similarity baselines: how alike a contributor's training images are to the targets (SFT-Shapley's baselines).

For training item i and target m (a generated image of the full model, or a held-out real image), s_im is the cosine
similarity of their pixels (``pixel``) or of their embeddings by the reference's feature extractor (``embedding``; the
paper uses CLIP). A contributor's value is, per target, the mean (``*_mean``) or max (``*_max``) of s_im over its
items, averaged over the targets, as in the SFT-Shapley authors' baseline code. Training-free and blind to the
property; higher = more alike = ranked more valuable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from diffcredit.attribution import save_values
from diffcredit.contributors import ContributorData

if TYPE_CHECKING:
    from torch import nn

    from diffcredit.families import Family

SPACES = ("pixel", "embedding")
METHODS = tuple(f"{space}_similarity_{how}" for space in SPACES for how in ("mean", "max"))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] cosine similarities of the rows of `a` [N, ...] and `b` [M, ...] (flattened)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def contributor_scores(similarities: np.ndarray, data: ContributorData) -> pd.DataFrame:
    """``mean`` and ``max`` per contributor of item-by-target similarities [N, M] (per target, then the mean over
    the targets), contributors in ``data.contributor_ids`` order."""
    if similarities.shape[0] != len(data):
        raise ValueError(f"need one row of similarities per item ({len(data)}), got {similarities.shape[0]}")
    grouped = pd.DataFrame(similarities).groupby(np.asarray(data.contributors))
    table = pd.DataFrame({"mean": grouped.mean().mean(axis=1), "max": grouped.max().mean(axis=1)})
    return table.reindex(data.contributor_ids).rename_axis("contributor")


def write_values(
    *,
    train_data: str,
    targets: np.ndarray,
    reference: str,
    outs: dict[str, str],
    log: Callable[[str], None] = print,
) -> dict[str, pd.Series]:
    """The workflow's similarity stage: `outs` maps methods of :data:`METHODS` to their values files."""
    from diffcredit.properties import Reference
    from diffcredit.properties.features import extract_features

    unknown = set(outs) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown similarity methods {sorted(unknown)}; use {', '.join(METHODS)}")
    data = ContributorData.load(train_data)
    written = {}
    for space in SPACES:
        chosen = {m: p for m, p in outs.items() if m.startswith(space)}
        if not chosen:
            continue
        tic = time.perf_counter()
        if space == "pixel":
            sims = cosine(data.images, targets)
        else:
            extractor = Reference.load(reference).extractor
            sims = cosine(extract_features(extractor, data.images), extract_features(extractor, targets))
        table = contributor_scores(sims, data)
        seconds = time.perf_counter() - tic
        for method, path in chosen.items():
            written[method] = table[method.rsplit("_", 1)[1]].rename("value")
            save_values(written[method], Path(path), seconds=seconds)
        log(f"{space} similarity of {len(data)} items to {len(targets)} targets: {seconds:.1f} s")
    return written


def targets_for(
    *,
    target: str,
    family: Family,
    model: nn.Module,
    heldout_data: str,
    n_targets: int,
    seed: int,
    inference_steps: int,
    sampler: str,
) -> np.ndarray:
    """The pixel images the baselines compare with: the full `model`'s generations in its `family` (the run's
    generation noise, as the coalitions sample) or the first `n_targets` held-out real images."""
    from diffcredit.seeds import derive_seed

    if target == "generated":
        return family.generate(
            model,
            n_targets,
            seed=derive_seed(seed, "generation-noise"),
            inference_steps=inference_steps,
            sampler=sampler,
        )
    if target == "heldout":
        return ContributorData.load(heldout_data).images[:n_targets]
    raise ValueError(f"unknown similarity target {target!r}: choose generated or heldout")
