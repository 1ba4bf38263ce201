"""Adaptive budgets: measure coalitions in rounds of a prefix-stable plan until a stopping rule holds.

Round r evaluates the first ``budget + r·round_budget`` rows of one plan (capped at ``max_budget`` and at the 2ⁿ
distinct coalitions), so every round reuses the coalitions of the rounds before it and only measures the new rows.
After each round the values are aggregated and :func:`decide` says whether another round runs:

- ``none``: one round of ``budget`` coalitions (no adaptive budget);
- ``halfwidth``: stop once every contributor's interval half-width is at most ``target`` (utility units), or at
  most ``target`` times the largest absolute value when ``relative`` is set;
- ``rank_stable``: stop once the Spearman correlation of the contributors' values between this round and the one
  before is at least ``target`` (1 = the same order); never after the first round.

The last round stops whatever the rule says: the budget is spent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from diffcredit.io import write_json

RULES = ("none", "halfwidth", "rank_stable")


@dataclass(frozen=True)
class Decision:
    """What the stopping rule made of one round's values."""

    round: int
    n_coalitions: int
    stop: bool
    reason: str
    rule: str
    target: float | None
    max_halfwidth: float
    rank_correlation: float | None


def check_stopping(stopping: dict, *, sampled: bool, budget: int) -> None:
    """Refuse a stopping configuration that cannot run, naming the key to fix."""
    rule = stopping["rule"]
    if rule not in RULES:
        raise ValueError(f"estimator.stopping.rule {rule!r} is unknown; choose one of {', '.join(RULES)}")
    if rule == "none":
        return
    if not sampled:
        raise ValueError(
            f"estimator.stopping.rule {rule!r} needs a sampled estimator: this one evaluates a fixed "
            "set of coalitions, so a larger budget adds none; set estimator.stopping.rule: none"
        )
    if stopping.get("target") is None:
        raise ValueError(
            f"estimator.stopping.rule {rule!r} needs estimator.stopping.target "
            "(a half-width for halfwidth, a Spearman correlation for rank_stable)"
        )
    if rule == "rank_stable" and not 0 < stopping["target"] <= 1:
        raise ValueError(f"estimator.stopping.target {stopping['target']} is not a Spearman correlation in (0, 1]")
    if stopping["max_budget"] < budget:
        raise ValueError(
            f"estimator.stopping.max_budget {stopping['max_budget']} is below estimator.budget "
            f"{budget}; raise max_budget or lower the budget"
        )


def round_sizes(budget: int, round_budget: int, max_budget: int, limit: int | None = None) -> list[int]:
    """Coalitions evaluated by each round: budget, budget + round_budget, ... up to max_budget (and `limit`)."""
    if round_budget < 1:
        raise ValueError(f"round_budget must be a positive number of coalitions, got {round_budget}")
    cap = max_budget if limit is None else min(max_budget, limit)
    sizes = list(range(min(budget, cap), cap, round_budget))
    return [*sizes, cap]


def half_widths(values: pd.DataFrame) -> np.ndarray:
    return ((values["ci_high"] - values["ci_low"]) / 2).to_numpy(float)


def decide(
    values: pd.DataFrame,
    previous: pd.DataFrame | None,
    *,
    round: int,
    n_coalitions: int,
    rule: str,
    target: float | None,
    relative: bool = False,
    last: bool = False,
) -> Decision:
    """Whether the rounds stop after `values` (a values table: contributor, value, ci_low, ci_high).

    `previous` is the round before's values table (None for the first round); `last` says the budget is spent.
    """
    widest = float(np.max(half_widths(values), initial=0.0))
    scale = float(values["value"].abs().max()) if relative else 1.0
    correlation = None
    if previous is not None:
        both = (
            values.set_index("contributor")["value"]
            .to_frame("now")
            .join(previous.set_index("contributor")["value"].rename("before"), how="inner")
        )
        rho = both["now"].corr(both["before"], method="spearman")
        correlation = None if np.isnan(rho) else float(rho)
    if rule == "none":
        stop, reason = True, "a single round (estimator.stopping.rule: none)"
    elif rule == "halfwidth":
        unit = "× the largest |value|" if relative else "utility units"
        measured = widest / scale if scale > 0 else np.inf
        stop = measured <= target
        reason = f"largest half-width {measured:.4g} {'≤' if stop else '>'} target {target:g} ({unit})"
    elif rule == "rank_stable":
        stop = correlation is not None and correlation >= target
        reason = (
            "no earlier round to compare the ranking with"
            if previous is None
            else f"Spearman correlation with the previous round {correlation if correlation is not None else 'n/a'}"
            f" {'≥' if stop else '<'} target {target:g}"
        )
    else:
        raise ValueError(f"unknown stopping rule {rule!r}; choose one of {', '.join(RULES)}")
    if last and not stop:
        stop, reason = True, f"budget spent ({n_coalitions} coalitions, estimator.stopping.max_budget); {reason}"
    return Decision(round, n_coalitions, bool(stop), reason, rule, target, widest, correlation)


def write_decision(decision: Decision, path: str | os.PathLike[str]) -> None:
    write_json(path, asdict(decision))


def read_decision(path: str | os.PathLike[str]) -> Decision:
    with open(path) as handle:
        return Decision(**json.load(handle))


def rounds_table(values: Sequence[pd.DataFrame], decisions: Sequence[Decision]) -> pd.DataFrame:
    """One row per (round, contributor): the round's value and interval, and the round's stopping decision."""
    parts = []
    for table, decision in zip(values, decisions, strict=True):
        part = table[["contributor", "value", "stderr", "ci_low", "ci_high"]].copy()
        part.insert(0, "n_coalitions", decision.n_coalitions)
        part.insert(0, "round", decision.round)
        part["stop"] = decision.stop
        part["reason"] = decision.reason
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def round_of(n_coalitions: Sequence[int] | np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """The first round whose plan holds `n_coalitions` rows (rounds evaluate `sizes` rows each)."""
    return np.searchsorted(np.asarray(sizes), np.asarray(n_coalitions), side="left")
