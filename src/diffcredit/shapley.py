"""Shapley (and Banzhaf, leave-one-out) values with confidence intervals from coalition utilities.

A coalition may have several utility rows (training seeds). Point estimates use each coalition's mean utility ū_c;
the seed noise enters the interval through the pooled within-coalition variance σ² (pooled over every coalition
with two or more rows, assuming one noise level), so that Var(ū_c) = σ²/k_c for a coalition with k_c rows. Without
repeated rows the noise cannot be separated and only the sampling variance is reported.

All estimators but Banzhaf are a mean over m independent draws of a statistic linear in the utilities,
φ̂ = (1/m) Σ_k g_k with g_k = Σ_c G_kc ū_c:

- ``exact``: one draw over all 2^n coalitions with the Shapley weights; its stderr is the seed noise alone.
- ``loo``: one draw, v(N) − v(N∖{i}); its stderr is the seed noise alone.
- ``permutation``: g_k holds the marginal contributions along permutation k's chain ∅ ⊂ … ⊂ N.
- ``kernelshap``: constrained KernelSHAP (Covert & Lee 2021) with the exact A = E[zzᵀ] of the Shapley kernel and
  paired draws (S, N∖S). Then A = c·I + a·11ᵀ with a = E[s(s−1)]/(n(n−1)), c = 1/2 − a, and the closed form
  φ = A⁻¹(b − 1(1ᵀA⁻¹b − v(N) + v(∅))/1ᵀA⁻¹1) reduces per pair to
  g_k = (z_S − |S|/n)(v(S) − v(N∖S))/(2c) + (v(N) − v(∅))/n, which is unbiased, sums to v(N) − v(∅) exactly
  (efficiency) and makes the pairs independent, so the interval is a CLT over pairs (batch means with batches of
  one pair) rather than a bootstrap.

Their variance is estimated as Var(φ̂) = max(s² − T, 0)/m + Σ_c σ²/k_c·W_c², where s² is the variance of g_k over
draws, W = (1/m) Σ_k G_k the estimator's weight on each coalition, and T = Σ_c σ²/k_c·(Σ_k G_kc² − m W_c²)/(m−1)
the part of s² that is seed noise. This counts the noise of a coalition shared by many draws (∅ and N) once
instead of treating it as independent per draw. The interval is value ± t_{df}·stderr with df = m − 1 for
sampled draws and the pooled noise degrees of freedom for ``exact`` and ``loo``.

``banzhaf`` (maximum sample reuse, Wang & Jia): value_i = mean ū over planned coalitions with i − mean without i.
The planned coalitions are a uniform sample without replacement, so each mean's variance is
(s² − σ̄²)(1 − f)/k + σ̄²/k (finite-population correction f = k/2^(n−1), σ̄² the mean seed noise of the k means),
combined with Welch–Satterthwaite degrees of freedom. With every coalition planned it is the exact Banzhaf value.

The convergence table repeats the estimate on about 20 log-spaced prefixes of the plan (for the sampled estimators;
the draws complete within the first q rows), with σ² pooled over the whole plan at every point.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import comb, stdtrit

from diffcredit import coalitions as plans
from diffcredit.io import write_table

MISSING_POLICIES = ("error", "exclude")
TABLE_COLUMNS = ("contributor", "value", "stderr", "ci_low", "ci_high", "rank", "n_coalitions", "estimator")
_GRID_POINTS = 20
_LISTED = 10  # ids named in an error message before "and k more"


@dataclass(frozen=True)
class ShapleyResult:
    """Values with intervals (``table``), their course over the plan (``convergence``) and how they were made."""

    table: pd.DataFrame
    convergence: pd.DataFrame
    method: str
    excluded: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Measured:
    """Per-coalition mean utility (NaN where excluded), variance of that mean from seed noise, and noise df."""

    mean: np.ndarray
    noise: np.ndarray
    df: int


@dataclass(frozen=True)
class _Linear:
    """Draws of a linear estimator: coalition of each slot (m, k), weights (m, k, n), plan row completing each."""

    slots: np.ndarray
    weights: np.ndarray
    done: np.ndarray


@dataclass(frozen=True)
class _Estimate:
    value: np.ndarray
    stderr: np.ndarray
    df: np.ndarray
    used: int  # distinct coalitions entering the estimate


def read_utilities(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a utilities TSV (``coalition``, ``utility``, extra columns allowed); NaN marks a failed run."""
    try:
        table = pd.read_csv(path, sep="\t", dtype={"coalition": str})
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file; expected a header 'coalition<TAB>utility' and rows") from None
    return validate_utilities(table, source=str(path))


def validate_utilities(table: pd.DataFrame, source: str = "utilities") -> pd.DataFrame:
    """Check the columns and that every utility is a number or NaN; raise naming the row otherwise."""
    plans.require_columns(table, ("coalition", "utility"), source)
    if table.empty:
        raise ValueError(f"{source}: no utility rows")
    table = table.reset_index(drop=True)
    numbers = pd.to_numeric(table["utility"], errors="coerce")
    bad = numbers.isna() & ~table["utility"].isna()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{source} row {row + 1}: utility {table['utility'][row]!r} of coalition {table['coalition'][row]} "
            "is not a number (write NaN for a failed run)"
        )
    return table.assign(coalition=table["coalition"].astype(str), utility=numbers.astype(float))


def aggregate(
    coalitions: pd.DataFrame,
    utilities: pd.DataFrame,
    *,
    contributors: Sequence[str] | None = None,
    confidence: float = 0.95,
    missing: str = "error",
) -> ShapleyResult:
    """Estimate each contributor's value with the estimator recorded in the plan (see the module docstring).

    ``contributors`` fixes the output order (default: the plan's, see :func:`coalitions.parse_coalitions`).
    ``missing="error"`` refuses planned coalitions without a finite utility; ``"exclude"`` leaves them (and every
    draw using them) out and lists them in ``ShapleyResult.excluded``. Every interval is analytic (no resampling).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence!r}")
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    table, names, members = plans.parse_plan(coalitions, contributors)
    estimator = table["estimator"][0]
    measured, excluded = _measure(table["coalition"], validate_utilities(utilities), missing)
    if estimator == "banzhaf":
        path = _banzhaf_path(members, measured)
        method = f"Banzhaf by maximum sample reuse over {path[-1][1].used} coalitions; Welch t-interval"
    else:
        builders = {"exact": _exact, "loo": _loo, "permutation": _permutation, "kernelshap": _kernelshap}
        linear = builders[estimator](table, members, measured)
        grid = np.array([len(table)])
        if estimator in ("permutation", "kernelshap"):  # a draw with an excluded coalition is dropped whole
            linear = _select(linear, ~np.isnan(measured.mean[linear.slots]).any(axis=1))
            if len(linear.done) < 2:
                raise ValueError(
                    f"the {estimator} plan has {len(linear.done)} complete draw(s) with utilities; at least 2 "
                    "are needed for an interval: raise the budget"
                )
            grid = _grid(len(table))
        path = _linear_path(linear, measured, grid)
        method = _METHODS[estimator].format(draws=len(linear.done), rows=len(table))
    if measured.df:
        method += f"; seed noise from repeated utilities (pooled, df {measured.df}) included"
    else:
        method += "; no repeated utilities, so seed noise is not separated"
    if excluded:
        method += f"; {len(excluded)} coalition(s) without a finite utility excluded"
    return _result(table, names, path, confidence, method, excluded)


def _measure(planned: pd.Series, utilities: pd.DataFrame, missing: str) -> tuple[_Measured, tuple[str, ...]]:
    """Average the utility rows per planned coalition; find unplanned, failed and absent coalitions."""
    index = pd.Index(planned)
    position = index.get_indexer(utilities["coalition"])
    if (position < 0).any():
        unknown = pd.unique(utilities["coalition"][position < 0])
        row = int(np.flatnonzero(position < 0)[0])
        raise ValueError(
            f"utilities row {row + 1}: coalition {unknown[0]!r} was not planned ({len(unknown)} unplanned "
            f"coalition(s): {_listing(unknown)}); use the coalition table the utilities were computed for"
        )
    finite = np.isfinite(utilities["utility"].to_numpy())
    failed = pd.unique(utilities["coalition"][~finite])
    absent = index[np.bincount(position, minlength=len(index)) == 0]
    if len(failed) or len(absent):
        problems = [f"{c} (NaN)" for c in failed] + [f"{c} (no row)" for c in absent]
        if missing == "error":
            raise ValueError(
                f"{len(problems)} coalition(s) without a finite utility: {_listing(problems)}; rerun them or "
                "exclude them explicitly (missing='exclude', --missing exclude)"
            )
    bad = np.zeros(len(index), bool)
    bad[index.get_indexer(failed)] = True
    bad[index.get_indexer(absent)] = True
    keep = finite & ~bad[position]
    values, rows = utilities["utility"].to_numpy()[keep], position[keep]
    count = np.bincount(rows, minlength=len(index))
    mean = np.bincount(rows, weights=values, minlength=len(index)) / np.where(count > 0, count, 1)
    squares = float(((values - mean[rows]) ** 2).sum())
    df = int((count[count > 0] - 1).sum())
    noise = np.where(count > 0, (squares / df if df else 0.0) / np.maximum(count, 1), np.nan)
    mean[bad] = np.nan
    return _Measured(mean, noise, df), tuple(sorted(set(failed) | set(absent)))


def _listing(values: Sequence[str]) -> str:
    shown = ", ".join(map(str, values[:_LISTED]))
    return shown + (f" and {len(values) - _LISTED} more" if len(values) > _LISTED else "")


def _exact(table: pd.DataFrame, members: sparse.csr_array, measured: _Measured) -> _Linear:
    n = members.shape[1]
    if len(table) != 2**n:
        raise ValueError(f"an exact plan holds all 2^{n} = {2**n} coalitions, this one has {len(table)}")
    if np.isnan(measured.mean).any():
        raise ValueError("exact Shapley needs the utility of every coalition; none can be excluded")
    z = members.toarray()
    size = z.sum(axis=1, keepdims=True)
    weight = 1.0 / (n * comb(n - 1, np.arange(n)))  # weight of a marginal contribution to a set of size s
    weights = np.where(z, weight[np.clip(size - 1, 0, n - 1)], -weight[np.clip(size, 0, n - 1)])
    return _Linear(np.arange(len(table))[None, :], weights[None], np.array([len(table) - 1]))


def _loo(table: pd.DataFrame, members: sparse.csr_array, measured: _Measured) -> _Linear:
    n = members.shape[1]
    size = members.sum(axis=1)
    grand = np.flatnonzero(size == n)
    if len(grand) != 1 or np.isnan(measured.mean[grand[0]]):
        raise ValueError("leave-one-out needs the grand coalition and its utility")
    left_out = np.full(n, -1)
    rows = np.flatnonzero(size == n - 1)
    left_out[np.argmin(members[rows].toarray(), axis=1)] = rows
    if (left_out < 0).any():
        raise ValueError(f"the leave-one-out plan lacks N without {np.flatnonzero(left_out < 0).tolist()}")
    weights = np.vstack([np.ones(n), -np.eye(n)])
    return _Linear(np.concatenate([grand, left_out])[None, :], weights[None], np.array([len(table) - 1]))


def _samples(table: pd.DataFrame, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse the ``samples`` column into (draws × width coalition rows, plan row completing each draw)."""
    row_of = {c: r for r, c in enumerate(table["coalition"])}
    draws, done = [], []
    for row, cell in enumerate(table["samples"].fillna("").astype(str)):
        for sample in filter(None, cell.split(";")):
            ids = sample.split(",")
            if len(ids) != width or any(row_of.get(c, row + 1) > row for c in ids):
                raise ValueError(
                    f"row {row + 1} ({table['coalition'][row]}): sample {sample[:60]!r} must name {width} "
                    "coalitions planned at or before this row; re-run diffcredit plan"
                )
            draws.append([row_of[c] for c in ids])
            done.append(row)
    return np.array(draws, dtype=np.int64).reshape(-1, width), np.array(done, dtype=np.int64)


def _permutation(table: pd.DataFrame, members: sparse.csr_array, measured: _Measured) -> _Linear:
    n = members.shape[1]
    chains, done = _samples(table, n + 1)
    steps = members[chains[:, 1:].ravel()].astype(np.int8) - members[chains[:, :-1].ravel()].astype(np.int8)
    steps = sparse.csr_array(steps)
    steps.eliminate_zeros()
    if (np.diff(steps.indptr) != 1).any() or (steps.data != 1).any() or (members[chains[:, 0]].sum() != 0):
        raise ValueError("a permutation sample is not a chain ∅ ⊂ … ⊂ N adding one contributor per step")
    added = steps.indices.reshape(len(chains), n)  # contributor added at each step of each chain
    weights = np.zeros((len(chains), n + 1, n))
    draw = np.arange(len(chains))[:, None]
    weights[draw, np.arange(1, n + 1), added] += 1.0
    weights[draw, np.arange(n), added] -= 1.0
    return _Linear(chains, weights, done)


def _kernelshap(table: pd.DataFrame, members: sparse.csr_array, measured: _Measured) -> _Linear:
    n = members.shape[1]
    if n < 2:
        raise ValueError("kernelshap needs at least 2 contributors; use the exact estimator")
    pairs, done = _samples(table, 2)
    size = members.sum(axis=1)
    empty, grand = np.flatnonzero(size == 0), np.flatnonzero(size == n)
    if len(empty) != 1 or len(grand) != 1:
        raise ValueError("a kernelshap plan needs the empty and the grand coalition")
    z = members[pairs[:, 0]].toarray()
    if (z + members[pairs[:, 1]].toarray() != 1).any():
        raise ValueError("a kernelshap sample pairs a coalition with something other than its complement")
    s = np.arange(1, n)
    p = 1.0 / (s * (n - s))
    c = 0.5 - (p * s * (s - 1)).sum() / (p.sum() * n * (n - 1))
    alpha = (z - z.sum(axis=1, keepdims=True) / n) / (2 * c)
    m = len(pairs)
    weights = np.stack([alpha, -alpha, np.full((m, n), 1.0 / n), np.full((m, n), -1.0 / n)], axis=1)
    slots = np.column_stack([pairs, np.full(m, grand[0]), np.full(m, empty[0])])
    return _Linear(slots, weights, done)


def _select(linear: _Linear, keep: np.ndarray) -> _Linear:
    return _Linear(linear.slots[keep], linear.weights[keep], linear.done[keep])


def _linear_path(linear: _Linear, measured: _Measured, grid: np.ndarray) -> list[tuple[int, _Estimate]]:
    """Estimates from the draws complete within the first q plan rows, for each q of ``grid``.

    The draws are taken in chunks between grid points, and every statistic is updated by chunk: the mean and sum
    of squares of g (Chan et al.'s pairwise update), the seed noise of the draws, and Σ_c σ_c² (Σ_k G_kc)² over the
    coalitions the chunk touches, so the whole path costs about one pass over the draws.
    """
    m, n = linear.weights.shape[0], linear.weights.shape[2]
    utility = measured.mean[linear.slots]
    g = np.einsum("mkn,mk->mn", linear.weights, np.nan_to_num(utility))
    g[np.einsum("mkn,mk->mn", linear.weights != 0, np.isnan(utility)) > 0] = np.nan  # loo without N∖{i}
    noise = np.nan_to_num(measured.noise)
    weight_sum = np.zeros((len(noise), n))  # Σ_k G_kc over the draws so far, per coalition c
    seen = np.zeros(len(noise), bool)
    mean, squares, noise_of_draws, shared = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    path, start = [], 0
    for q in grid:
        stop = int(np.searchsorted(linear.done, q))  # ``done`` is sorted: the draws complete before row q
        if stop < min(2, m):
            continue
        if stop > start:
            chunk = g[start:stop]
            chunk_mean = chunk.mean(axis=0)
            delta = chunk_mean - mean
            squares += ((chunk - chunk_mean) ** 2).sum(axis=0) + delta**2 * start * (stop - start) / stop
            mean += delta * (stop - start) / stop
            slots = linear.slots[start:stop]
            noise_of_draws += np.einsum("mkn,mk->n", linear.weights[start:stop] ** 2, noise[slots])
            touched, slot = np.unique(slots, return_inverse=True)
            spread = sparse.csr_array((np.ones(slots.size), (slot.ravel(), np.arange(slots.size))))
            before = weight_sum[touched]
            weight_sum[touched] += spread @ linear.weights[start:stop].reshape(-1, n)
            shared += noise[touched] @ (weight_sum[touched] ** 2 - before**2)
            seen[slots[~np.isnan(utility[start:stop])]] = True
            start = stop
        noise_of_mean = shared / stop**2
        if stop == 1:
            stderr = np.where(np.isnan(mean), np.nan, np.sqrt(noise_of_mean))
            estimate = _Estimate(mean.copy(), stderr, np.full(n, float(measured.df)), int(seen.sum()))
        else:
            sampling = np.maximum(squares - (noise_of_draws - stop * noise_of_mean), 0.0) / ((stop - 1) * stop)
            estimate = _Estimate(mean.copy(), np.sqrt(sampling + noise_of_mean), np.full(n, stop - 1.0),
                                 int(seen.sum()))
        path.append((int(q), estimate))
    return path


def _banzhaf_path(members: sparse.csr_array, measured: _Measured) -> list[tuple[int, _Estimate]]:
    """Banzhaf estimates on plan prefixes, from per-contributor sums that grow by chunk between grid points."""
    rows, n = members.shape
    keep = np.isfinite(measured.mean)
    u = np.where(keep, measured.mean - np.nanmean(measured.mean), 0.0)  # centred: sums of squares stay accurate
    per_row = np.column_stack([keep, u, u**2, np.where(keep, measured.noise, 0.0)])  # count, Σu, Σu², Σ noise
    z = members.astype(float)
    inside, total = np.zeros((4, n)), np.zeros((4, 1))
    path, start = [], 0
    for q in _grid(rows):
        inside += (z[start:q].T @ per_row[start:q]).T
        total += per_row[start:q].sum(axis=0)[:, None]
        start = q
        estimate = _banzhaf(inside, total - inside, n)
        if np.isfinite(estimate.stderr).all():
            path.append((int(q), estimate))
    if not path or path[-1][0] != rows:
        raise ValueError(
            "banzhaf needs at least 2 planned coalitions with and 2 without every contributor: raise the budget"
        )
    return path


def _banzhaf(inside: np.ndarray, outside: np.ndarray, n: int) -> _Estimate:
    """Difference of the mean utilities with and without each contributor, from the sums (count, Σu, Σu², Σσ²)."""
    population = 2.0 ** (n - 1)
    sides = []
    for k, total, squares, noise in (inside, outside):
        with np.errstate(invalid="ignore", divide="ignore"):
            average = total / k
            spread = (squares - k * average**2) / (k - 1)
            seed = noise / k
            variance = (np.maximum(spread - seed, 0) * (1 - k / population) + seed) / k
        sides.append((average, variance, k))
    (with_i, v_in, k_in), (without_i, v_out, k_out) = sides
    variance = v_in + v_out
    with np.errstate(invalid="ignore", divide="ignore"):
        df = variance**2 / (v_in**2 / (k_in - 1) + v_out**2 / (k_out - 1))
    df = np.where(variance > 0, df, np.inf)
    return _Estimate(with_i - without_i, np.sqrt(variance), df, int(inside[0, 0] + outside[0, 0]))


def _grid(rows: int) -> np.ndarray:
    """About 20 log-spaced plan prefixes ending at the whole plan."""
    return np.unique(np.geomspace(min(4, rows), rows, _GRID_POINTS).round().astype(int))


_METHODS = {
    "exact": "exact Shapley over all {rows} coalitions; t-interval from seed noise only",
    "loo": "leave-one-out v(N) - v(N without i); t-interval from seed noise only",
    "permutation": "mean marginal contribution over {draws} permutations; CLT t-interval over permutations",
    "kernelshap": "constrained KernelSHAP (exact A) over {draws} paired draws; CLT t-interval over pairs",
}


def _result(
    table: pd.DataFrame,
    names: list[str],
    path: list[tuple[int, _Estimate]],
    confidence: float,
    method: str,
    excluded: tuple[str, ...],
) -> ShapleyResult:
    estimate = path[-1][1]
    with np.errstate(invalid="ignore"):
        half = np.where(estimate.stderr > 0, stdtrit(estimate.df, 0.5 + confidence / 2), 0.0) * estimate.stderr
    values = pd.DataFrame(
        {
            "contributor": names,
            "value": estimate.value,
            "stderr": estimate.stderr,
            "ci_low": estimate.value - half,
            "ci_high": estimate.value + half,
        }
    )
    values["rank"] = values["value"].rank(ascending=False, method="min").astype("Int64")
    values["n_coalitions"] = estimate.used
    values["estimator"] = table["estimator"][0]
    convergence = pd.concat(
        [
            pd.DataFrame({"n_coalitions": rows, "contributor": names, "value": e.value, "stderr": e.stderr})
            for rows, e in path
        ],
        ignore_index=True,
    )
    return ShapleyResult(values, convergence, f"{method}; {confidence:.0%} level", excluded)


def write_result(
    result: ShapleyResult, path: str | os.PathLike[str], convergence: str | os.PathLike[str] | None = None
) -> None:
    """Write the values table as CSV (and optionally the convergence table, TSV if named .tsv), atomically."""
    write_table(result.table, path, sep=",")
    if convergence is not None:
        write_table(result.convergence, convergence, sep="\t" if str(convergence).endswith(".tsv") else ",")
