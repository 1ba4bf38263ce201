"""Evaluation: how close credited values come to what retraining from scratch would give.

Four checks (REFERENCES.md sections 1 and 5), all on utilities oriented so that higher is better:

- the linear datamodeling score (LDS) as the paper defines it: retrain on held-out subsets keeping int(α·n) of the
  contributors, with several training seeds; per seed, correlate (Spearman) the summed scores of each subset's
  members with the property measured after retraining; average over the seeds (one LDS per α);
- the budget-matched comparison: the LDS of values from growing prefixes of a plan against the compute they cost;
- the counterfactual: retrain without the top contributors of each ranking and compare the property's change;
- utility agreement: correlate the approximate (fine-tuned) utilities of coalitions with retrained ones, also with
  coalition size taken out, since both grow with size and size alone would make any method look good.

The workflow does the retraining; this module only draws the subsets and computes the statistics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from diffcredit.contributors import validate_contributor_id
from diffcredit.seeds import derive_seed

__all__ = [
    "LDSResult",
    "alphas",
    "budget_curve",
    "counterfactual_removals",
    "counterfactual_table",
    "heldout_subsets",
    "lds",
    "random_ranking",
    "subset_size",
    "utility_agreement",
]


@dataclass(frozen=True)
class LDSResult:
    """Linear datamodeling score of one ranking, as a correlation in [-1, 1] (the papers print it ×100).

    ``value`` is the paper's LDS (Lu et al. 2025, ``lds.py::evaluate_lds``): the Spearman correlation of the summed
    scores with the property of each training seed alone (``per_seed``), averaged over the seeds. Two intervals
    belong to it: ``ci_low``/``ci_high``, the paper's ``value ± z·sd/√seeds`` over the per-seed correlations (sd with
    ddof 0, as ``np.std`` in the authors' code; NaN with fewer than two seeds), and ``bootstrap_low``/
    ``bootstrap_high``, a percentile bootstrap over subsets (each resampled with all its seeds), which also covers
    which subsets were drawn. ``seed_averaged`` is a different, higher number -- the Spearman against the seed-mean
    property (the datamodels/dattri convention) -- with its own bootstrap interval.
    """

    value: float
    ci_low: float
    ci_high: float
    bootstrap_low: float
    bootstrap_high: float
    per_seed: tuple[float, ...]
    seed_averaged: float
    seed_averaged_low: float
    seed_averaged_high: float
    confidence: float
    n_subsets: int  # subsets with at least one measurement
    n_seeds: int
    n_missing: int  # NaN (missing) measurements, subset x seed

    def to_dict(self) -> dict[str, object]:
        """Plain types for JSON; undefined correlations (NaN) become None."""
        return {key: _json_safe(item) for key, item in asdict(self).items()}


def alphas(alpha: float | Sequence[float]) -> tuple[float, ...]:
    """The shares of contributors kept, as a tuple: ``evaluation.alpha`` may be one number or a list."""
    values = (alpha,) if isinstance(alpha, (int, float)) else tuple(alpha)
    if not values:
        raise ValueError("alpha=[]: give at least one share of contributors to keep, e.g. 0.5")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"alpha={value!r}: the share of contributors kept must lie strictly between 0 and 1")
    return tuple(float(value) for value in values)


def subset_size(alpha: float, n: int) -> int:
    """Contributors kept in a held-out subset: int(α·n) as in the paper, at least one kept and one left out.

    The product is rounded to 9 decimals first so that, e.g., 0.29 · 100 keeps 29 rather than 28.
    """
    size = int(round(alpha * n, 9))
    if not 0 < size < n:
        raise ValueError(
            f"alpha={alpha} keeps {size} of {n} contributors; a held-out subset must keep at least one and "
            "leave out at least one: choose alpha so that 1 <= int(alpha * n) <= n - 1"
        )
    return size


def heldout_subsets(
    contributors: Sequence[str], n_subsets: int, alpha: float | Sequence[float] = 0.5, *, seed: int
) -> list[tuple[str, ...]]:
    """Draw ``n_subsets`` subsets of ``int(alpha * n)`` contributors for each alpha, for retraining in the LDS.

    With a list of alphas the subsets of each come one block after the other, in the order given; each alpha has
    its own random stream (labelled by its subset size), so adding an alpha or raising ``n_subsets`` leaves the
    subsets already drawn unchanged (prefix-stable per alpha), and a subset's alpha is known from its size.
    Within an alpha, subsets are distinct until all ``C(n, k)`` are used and members are sorted; the result depends
    only on the set of contributors and ``seed``.
    """
    ids = sorted(_checked_ids(contributors))
    if n_subsets < 1:
        raise ValueError(f"n_subsets={n_subsets}: draw at least one subset")
    shares = alphas(alpha)
    sizes = [subset_size(share, len(ids)) for share in shares]
    for position, size in enumerate(sizes):
        if size in sizes[:position]:
            raise ValueError(
                f"alpha={shares[position]} and alpha={shares[sizes.index(size)]} both keep {size} of {len(ids)} "
                "contributors; list each subset size once"
            )
    drawn: list[tuple[str, ...]] = []
    for size in sizes:
        n_distinct = math.comb(len(ids), size)
        rng = np.random.default_rng(derive_seed(seed, "lds-subsets", size))
        block: list[tuple[str, ...]] = []
        seen: set[tuple[str, ...]] = set()
        while len(block) < n_subsets:
            subset = tuple(ids[i] for i in np.sort(rng.choice(len(ids), size=size, replace=False)))
            # A redraw depends only on the subsets before it, which keeps the sequence prefix-stable.
            if subset in seen and len(seen) < n_distinct:
                continue
            seen.add(subset)
            block.append(subset)
        drawn.extend(block)
    return drawn


def lds(
    scores: pd.Series,
    subsets: Sequence[Sequence[str]],
    measured: np.ndarray,
    confidence: float = 0.95,
    *,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> LDSResult:
    """Linear datamodeling score of ``scores`` (contributor -> score) against retraining on ``subsets``.

    ``measured[s, j]`` is the property of the model retrained on ``subsets[s]`` with training seed ``j`` (a 1-D array
    is one seed); NaN marks a missing run, which is left out and counted in ``n_missing``. A seed measured on fewer
    than 3 subsets has no correlation of its own (NaN in ``per_seed``) and is left out of the mean.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must lie strictly between 0 and 1, e.g. 0.95")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap={n_bootstrap}: use at least one bootstrap resample, e.g. 2000")
    predicted = _summed_scores(scores, subsets)
    runs = np.asarray(measured, dtype=float)
    runs = runs[:, None] if runs.ndim == 1 else runs
    if runs.ndim != 2 or runs.shape[0] != len(subsets):
        raise ValueError(
            f"measured has shape {np.shape(measured)} but there are {len(subsets)} subsets: "
            "pass an array [n_subsets, n_seeds] whose row s belongs to subsets[s]"
        )
    present, kept, mean = _seed_means(runs)
    n_kept = int(kept.sum())
    if n_kept < 3:
        raise ValueError(
            f"only {n_kept} of {len(subsets)} subsets have a finite measurement; a rank correlation needs at least 3"
        )
    x, runs = predicted[kept], runs[kept]
    per_seed = _per_seed_spearman(x, runs)
    defined = per_seed[np.isfinite(per_seed)]
    value = float(defined.mean()) if defined.size else math.nan
    z = stats.norm.ppf((1 + confidence) / 2)
    half = z * defined.std() / math.sqrt(defined.size) if defined.size >= 2 else math.nan
    rng = np.random.default_rng(derive_seed(seed, "lds-bootstrap"))
    resample = rng.integers(0, n_kept, size=(n_bootstrap, n_kept))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no defined seed: NaN, left out
        boot = np.nanmean(_per_seed_spearman(x[resample], runs[resample]), axis=-1)
    boot_low, boot_high = _percentiles(boot, confidence)
    mean_low, mean_high = _percentiles(_spearman(x[resample], mean[resample]), confidence)
    return LDSResult(
        value=value,
        ci_low=float(value - half),
        ci_high=float(value + half),
        bootstrap_low=boot_low,
        bootstrap_high=boot_high,
        per_seed=tuple(float(rho) for rho in per_seed),
        seed_averaged=float(_spearman(x, mean)),
        seed_averaged_low=mean_low,
        seed_averaged_high=mean_high,
        confidence=confidence,
        n_subsets=n_kept,
        n_seeds=runs.shape[1],
        n_missing=int((~present).sum()),
    )


def budget_curve(
    coalitions: pd.DataFrame,
    utilities: pd.DataFrame,
    *,
    subsets: Sequence[Sequence[str]],
    measured: np.ndarray,
    contributors: Sequence[str] | None = None,
    setup_seconds: float = 0.0,
    points: int = 8,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """The LDS of values estimated from growing prefixes of ``coalitions`` against the compute they cost.

    ``utilities`` (``coalition``, ``utility``, ``seconds``; a row per measurement) cover the plan; about ``points``
    log-spaced prefixes end at the whole plan, and a prefix too short for values of its own (too few complete
    draws) is left out. Compute is ``setup_seconds`` (what every coalition needs first: training, pruning,
    recovery) plus the seconds of every measurement in the prefix. One row per prefix: ``budget`` (coalitions),
    ``seconds``, ``lds`` with the paper's ``ci_low``/``ci_high`` over seeds, and ``seed_averaged``.
    """
    from diffcredit.coalitions import require_columns
    from diffcredit.shapley import aggregate

    require_columns(utilities, ("coalition", "utility", "seconds"), "utilities")
    if points < 1:
        raise ValueError(f"points={points}: use at least one prefix")
    total = len(coalitions)
    budgets = np.unique(np.geomspace(min(4, total), total, points).round().astype(int))
    rows = []
    for budget in budgets:
        prefix = coalitions.head(budget)
        used = utilities[utilities["coalition"].isin(prefix["coalition"])]
        try:
            values = aggregate(prefix, used, contributors=contributors, confidence=confidence).table
        except ValueError:
            if budget < total:  # too few complete draws in a short prefix; the whole plan must give values
                continue
            raise
        result = lds(values.set_index("contributor")["value"], subsets, measured, confidence, n_bootstrap=1)
        rows.append(
            {
                "budget": int(budget),
                "seconds": setup_seconds + float(used["seconds"].sum()),
                "lds": result.value,
                "ci_low": result.ci_low,
                "ci_high": result.ci_high,
                "seed_averaged": result.seed_averaged,
            }
        )
    return pd.DataFrame(rows)


def counterfactual_removals(scores: pd.Series, fraction: float = 0.4) -> tuple[str, ...]:
    """The top ``round(fraction * n)`` (at least one) contributors by score, best first; ties go to the smaller id."""
    values = _checked_scores(scores)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction}: the share of contributors removed must lie strictly between 0 and 1")
    count = max(1, _round_half_up(fraction * len(values)))
    if count >= len(values):
        raise ValueError(
            f"fraction={fraction} removes {count} of {len(values)} contributors and leaves none to retrain on; "
            "lower the fraction"
        )
    order = sorted(values.index, key=lambda name: (-values[name], name))
    return tuple(order[:count])


def random_ranking(contributors: Sequence[str], seed: int) -> pd.Series:
    """A seeded random ranking (scores n..1 in random order), the control for ``counterfactual_removals``."""
    ids = sorted(_checked_ids(contributors))
    rng = np.random.default_rng(derive_seed(seed, "random-ranking"))
    return pd.Series(rng.permutation(len(ids)) + 1.0, index=pd.Index(ids, name="contributor"), name="random")


def counterfactual_table(
    baseline: np.ndarray, removed: Mapping[str, np.ndarray], confidence: float = 0.95
) -> pd.DataFrame:
    """Property after retraining without each ranking's top contributors, against the full-data ``baseline``.

    Arrays hold one value per training seed (NaN = missing run, left out). One row per ranking, after a first row
    ``full`` for the baseline itself: ``n_seeds``, ``mean``, ``std``, a Student-t ``ci_low``/``ci_high`` of the mean
    over seeds, ``change`` (mean minus the baseline mean; negative = the removal hurt), ``change_low``/``change_high``
    (a Student-t interval of the change from the per-seed differences: seed ``s`` of a ranking and of the baseline
    are trained with the same seed, so the pairs share their training noise; NaN with fewer than two pairs) and
    ``change_pct`` (``change`` in percent of the baseline mean's magnitude; NaN if that mean is 0).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must lie strictly between 0 and 1, e.g. 0.95")
    if "full" in removed:
        raise ValueError("'full' names the baseline row; rename the ranking called 'full'")

    def interval(values: np.ndarray) -> tuple[float, float, float, float]:
        """Mean, sd and the t-interval of the mean of the finite ``values`` (NaN sd and interval for one)."""
        values = values[np.isfinite(values)]
        mean = values.mean() if values.size else np.nan
        std = values.std(ddof=1) if values.size > 1 else np.nan
        half = (
            stats.t.ppf((1 + confidence) / 2, values.size - 1) * std / np.sqrt(values.size) if values.size else np.nan
        )
        return mean, std, mean - half, mean + half

    full_runs = np.asarray(baseline, dtype=float)
    rows = {}
    for name, runs in {"full": full_runs, **removed}.items():
        values = np.asarray(runs, dtype=float)
        if values.ndim != 1:
            raise ValueError(f"{name!r}: expected one value per training seed (1-D), got shape {values.shape}")
        if not np.isfinite(values).any():
            raise ValueError(f"{name!r}: no finite measurement; retrain at least one seed or drop the ranking")
        mean, std, low, high = interval(values)
        paired = min(len(values), len(full_runs))
        _, _, change_low, change_high = interval(values[:paired] - full_runs[:paired])
        rows[name] = {
            "n_seeds": int(np.isfinite(values).sum()),
            "mean": mean,
            "std": std,
            "ci_low": low,
            "ci_high": high,
            "change_low": change_low,
            "change_high": change_high,
        }
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("ranking")
    full = table.at["full", "mean"]
    table["change"] = table["mean"] - full
    table["change_pct"] = 100 * table["change"] / abs(full) if full != 0 else np.nan
    return table[list(COUNTERFACTUAL_COLUMNS)]


# counterfactual_table's columns, in reading order
COUNTERFACTUAL_COLUMNS = (
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "change",
    "change_low",
    "change_high",
    "change_pct",
    "n_seeds",
)


def utility_agreement(approx: pd.Series, retrain: pd.DataFrame, sizes: pd.Series) -> dict[str, float | int]:
    """Agreement of approximate utilities with the seed-mean of retrained ones, over the coalitions of ``retrain``.

    ``approx`` and ``sizes`` are indexed by coalition and may hold more coalitions than ``retrain`` (coalition x
    seed; NaN = missing run). Keys: ``pearson``, ``spearman``; ``spearman_size_removed``, the mean of the Spearman
    correlations within groups of equal coalition size (groups of at least 3 with a defined correlation, weighted by
    group size; NaN if there are none) -- exact conditioning on size, chosen over ``spearman_partial_size`` (partial
    Spearman given size, which uses every coalition but removes only a rank-linear size trend, so a nonlinear one
    leaks into it); ``n_size_removed`` (coalitions behind it); ``retrain_seed_cv`` (mean over coalitions of the
    seed-to-seed std / |mean|); ``n_coalitions``, ``n_seeds``, ``n_missing``.
    """
    runs = retrain.to_numpy(dtype=float)
    present, kept, mean = _seed_means(runs)
    coalitions = retrain.index[kept]
    for name, series in (("retrain", retrain), ("approx", approx), ("sizes", sizes)):
        repeated = series.index[series.index.duplicated()]
        if len(repeated):
            raise ValueError(f"coalition {repeated[0]!r} appears more than once in {name}; give each coalition one row")
    for name, series in (("approx", approx), ("sizes", sizes)):
        absent = coalitions.difference(series.dropna().index)
        if len(absent):
            raise ValueError(f"coalition {absent[0]!r} has retrain utilities but no finite value in {name}")
    if len(coalitions) < 3:
        raise ValueError(f"only {len(coalitions)} coalitions have a retrain utility; correlations need at least 3")
    frame = pd.DataFrame(
        {
            "approx": approx.loc[coalitions].to_numpy(dtype=float),
            "retrain": mean,
            "size": sizes.loc[coalitions].to_numpy(dtype=float),
        }
    )
    groups = [g for _, g in frame.groupby("size") if len(g) >= 3]
    within = pd.DataFrame(
        [(_spearman(g["approx"].to_numpy(), g["retrain"].to_numpy()), len(g)) for g in groups], columns=["rho", "n"]
    ).dropna()
    rho = {
        (a, b): _spearman(frame[a].to_numpy(), frame[b].to_numpy())
        for a, b in (("approx", "retrain"), ("approx", "size"), ("retrain", "size"))
    }
    with np.errstate(divide="ignore", invalid="ignore"):  # size fully determines a side: undefined, NaN
        partial = (rho["approx", "retrain"] - rho["approx", "size"] * rho["retrain", "size"]) / np.sqrt(
            (1 - rho["approx", "size"] ** 2) * (1 - rho["retrain", "size"] ** 2)
        )
    spread = present[kept].sum(axis=1) >= 2
    cv = np.nanstd(runs[kept][spread], axis=1, ddof=1) / np.abs(mean[spread]) if spread.any() else np.array([np.nan])
    return {
        "pearson": float(_pearson(frame["approx"].to_numpy(), frame["retrain"].to_numpy())),
        "spearman": float(rho["approx", "retrain"]),
        "spearman_size_removed": float(np.average(within["rho"], weights=within["n"])) if len(within) else np.nan,
        "n_size_removed": int(within["n"].sum()),
        "spearman_partial_size": float(partial),
        "retrain_seed_cv": float(np.mean(cv)),
        "n_coalitions": len(coalitions),
        "n_seeds": runs.shape[1],
        "n_missing": int((~present).sum()),
    }


def _seed_means(runs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Finite-entry mask, rows with at least one finite entry, and those rows' means over their finite entries."""
    present = np.isfinite(runs)
    kept = present.any(axis=1)
    return present, kept, np.where(present, runs, 0.0)[kept].sum(axis=1) / present[kept].sum(axis=1)


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; NaN where either side is constant (undefined, not an error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return stats.pearsonr(x, y, axis=-1).statistic


def _spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation along the last axis (Pearson of average ranks), vectorised for the bootstrap."""
    return _pearson(stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1))


def _per_seed_spearman(x: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """Spearman of ``x`` (..., subsets) with each seed's column of ``runs`` (..., subsets, seeds) over the subsets
    that seed measured; NaN for a seed with fewer than 3 of them or a constant side. Shape (..., seeds)."""
    y = np.moveaxis(runs, -1, -2)
    ok = np.isfinite(y)
    ranks = [stats.rankdata(np.where(ok, side, np.nan), axis=-1, nan_policy="omit") for side in (x[..., None, :], y)]
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rx, ry = (r - np.nanmean(r, axis=-1, keepdims=True) for r in ranks)
        rho = np.nansum(rx * ry, axis=-1) / np.sqrt(np.nansum(rx**2, axis=-1) * np.nansum(ry**2, axis=-1))
    return np.where(ok.sum(axis=-1) >= 3, rho, np.nan)


def _percentiles(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of the finite bootstrap replicates (NaN, NaN if none is finite)."""
    tail = (1 - confidence) / 2
    finite = boot[np.isfinite(boot)]
    if not finite.size:
        return math.nan, math.nan
    low, high = np.quantile(finite, [tail, 1 - tail])
    return float(low), float(high)


def _summed_scores(scores: pd.Series, subsets: Sequence[Sequence[str]]) -> np.ndarray:
    """Σ_{i∈S} score_i per subset, refusing members that have no score."""
    values = _checked_scores(scores)
    strings = [row for row, subset in enumerate(subsets) if isinstance(subset, str)]
    if strings:
        raise ValueError(f"subset {strings[0]} is the string {subsets[strings[0]]!r}; pass a list of contributor ids")
    membership = pd.DataFrame(
        [(row, name) for row, subset in enumerate(subsets) for name in subset], columns=["row", "contributor"]
    )
    repeated = membership[membership.duplicated()]
    if len(repeated):
        row, name = repeated.iloc[0]
        raise ValueError(f"subset {row} lists contributor {name!r} twice")
    position = values.index.get_indexer(membership["contributor"])
    if (position < 0).any():
        row, name = membership.iloc[int(np.argmax(position < 0))]
        raise ValueError(
            f"subset {row} contains contributor {name!r}, which has no score; "
            "scores must cover every contributor that appears in a subset"
        )
    return np.bincount(membership["row"], weights=values.to_numpy()[position], minlength=len(subsets))


def _checked_scores(scores: pd.Series) -> pd.Series:
    """``scores`` as float with finite values, indexed by unique valid contributor ids as strings.

    Ids are strings by contract; a CSV reader may have turned an id such as ``7`` into an integer, so it is keyed as
    ``"7"`` here to match the subsets' members.
    """
    values = pd.Series(scores.to_numpy(dtype=float), index=pd.Index(_checked_ids(scores.index), name="contributor"))
    bad = values.index[~np.isfinite(values.to_numpy())]
    if len(bad):
        raise ValueError(f"contributor {bad[0]!r} has score {values[bad[0]]}; every score must be a finite number")
    return values


def _checked_ids(contributors: Sequence[str] | pd.Index) -> list[str]:
    """Valid, unique contributor ids, or a ValueError naming the first offender."""
    ids = [validate_contributor_id(name, "evaluation") for name in contributors]
    repeated = pd.Index(ids)[pd.Index(ids).duplicated()]
    if len(repeated):
        raise ValueError(f"contributor {repeated[0]!r} appears more than once; each contributor must be listed once")
    if len(ids) < 2:
        raise ValueError(f"{len(ids)} contributor(s) given; evaluation needs at least two")
    return ids


def _round_half_up(x: float) -> int:
    """Round halves up (Python's round() goes to even, which would make alpha=0.5 of 5 keep 2, not 3)."""
    return math.floor(x + 0.5)


def _json_safe(item: object) -> object:
    """Tuples as lists and non-finite floats as None, so ``json.dumps(..., allow_nan=False)`` accepts the result."""
    if isinstance(item, tuple):
        return [_json_safe(part) for part in item]
    if isinstance(item, float) and not math.isfinite(item):
        return None
    return item
