"""Property heuristics of the SFT-Shapley paper: a contributor's value read off its own training images.

- ``aesthetic_mean`` / ``aesthetic_max``: the mean or max aesthetic score of the contributor's training images under
  the configured predictor (the ArtBench case: the LAION head on the reference extractor's embeddings);
- ``embedding_distance``: the distance of the contributor's mean embedding from the mean embedding of all training
  images (the diversity case: a contributor far from the crowd is taken to add diversity).

No model is trained or differentiated; higher = ranked more valuable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffcredit.attribution import contributor_totals, save_values
from diffcredit.contributors import ContributorData

METHODS = ("aesthetic_mean", "aesthetic_max", "embedding_distance")


def embedding_distance(embeddings: np.ndarray, data: ContributorData) -> pd.Series:
    """‖mean embedding of a contributor's items − mean embedding of all items‖ per contributor."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    centre = embeddings.mean(axis=0)
    means = pd.DataFrame(embeddings).groupby(np.asarray(data.contributors)).mean()
    distances = pd.Series(np.linalg.norm(means.to_numpy() - centre, axis=1), index=means.index)
    return distances.reindex(data.contributor_ids).rename_axis("contributor").rename("value")


def aesthetic_scores(embeddings: np.ndarray, predictor: torch.nn.Module) -> np.ndarray:
    """The predictor's score of every embedding [N, d] -> [N]."""
    with torch.no_grad():
        scores = predictor(torch.from_numpy(np.asarray(embeddings, dtype=np.float32)))
    if scores.shape not in {(len(embeddings),), (len(embeddings), 1)}:
        raise ValueError(f"the aesthetic predictor returned shape {tuple(scores.shape)}: expected [N] or [N, 1]")
    return scores.reshape(-1).double().numpy()


def write_values(
    *,
    train_data: str,
    reference: str,
    outs: dict[str, str],
    predictor: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, pd.Series]:
    """The workflow's heuristics stage: `outs` maps methods of :data:`METHODS` to their values files."""
    from diffcredit.properties import Reference
    from diffcredit.properties.aesthetic import load_predictor
    from diffcredit.properties.features import extract_features

    unknown = set(outs) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown heuristics {sorted(unknown)}; use {', '.join(METHODS)}")
    if predictor is None and any(m.startswith("aesthetic") for m in outs):
        raise ValueError(
            "the aesthetic heuristics need an aesthetic predictor: set baselines.heuristics.predictor "
            "(or utility.property_options.predictor) to a local TorchScript or safetensors head"
        )
    tic = time.perf_counter()
    data = ContributorData.load(train_data)
    embeddings = extract_features(Reference.load(reference).extractor, data.images)
    values = {}
    if "embedding_distance" in outs:
        values["embedding_distance"] = embedding_distance(embeddings, data)
    if predictor is not None and any(m.startswith("aesthetic") for m in outs):
        scores = aesthetic_scores(embeddings, load_predictor(predictor))
        values["aesthetic_mean"] = contributor_totals(scores, data, "mean")
        values["aesthetic_max"] = contributor_totals(scores, data, "max")
    seconds = time.perf_counter() - tic
    for method, path in outs.items():
        save_values(values[method], Path(path), seconds=seconds)
    log(f"heuristics {', '.join(outs)} of {len(data)} items: {seconds:.1f} s")
    return {method: values[method] for method in outs}
