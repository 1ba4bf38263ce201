"""From values to money: shares of a budget with intervals, and a statement each contributor could be shown.

The rule (`RULE`), applied to a values table (``contributor``, ``value``, ``stderr``, ``ci_low``, ``ci_high`` and,
as ``values.csv`` has it, ``df``):

1. A contributor whose interval lies below zero (``ci_high < 0``) harmed the property: share 0.
2. Every other contributor is paid in proportion to ``max(value, 0)``: a value at or below zero gets nothing, and
   an uncertain value (an interval that includes zero) is paid by its estimate, not shrunk; its share interval shows
   how far that payment could move. The shares sum to the budget, unless no value is positive, when nothing is paid
   and the whole budget is reported as unallocated.
3. Share intervals follow the values' own intervals: each value is drawn from the distribution its interval was
   made from, independently, ``draws`` times, seeded.

   - A table with ``df`` (``values.csv``: its intervals are t-intervals) draws value + stderr · T, T a Student t of
     the value's ``df`` (normal where df is infinite or missing): the draws' central range at the table's level is
     then exactly [ci_low, ci_high], and a value measured with fewer degrees of freedom (a wider interval) gets a
     wider share interval. A value with stderr 0 is exact and is not drawn. Intervals that are not these
     t-intervals (asymmetric ones, an exact value's with a width, contributors' intervals at different levels) are
     refused, since no share interval could follow them.
   - A table without ``df`` (add-one-in's, the multi-fidelity values) draws normals scaled so that their central
     ``level`` range (the values' level, default 0.95) is exactly [ci_low, ci_high]; asymmetric intervals are
     refused.

   Each draw is paid by rule 2 with the harmful set of rule 1 fixed; the share interval is the central
   ``confidence`` range of a contributor's share over the draws, the point share rule 2 on the point values. When a
   single value varies, its share interval is exactly the share at the ends of its interval. Values of a Shapley
   estimate are correlated (they sum to v(N) − v(∅)), which independent draws ignore, so the intervals are wider than
   a joint resampling would give: conservative for a payer who wants to know how much a share could move.

A payout names the yardstick that measured the values: the statements and the payout table's metadata carry the
reference's provenance (`diffcredit.properties.reference_provenance`: a trusted reference with its source, path and
digest, or the warning that the contributors shaped their own yardstick), or say that it is not stated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import ndtri, stdtr

RULE = (
    "share 0 when the value's interval lies below zero; otherwise shares proportional to max(value, 0), summing to "
    "the budget; share intervals from draws of each value by its own interval (value + stderr · Student t of its df, or "
    "a normal spanning its interval), paid by the same rule"
)
VALUE_COLUMNS = ("contributor", "value", "stderr", "ci_low", "ci_high")
NOT_STATED = (
    "not stated: this payout was made without the run's reference folder, so it does not say which yardstick "
    "measured the values"
)


def payout(
    values: pd.DataFrame,
    budget: float,
    *,
    confidence: float = 0.95,
    level: float = 0.95,
    draws: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Shares of `budget` for the contributors of a values table, by `RULE`.

    `confidence` is the level of the share intervals; `level` that of the values' intervals, needed only for a table
    without ``df`` (a table with ``df`` carries its own definition).

    Returns one row per contributor, in the table's order: the value columns and ``df`` (inf: a normal interval),
    ``rank`` (1 = the highest value), ``status`` (``harmful``: interval below zero; ``not positive``: value <= 0,
    interval reaches zero; ``uncertain``: paid, interval includes zero; ``positive``: paid, interval above zero),
    ``share``, ``share_low``, ``share_high`` (in the budget's unit) and ``fraction`` (share / budget).
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level}: give the values' confidence level in (0, 1), e.g. 0.95")
    table = _checked(values)
    if not np.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget={budget}: give a positive amount to share out")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: choose a level in (0, 1), e.g. 0.95")
    if draws < 1:
        raise ValueError(f"draws={draws}: use at least 1 (10,000 gives intervals to about 1% of the budget)")
    value = table["value"].to_numpy(float)
    df = table["df"].to_numpy(float)
    if "df" in values:
        scale = np.nan_to_num(table["stderr"].to_numpy(float))  # an exact value (no stderr) does not vary
    else:  # a normal whose central `level` range is the stated interval
        scale = (table["ci_high"] - table["ci_low"]).to_numpy(float) / 2 / ndtri(0.5 + level / 2)
    harmful = table["ci_high"].to_numpy(float) < 0
    point = _shares(value[None, :], harmful, budget)[0]
    rng = np.random.default_rng(seed)
    drawn = _shares(value + scale * _student_t(rng, df, draws), harmful, budget)
    tail = (1 - confidence) / 2
    low, high = np.quantile(drawn, [tail, 1 - tail], axis=0)
    ci_low = table["ci_low"].to_numpy(float)
    status = np.where(
        harmful, "harmful", np.where(value <= 0, "not positive", np.where(ci_low <= 0, "uncertain", "positive"))
    )
    out = table.loc[:, [*VALUE_COLUMNS, "df"]].copy()
    out["rank"] = out["value"].rank(ascending=False, method="min").astype(int)
    out["status"] = status
    out["share"], out["share_low"], out["share_high"] = point, low, high
    out["fraction"] = point / budget
    return out


def unallocated(shares: pd.DataFrame, budget: float) -> float:
    """The part of `budget` that the rule pays to no one (all of it when no value is positive, else ~0)."""
    return float(budget - shares["share"].sum())


def values_level(values_path: str | Path, confidence: float | None = None) -> float:
    """The level of a values table's intervals: its sidecar's ``confidence``, else `confidence`, else 0.95.

    The sidecar is the JSON beside the table (``values.json`` beside ``values.csv``, as `ValuationResult.save` writes
    it). A `confidence` that differs from it is refused: it would misread the intervals of a table without ``df``.
    """
    sidecar = Path(values_path).with_suffix(".json")
    stated = json.loads(sidecar.read_text()).get("confidence") if sidecar.is_file() else None
    if stated is None:
        return 0.95 if confidence is None else confidence
    if confidence is not None and not math.isclose(confidence, stated, abs_tol=1e-9):
        raise ValueError(
            f"confidence {confidence:g} differs from the values' own level {stated:g} ({str(sidecar)!r}): "
            f"pass --confidence {stated:g}, or leave it out to use the values' level"
        )
    return float(stated)


def metadata(shares: pd.DataFrame, budget: float, *, confidence: float, yardstick: dict | None = None) -> dict:
    """What the payout table does not say itself: budget, rule, interval level, unallocated part and the yardstick
    (`reference_provenance`'s record, None when not stated), with the yardstick's sentence."""
    return {
        "budget": budget,
        "confidence": confidence,
        "rule": RULE,
        "unallocated": unallocated(shares, budget),
        "yardstick": yardstick,
        "yardstick_statement": _yardstick_statement(yardstick),
    }


def statements(
    shares: pd.DataFrame,
    *,
    coalitions: pd.DataFrame | None = None,
    utilities: pd.DataFrame | None = None,
    budget: float | None = None,
    yardstick: dict | None = None,
) -> dict[str, dict]:
    """One statement per contributor: value, interval, rank, share with interval, status, the rule, the yardstick
    and evidence.

    `yardstick` is the reference's provenance (`reference_provenance`); without it the statement says the yardstick
    is not stated. With `coalitions` (``coalition``, ``members``) and `utilities` (``coalition``, ``utility``;
    repeats are averaged) the evidence lists every measured coalition that contains the contributor with its utility,
    and the mean utility of the measured coalitions with and without them.
    """
    measured: Mapping[str, tuple[tuple[str, ...], float, int]] = {}
    if coalitions is not None and utilities is not None:
        measured = _measured(coalitions, utilities)
    n = len(shares)
    result = {}
    for row in shares.itertuples(index=False):
        statement = {
            "contributor": row.contributor,
            "value": row.value,
            "stderr": row.stderr,
            "df": float(row.df) if np.isfinite(row.df) else None,  # None: a normal interval (JSON has no infinity)
            "interval": [row.ci_low, row.ci_high],
            "rank": int(row.rank),
            "of": n,
            "status": row.status,
            "share": row.share,
            "share_interval": [row.share_low, row.share_high],
            "fraction": row.fraction,
            "budget": budget,
            "rule": RULE,
            "yardstick": yardstick,
            "yardstick_statement": _yardstick_statement(yardstick),
        }
        if measured:
            with_them = [(c, len(m), u, k) for c, (m, u, k) in measured.items() if row.contributor in m]
            without = [u for m, u, _ in measured.values() if row.contributor not in m]
            statement["evidence"] = {
                "coalitions_with": [
                    {"coalition": c, "size": size, "utility": u, "measurements": k} for c, size, u, k in with_them
                ],
                "mean_utility_with": float(np.mean([u for _, _, u, _ in with_them])) if with_them else None,
                "mean_utility_without": float(np.mean(without)) if without else None,
            }
        result[row.contributor] = statement
    return result


def statement_text(statement: dict) -> str:
    """A statement as Markdown, for the contributor it is about."""
    low, high = statement["interval"]
    share_low, share_high = statement["share_interval"]
    lines = [
        f"# Statement for {statement['contributor']}",
        "",
        f"- yardstick: {statement['yardstick_statement']}",
        f"- value: {statement['value']:.4g} (interval {low:.4g} to {high:.4g}, stderr {statement['stderr']:.3g}"
        + (f", df {statement['df']:.3g})" if statement.get("df") is not None else ")"),
        f"- rank: {statement['rank']} of {statement['of']}",
        f"- share: {statement['share']:.2f} (interval {share_low:.2f} to {share_high:.2f}; "
        f"{statement['fraction']:.1%} of the budget"
        + (f" of {statement['budget']:g})" if statement["budget"] is not None else ")"),
        f"- status: {statement['status']}",
        f"- rule: {statement['rule']}",
    ]
    evidence = statement.get("evidence")
    if evidence:
        rows = evidence["coalitions_with"]
        lines += [
            "",
            f"## Evidence: the {len(rows)} measured coalitions with you",
            "",
            f"Mean utility with you {_fmt(evidence['mean_utility_with'])}, "
            f"without you {_fmt(evidence['mean_utility_without'])} (higher is better).",
            "",
            "| coalition | size | utility | measurements |",
            "| --- | --- | --- | --- |",
            *(f"| {r['coalition']} | {r['size']} | {r['utility']:.4g} | {r['measurements']} |" for r in rows),
        ]
    return "\n".join(lines) + "\n"


def _shares(values: np.ndarray, harmful: np.ndarray, budget: float) -> np.ndarray:
    """Rule 2 for each row of `values` [draws, n]: budget * max(v, 0) / sum, 0 for `harmful` and all-zero rows."""
    weights = np.where(harmful, 0.0, np.maximum(values, 0.0))
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(budget * weights, total, out=np.zeros_like(weights), where=total > 0)


def _checked(values: pd.DataFrame) -> pd.DataFrame:
    missing = [column for column in VALUE_COLUMNS if column not in values.columns]
    if missing:
        raise ValueError(
            f"the values table lacks column(s) {missing}: give {', '.join(VALUE_COLUMNS)} (values.csv has them)"
        )
    if values.empty:
        raise ValueError("the values table has no contributors")
    if values["contributor"].duplicated().any():
        raise ValueError(
            f"contributor {values['contributor'][values['contributor'].duplicated()].iloc[0]!r} "
            "appears twice in the values table"
        )
    numbers = values.loc[:, list(VALUE_COLUMNS[1:])].apply(pd.to_numeric, errors="coerce")
    bad = ~np.isfinite(numbers[["value", "ci_low", "ci_high"]].to_numpy(float)).all(axis=1)
    if bad.any():
        raise ValueError(
            f"contributor {values['contributor'].iloc[int(np.argmax(bad))]!r} has no finite value or "
            "interval: pay only values that were estimated"
        )
    if (numbers["stderr"] < 0).any():
        raise ValueError("a stderr is negative: check the values table")
    # Without df the intervals are normal ones (add-one-in's); a missing df (an exact value's) is infinite too.
    numbers["df"] = pd.to_numeric(values["df"], errors="coerce").fillna(np.inf) if "df" in values else np.inf
    if (numbers["df"] <= 0).any():
        raise ValueError("a df is not positive: check the values table (df is the t-interval's degrees of freedom)")
    table = pd.concat([values[["contributor"]].astype(str), numbers], axis=1)
    _check_intervals(table, t_intervals="df" in values)
    return table


def _check_intervals(table: pd.DataFrame, *, t_intervals: bool) -> None:
    """Refuse intervals that the draws of rule 3 could not follow (`t_intervals`: the table carries ``df``)."""
    name = table["contributor"].to_numpy()
    value, stderr, low, high, df = (table[c].to_numpy(float) for c in ("value", "stderr", "ci_low", "ci_high", "df"))
    drawn = stderr > 0 if t_intervals else np.ones(len(table), dtype=bool)
    # An interval must be symmetric about its value, and an exact value's (stderr 0) must have no width.
    off = np.where(drawn, np.abs((value - low) - (high - value)), high - low) > 1e-6 * (np.abs(low) + np.abs(high))
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = 2 * stdtr(df, (high - low) / 2 / stderr) - 1  # each interval's level as a t-interval of stderr, df
    if off.any():
        i = int(np.argmax(off))
        interval = f"[{low[i]:.4g}, {high[i]:.4g}] around {value[i]:.4g}, stderr {stderr[i]:.4g}"
        problem = f"{name[i]!r} has the interval {interval}"
    elif t_intervals and drawn.any() and np.ptp(levels[drawn]) > 1e-3:
        i, j = np.argmin(np.where(drawn, levels, 2)), np.argmax(np.where(drawn, levels, -1))
        problem = f"the intervals have different levels ({name[i]!r}: {levels[i]:.3f}, {name[j]!r}: {levels[j]:.3f})"
    else:
        return
    raise ValueError(
        f"{problem}: share intervals draw each value by its interval, value ± t(df)·stderr with df (or, without df, "
        "a normal spanning it), which this table's are not; give the estimator's own table (values.csv)"
    )


def _student_t(rng: np.random.Generator, df: np.ndarray, draws: int) -> np.ndarray:
    """[draws, n] standard Student-t draws, column j with df[j] degrees of freedom (normal where df is infinite)."""
    noise = rng.standard_normal((draws, len(df)))
    finite = np.isfinite(df)
    if finite.any():
        noise[:, finite] = rng.standard_t(df[finite], size=(draws, int(finite.sum())))
    return noise


def _measured(coalitions: pd.DataFrame, utilities: pd.DataFrame) -> dict[str, tuple[tuple[str, ...], float, int]]:
    """coalition -> (members, mean utility over its measurements, number of measurements), measured ones only."""
    from diffcredit.coalitions import member_sets

    members = member_sets(coalitions)
    finite = utilities[np.isfinite(pd.to_numeric(utilities["utility"], errors="coerce"))]
    grouped = finite.groupby("coalition", sort=False)["utility"].agg(["mean", "size"])
    return {c: (members[c], float(mean), int(size)) for c, (mean, size) in grouped.iterrows() if c in members}


def _yardstick_statement(yardstick: dict | None) -> str:
    return NOT_STATED if yardstick is None else yardstick["statement"]


def _fmt(number: float | None) -> str:
    return "n/a" if number is None else f"{number:.4g}"
