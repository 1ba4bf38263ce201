"""Add-one-in: what a contributor's data does alone, v({i}) − v(∅), with an interval over training seeds.

The utilities are the coalition utilities of the run (:func:`diffcredit.utility.evaluate_coalitions`, the same mode,
settings and store as the Shapley plans, so singletons an estimator already measured are reused). Repeat r of v({i})
and of v(∅) use training seed r; the value is the mean over repeats of v({i}, r) − v(∅, r), its stderr the standard
deviation over repeats / √repeats, and the interval normal at `confidence`. Cheap (n + 1 coalitions), blind to
interactions: the first term of the Shapley sum only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from diffcredit.attribution import save_values
from diffcredit.contributors import ContributorData
from diffcredit.utility import UtilitySettings, UtilityStore, evaluate_coalitions

EMPTY = "empty"


def singleton_plan(contributors: Sequence[str]) -> pd.DataFrame:
    """The coalition table of add-one-in: the empty coalition and every singleton (coalition id = contributor id)."""
    contributors = list(contributors)
    if EMPTY in contributors:
        raise ValueError(f"contributor id {EMPTY!r} is reserved by add-one-in for the empty coalition; rename it")
    return pd.DataFrame({"coalition": [EMPTY, *contributors], "members": ["", *contributors]})


def values_from(utilities: pd.DataFrame, contributors: Sequence[str], confidence: float = 0.95) -> pd.DataFrame:
    """value, stderr, ci_low, ci_high and repeats per contributor from utilities (``coalition``, ``repeat``,
    ``utility``) of :func:`singleton_plan`."""
    table = utilities.pivot_table(index="repeat", columns="coalition", values="utility", aggfunc="mean")
    missing = [c for c in [EMPTY, *contributors] if c not in table.columns]
    if missing:
        raise ValueError(f"no utilities for {missing[:3]}: measure the singleton plan first")
    gains = table[list(contributors)].sub(table[EMPTY], axis=0)
    repeats = gains.notna().sum()
    value = gains.mean()
    stderr = gains.std(ddof=1) / np.sqrt(repeats) if len(gains) > 1 else value * np.nan
    half = norm.ppf(0.5 + confidence / 2) * stderr
    return pd.DataFrame(
        {"value": value, "stderr": stderr, "ci_low": value - half, "ci_high": value + half, "repeats": repeats}
    ).rename_axis("contributor")


def write_values(
    *,
    train_data: str,
    reference: str,
    start_model: str | None,
    store: str,
    settings: UtilitySettings,
    repeats: int,
    out: str,
    confidence: float = 0.95,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """The workflow's add-one-in stage: measure (or reuse) v(∅) and v({i}) over `repeats` seeds, write values.csv."""
    tic = time.perf_counter()
    data = ContributorData.load(train_data)
    plan = singleton_plan(data.contributor_ids)
    utilities = evaluate_coalitions(
        plan,
        repeats=repeats,
        data=data,
        settings=settings,
        start_model=start_model,
        store=UtilityStore(store),
        reference_dir=reference,
        log=log,
    )
    table = values_from(utilities, data.contributor_ids, confidence)
    seconds = time.perf_counter() - tic
    save_values(
        table["value"],
        Path(out),
        **table.drop(columns="value"),
        seconds=float(utilities["seconds"].sum()),
        wall_seconds=seconds,
    )
    return table
