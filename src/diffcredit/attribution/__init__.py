"""Attribution methods other than Shapley values of fine-tuned coalitions, scored on the same footing.

- :mod:`~diffcredit.attribution.trak`: the TRAK family (TRAK, D-TRAK, Journey-TRAK, relative and renormalised
  influence, gradient similarity) on one streamed random projection (:mod:`~diffcredit.attribution.projection`);
- :mod:`~diffcredit.attribution.inrun`: In-Run Data Shapley (Wang et al. 2024) to second order, accumulated during
  the training run of the credited model;
- :mod:`~diffcredit.attribution.similarity`: pixel and embedding similarity to the targets;
- :mod:`~diffcredit.attribution.heuristics`: the SFT-Shapley paper's property heuristics;
- :mod:`~diffcredit.attribution.addition`: add-one-in, v({i}) − v(∅) with intervals;
- :mod:`~diffcredit.attribution.ensembles`: encoded ensembles (Dai & Gifford 2023), exact leave-one-contributor-out
  and a size-matched in-versus-out contrast.

Every method returns a ``pd.Series`` of contributor scores indexed by contributor id (in
:attr:`ContributorData.contributor_ids` order) where higher means more valuable for the credited property, so the LDS
and counterfactual evaluations treat them like Shapley values. This module holds what the methods share: the per-item
denoising loss written functionally (for ``torch.func``), summing item scores per contributor, and the values file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call

from diffcredit.contributors import ContributorData
from diffcredit.io import write_atomic

Params = dict[str, torch.Tensor]


def model_output(
    model: nn.Module,
    params: Params,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    conditions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's prediction with ``params`` swapped in (buffers are the model's own); ``conditions``: a
    conditional UNet's ``encoder_hidden_states``."""
    extra = {} if conditions is None else {"encoder_hidden_states": conditions}
    return functional_call(model, params, (noisy, timesteps), extra).sample


def detached_params(model: nn.Module) -> Params:
    """The trainable parameters as plain tensors, the primal point of ``torch.func`` transforms."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


AGGREGATES = ("sum", "mean", "max")


def contributor_totals(item_scores: np.ndarray, data: ContributorData, how: str = "sum") -> pd.Series:
    """Aggregate per-item scores over each contributor's items (contributors in ``data.contributor_ids`` order).

    `how`: ``sum`` (what a linear datamodel and In-Run Data Shapley call a group's value), ``mean`` or ``max``
    (the per-contributor aggregates of the SFT-Shapley authors' baseline code).
    """
    if how not in AGGREGATES:
        raise ValueError(f"unknown aggregate {how!r}; use one of {', '.join(AGGREGATES)}")
    item_scores = np.asarray(item_scores, dtype=np.float64)
    if item_scores.shape != (len(data),):
        raise ValueError(f"need one score per item ({len(data)}), got shape {item_scores.shape}")
    totals = pd.Series(item_scores).groupby(data.contributors).agg(how)
    return totals.reindex(data.contributor_ids).rename_axis("contributor").rename("value")


def save_values(scores: pd.Series, out: str | Path, **columns: pd.Series | object) -> None:
    """Write ``contributor, value[, extra columns...]`` as CSV (the layout of values.csv), atomically.

    Extra columns are Series aligned on the contributor index or scalars repeated on every row (e.g. ``seconds``).
    """
    table = pd.DataFrame({"value": scores, **columns}, index=scores.index).rename_axis("contributor")
    table["rank"] = table["value"].rank(ascending=False, method="min").astype(int)
    write_atomic(Path(out), lambda tmp: table.reset_index().to_csv(tmp, index=False))
