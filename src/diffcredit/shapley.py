"""Values with confidence intervals from coalition utilities: Shapley, Banzhaf and leave-one-out estimators.

The estimators themselves are listed in :mod:`diffcredit.estimators`; :func:`aggregate` runs the one a plan records
and returns a :class:`ValuationResult`.

A coalition may have several utility rows (training seeds; plans ask for ``repeats`` of the empty and the grand
coalition). Point estimates use each coalition's mean utility ū_c; the seed noise enters the interval through the
pooled within-coalition variance σ² (pooled over every coalition with two or more rows, assuming one noise level),
so that Var(ū_c) = σ²/k_c for a coalition with k_c rows; a coalition whose rows agree to the bit while another's
differ does not depend on the seed (v(∅) of a LoRA: the base itself), so it is left out of the pool with noise 0.
Every estimator is linear in the utilities given its plan, φ̂ = W ū, so the seed noise adds Σ_c W_ic² σ²/k_c to the
variance of contributor i: this counts the noise of coalitions every draw shares (∅, N, enumerated strata) once,
where resampling would miss it. Without any repeated row the noise cannot be separated: the output then says that
the interval is conditional on single measurements.

``kernelshap`` (and ``kernelshap_leverage``): stratified paired plans (see :mod:`diffcredit.coalitions`). Stratum k
holds the pairs (S, N∖S) with min(|S|, n−|S|) = k and has kernel mass Q_k; its m_k planned pairs estimate its part
of A = E[zzᵀ] and b = E[z(v(z) − v(∅))] by their mean of (zzᵀ + z̄z̄ᵀ)/2 and (z(v(S) − v(∅)) + z̄(v(N∖S) − v(∅)))/2,
so Â = Σ_k Q_k Â_k and b̂ = Σ_k Q_k b̂_k. The values are the constrained closed form with the sampled matrix
(Covert & Lee 2021, eq. 7; the paper's ``data_shapley``): φ = Â⁺(b̂ − 1(1ᵀÂ⁺b̂ − v(N) + v(∅))/(1ᵀÂ⁺1)). Efficiency
holds exactly; with every stratum complete Â = A, b̂ = b and φ is exact. Strata without a planned pair are left out.
Its interval linearises φ in (Â, b̂): with P = Â⁺ − Â⁺11ᵀÂ⁺/(1ᵀÂ⁺1), pair j's influence is
ψ_j = P(b_j − A_jφ) = ((e_j − ē_j)/2)·P z_j (e, ē the residuals of S and N∖S; divided by √(1 − h_j), h_j =
Q_k/m_k·z_jᵀPz_j the pair's leverage, as in HC2, since with m pairs near n the fit absorbs much of each residual),
and Var(φ̂) = Σ_k Q_k²(1 − m_k/N_k) s_k²/m_k over strata (s_k² the within-stratum variance of ψ less its seed noise;
complete strata add nothing; strata with one pair are collapsed into one group) plus the seed noise above, with
Satterthwaite degrees of freedom; a stratum's df for contributor i is Kish's effective number of its pairs,
(Σ_j (Pz_j)_i²)²/Σ_j (Pz_j)_i⁴, less one for the centring.
Since P1 = 0, φ = Σ_j Q_k/(2m_k)·(v(S_j) − v(N∖S_j))·P z_j + Â⁺1/(1ᵀÂ⁺1)·(v(N) − v(∅)).
The method line also says what a pair was worth in unpaired coalitions (:func:`_pairing_worth`).

``kernelshap_unpaired``: the same estimator and interval on single coalitions, stratum s holding the coalitions of
size s (kernel mass p(s)): Â_s and b̂_s are the means of zzᵀ and z(v(S) − v(∅)), ψ_j = e_j·P z_j, and v(∅) also
enters each coalition's response, so its seed noise enters with the weight h − PΣ_j w_j z_j instead of h.

``permutation``: antithetic draws, each a random order's chain ∅ ⊂ … ⊂ N and its reverse's; contributor i's draw
statistic is the mean of its two marginal contributions (exact for games with at most pairwise interactions). Where
i is first or last of the order that statistic is always E_i = ½(v({i}) − v(∅) + v(N) − v(N∖{i})), one number, which
has probability 2/n, so the draws are post-stratified by position: φ̂_i = (2/n)·E_i + (1 − 2/n)·(mean of i's middle
draws), and a contributor seen in one class only takes the end effect in proportion to its middle mean, fitted on
the others (:func:`_post_stratified`). Its variance: the middle draws' spread pooled across contributors, the fitted
effect's deviations, and the seed noise the spread does not hold (E_i's, and coalitions shared by several draws);
then the values are projected onto efficiency, a contributor whose every contribution was 0 left at 0. Averaging
the draws instead is conditionally biased whenever a contributor's share of end draws is not 2/n, which its spread
does not show (0.92 coverage at 2 draws of 8 contributors, RMSE 2–4× higher on games with
diminishing returns: benchmarks/RESULTS.md).

The remaining estimators but Banzhaf are a mean over m independent draws of a statistic linear in the utilities,
φ̂ = (1/m) Σ_k g_k with g_k = Σ_c G_kc ū_c:

- ``exact``: one draw over all 2^n coalitions with the Shapley weights; its stderr is the seed noise alone.
- ``loo``: one draw, v(N) − v(N∖{i}); its stderr is the seed noise alone.
- ``kernelshap_unbiased``: constrained KernelSHAP (Covert & Lee 2021) with the exact A = E[zzᵀ] of the Shapley
  kernel and i.i.d. paired draws (S, N∖S). Then A = c·I + a·11ᵀ with a = E[s(s−1)]/(n(n−1)), c = 1/2 − a, and the
  closed form reduces per pair to g_k = (z_S − |S|/n)(v(S) − v(N∖S))/(2c) + (v(N) − v(∅))/n, which is unbiased and
  sums to v(N) − v(∅) exactly, so the interval is a t-interval over pairs.

Their variance is estimated as Var(φ̂) = max(s̃², T)/m + (Σ_c σ²/k_c·W_c² − T/m), where s² is the variance of g_k
over draws, W = (1/m) Σ_k G_k the estimator's weight on each coalition, T = Σ_c σ²/k_c·(Σ_k G_kc² − m W_c²)/(m−1)
the part of s² that is seed noise, and the second term the noise of the coalitions draws share (∅, N, reused
prefixes), which s² misses. s̃² is s² shrunk toward the variance pooled over contributors (empirical Bayes, Smyth
2004; see :func:`_moderated`): with few draws a contributor's own s² is often near zero (a majority game's player
never pivotal, the rare large contribution not drawn) exactly when its estimate is off: t-intervals on it covered
0.90 for the unbiased form at 15 draws of 8 contributors (and 0.31–0.89 for the averaged permutations on
benchmarks/bench_estimators.py's majority and concave games). The interval is value ± t_{df}·stderr with the
moderated df (m − 1 up to (n − 1)(m − 1)) and the pooled noise df combined by Satterthwaite, and the pooled noise df
alone for ``exact`` and ``loo``.

``banzhaf`` (maximum sample reuse, Wang & Jia): value_i = mean ū over planned coalitions with i − mean without i.
The planned coalitions are a uniform sample without replacement, so each mean's variance is
(s² − σ̄²)(1 − f)/k + σ̄²/k (finite-population correction f = k/2^(n−1), σ̄² the mean seed noise of the k means),
combined with Welch–Satterthwaite degrees of freedom. With every coalition planned it is the exact Banzhaf value.

The convergence table repeats the estimate on about 20 log-spaced prefixes of the plan (for the sampled estimators;
the draws complete within the first q rows), with σ² pooled over the whole plan at every point.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.linalg
from scipy import sparse
from scipy.special import comb, stdtrit

from diffcredit import coalitions as plans
from diffcredit.io import write_json, write_table

MISSING_POLICIES = ("error", "exclude")
TABLE_COLUMNS = (
    "contributor",
    "value",
    "stderr",
    "ci_low",
    "ci_high",
    "df",
    "rank",
    "n_coalitions",
    "estimator",
    "seed_noise",
)
CONDITIONAL = "not measured: interval conditional on single measurements"
_GRID_POINTS = 20
_MAX_LEVERAGE = 0.95  # caps the HC2 inflation of one pair's squared residual at 20×
_ROUNDING = 1e-20  # squared residuals below this share of the squared responses are rounding error
_UNPAIRED_HINT = 0.75  # a pair worth fewer unpaired coalitions than this (a margin for the ratio's spread): say so
_CONDITION = 1e-6  # Cholesky diagonals below this share of the largest: treat the sampled matrix as singular
_LISTED = 10  # ids named in an error message before "and k more"


@dataclass(frozen=True)
class ValuationResult:
    """Values of contributors with standard errors and intervals, from one estimator (Shapley, Banzhaf or LOO).

    ``values``, ``stderr``, ``ci_low``, ``ci_high`` and ``df`` (the t-interval's degrees of freedom) are arrays in
    the order of ``names``. ``convergence`` holds value and stderr on plan prefixes (``n_coalitions``,
    ``contributor``, ``value``, ``stderr``); ``method`` says how the values and intervals were made, ``seed_noise``
    whether the seed noise is in the interval, ``excluded`` which planned coalitions had no finite utility.

    >>> result = aggregate(plan_table, utility_rows)          # doctest: +SKIP
    >>> result.sorted().to_frame().head()                     # doctest: +SKIP
    >>> result.save("values.csv"); ValuationResult.load("values.csv")  # doctest: +SKIP
    """

    names: tuple[str, ...]
    values: np.ndarray
    stderr: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    df: np.ndarray
    estimator: str
    method: str
    confidence: float = 0.95
    n_coalitions: int = 0
    seed_noise: str = CONDITIONAL
    excluded: tuple[str, ...] = ()
    convergence: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["n_coalitions", "contributor", "value", "stderr"])
    )

    @classmethod
    def from_estimates(
        cls,
        names: Sequence[str],
        values: np.ndarray,
        stderr: np.ndarray,
        df: np.ndarray,
        *,
        estimator: str,
        method: str,
        confidence: float = 0.95,
        **fields: object,
    ) -> ValuationResult:
        """Build a result, with the t-intervals of ``confidence`` from ``stderr`` and ``df``."""
        values, stderr = np.asarray(values, float), np.asarray(stderr, float)
        df = np.broadcast_to(np.asarray(df, float), values.shape).copy()
        with np.errstate(invalid="ignore"):
            half = np.where(stderr > 0, stdtrit(df, 0.5 + confidence / 2), 0.0) * stderr
        return cls(
            tuple(names), values, stderr, values - half, values + half, df, estimator, method, confidence, **fields
        )

    def __len__(self) -> int:
        return len(self.names)

    def to_frame(self) -> pd.DataFrame:
        """One row per contributor: the columns of :data:`TABLE_COLUMNS` (the layout of the values CSV)."""
        frame = pd.DataFrame(
            {
                "contributor": list(self.names),
                "value": self.values,
                "stderr": self.stderr,
                "ci_low": self.ci_low,
                "ci_high": self.ci_high,
                "df": self.df,
            }
        )
        frame["rank"] = frame["value"].rank(ascending=False, method="min").astype("Int64")
        frame["n_coalitions"] = self.n_coalitions
        frame["estimator"] = self.estimator
        frame["seed_noise"] = self.seed_noise
        return frame

    @property
    def table(self) -> pd.DataFrame:
        """The values table (:meth:`to_frame`)."""
        return self.to_frame()

    def sorted(self, descending: bool = True) -> ValuationResult:
        """The same result with the contributors ordered by value (highest first unless ``descending=False``)."""
        order = np.argsort(-self.values if descending else self.values, kind="stable")
        return replace(
            self,
            names=tuple(np.array(self.names, dtype=object)[order]),
            **{name: getattr(self, name)[order] for name in ("values", "stderr", "ci_low", "ci_high", "df")},
        )

    def merge(self, other: ValuationResult) -> ValuationResult:
        """Combine with an independent estimate of the same values (e.g. a plan of another seed).

        The values are averaged with weights proportional to the coalitions each used (as pyDVL merges results);
        the variances combine accordingly, with Satterthwaite degrees of freedom. Rounds of one prefix-stable plan
        are not independent: aggregate the longer plan instead, which already holds the earlier rounds.
        """
        if other.estimator != self.estimator or set(other.names) != set(self.names):
            raise ValueError(
                f"can merge only results of one estimator over the same contributors, got {self.estimator} and "
                f"{other.estimator} over {len(self)} and {len(other)} contributors"
            )
        order = pd.Index(other.names).get_indexer(self.names)
        weight = self.n_coalitions / (self.n_coalitions + other.n_coalitions)
        values = weight * self.values + (1 - weight) * other.values[order]
        variance, df = _satterthwaite(
            [weight**2 * self.stderr**2, (1 - weight) ** 2 * other.stderr[order] ** 2], [self.df, other.df[order]]
        )
        return ValuationResult.from_estimates(
            self.names,
            values,
            np.sqrt(variance),
            df,
            estimator=self.estimator,
            method=f"merged ({self.method}) with ({other.method})",
            confidence=self.confidence,
            n_coalitions=self.n_coalitions + other.n_coalitions,
            seed_noise=self.seed_noise if self.seed_noise == other.seed_noise else "mixed",
            excluded=tuple(sorted(set(self.excluded) | set(other.excluded))),
        )

    def save(self, path: str | os.PathLike[str], convergence: str | os.PathLike[str] | None = None) -> None:
        """Write the values CSV and, beside it, ``<name>.json`` with the method and level (both atomically)."""
        write_result(self, path, convergence)
        write_json(
            Path(path).with_suffix(".json"),
            {
                "estimator": self.estimator,
                "method": self.method,
                "confidence": self.confidence,
                "seed_noise": self.seed_noise,
                "excluded": list(self.excluded),
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ValuationResult:
        """Read a result written by :meth:`save` (the JSON beside the CSV is optional)."""
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"contributor": str})
        plans.require_columns(frame, ("contributor", "value", "stderr", "ci_low", "ci_high"), str(path))
        meta_path = Path(path).with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        first = frame.iloc[0] if len(frame) else {}
        return cls(
            tuple(frame["contributor"]),
            *(frame[c].to_numpy(float) for c in ("value", "stderr", "ci_low", "ci_high")),
            frame["df"].to_numpy(float) if "df" in frame else np.full(len(frame), np.inf),
            meta.get("estimator", first.get("estimator", "")),
            meta.get("method", ""),
            meta.get("confidence", 0.95),
            int(first.get("n_coalitions", 0)) if len(frame) else 0,
            meta.get("seed_noise", first.get("seed_noise", CONDITIONAL)),
            tuple(meta.get("excluded", ())),
        )


@dataclass(frozen=True)
class _Measured:
    """Per-coalition mean utility (NaN where excluded), variance of that mean from seed noise, and noise df;
    ``exact``: how many coalitions were found free of seed noise (:func:`_exact_coalitions`)."""

    mean: np.ndarray
    noise: np.ndarray
    df: int
    exact: int = 0


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
    pairing: float = np.nan  # paired kernelshap: what a pair was worth in unpaired coalitions (see _pairing_worth)


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
    convergence: bool = True,
) -> ValuationResult:
    """Estimate each contributor's value with the estimator recorded in the plan (see the module docstring).

    ``convergence=False`` skips the estimates on plan prefixes (the result's convergence table then holds the
    final estimate only), which is about 20 times faster for repeated aggregation (benchmarks, tests).
    ``contributors`` fixes the output order (default: the plan's, see :func:`coalitions.parse_coalitions`).
    ``missing="error"`` refuses planned coalitions without a finite utility; ``"exclude"`` leaves them (and every
    draw using them) out and lists them in ``ValuationResult.excluded``. Every interval is analytic (no resampling).
    """
    from diffcredit.estimators import REGISTRY  # the registry refers to this module's aggregations

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence!r}")
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    table, names, members = plans.parse_plan(coalitions, contributors)
    estimator = table["estimator"][0]
    measured, excluded = _measure(table["coalition"], validate_utilities(utilities), missing)
    path, method = REGISTRY[estimator].aggregation(
        table, members, measured, _grid(len(table)) if convergence else np.array([len(table)])
    )
    if measured.df:
        seed_noise = f"included (pooled from repeated utilities, df {measured.df})"
        method += f"; seed noise from repeated utilities (pooled, df {measured.df}) included"
        if measured.exact:
            method += f" ({measured.exact} coalition(s) whose repeats agree to the bit taken as free of it)"
    else:
        seed_noise = CONDITIONAL
        method += (
            "; no repeated utilities, so seed noise is not separated: the interval is conditional on single "
            "measurements"
        )
    if excluded:
        method += f"; {len(excluded)} coalition(s) without a finite utility excluded"
    estimate = path[-1][1]
    convergence = pd.concat(
        [
            pd.DataFrame({"n_coalitions": rows, "contributor": names, "value": e.value, "stderr": e.stderr})
            for rows, e in path
        ],
        ignore_index=True,
    )
    return ValuationResult.from_estimates(
        names,
        estimate.value,
        estimate.stderr,
        estimate.df,
        estimator=estimator,
        method=f"{method}; {confidence:.0%} level",
        confidence=confidence,
        n_coalitions=estimate.used,
        seed_noise=seed_noise,
        excluded=excluded,
        convergence=convergence,
    )


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
    exact = _exact_coalitions(values, rows, count)
    pooled = ~exact[rows]
    squares = float(((values[pooled] - mean[rows[pooled]]) ** 2).sum())
    df = int((count[(count > 0) & ~exact] - 1).sum())
    noise = np.where(count > 0, (squares / df if df else 0.0) / np.maximum(count, 1), np.nan)
    noise[exact] = 0.0
    mean[bad] = np.nan
    return _Measured(mean, noise, df, int(exact.sum())), tuple(sorted(set(failed) | set(absent)))


def _exact_coalitions(values: np.ndarray, rows: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Coalitions measured twice or more to the same bits while another's repeats differ: their utility does not
    depend on the seed (in the text_lora family v(∅) is the base itself, sampled from the common noise), so they have
    no seed noise, and pooling their zero spread would understate everyone else's."""
    low = np.full(len(count), np.inf)
    high = np.full(len(count), -np.inf)
    np.minimum.at(low, rows, values)
    np.maximum.at(high, rows, values)
    tied = (count > 1) & (low == high)
    return tied if (~tied & (count > 1)).any() else np.zeros(len(count), bool)


def _listing(values: Sequence[str]) -> str:
    shown = ", ".join(map(str, values[:_LISTED]))
    return shown + (f" and {len(values) - _LISTED} more" if len(values) > _LISTED else "")


def exact_path(
    table: pd.DataFrame, members: sparse.csr_array, measured: _Measured, grid: np.ndarray
) -> tuple[list, str]:
    n = members.shape[1]
    if len(table) != 2**n:
        raise ValueError(f"an exact plan holds all 2^{n} = {2**n} coalitions, this one has {len(table)}")
    if np.isnan(measured.mean).any():
        raise ValueError("exact Shapley needs the utility of every coalition; none can be excluded")
    z = members.toarray()
    size = z.sum(axis=1, keepdims=True)
    weight = 1.0 / (n * comb(n - 1, np.arange(n)))  # weight of a marginal contribution to a set of size s
    weights = np.where(z, weight[np.clip(size - 1, 0, n - 1)], -weight[np.clip(size, 0, n - 1)])
    linear = _Linear(np.arange(len(table))[None, :], weights[None], np.array([len(table) - 1]))
    return (
        _linear_path(linear, measured, np.array([len(table)])),
        f"exact Shapley over all {len(table)} coalitions; t-interval from seed noise only",
    )


def loo_path(table: pd.DataFrame, members: sparse.csr_array, measured: _Measured, grid: np.ndarray) -> tuple[list, str]:
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
    linear = _Linear(np.concatenate([grand, left_out])[None, :], weights[None], np.array([len(table) - 1]))
    return (
        _linear_path(linear, measured, np.array([len(table)])),
        "leave-one-out v(N) - v(N without i); t-interval from seed noise only",
    )


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


def permutation_path(
    table: pd.DataFrame, members: sparse.csr_array, measured: _Measured, grid: np.ndarray
) -> tuple[list, str]:
    n = members.shape[1]
    draws, done = _samples(table, 2 * (n + 1))
    chains = draws.reshape(-1, n + 1)  # each draw: the chain of an order, then the chain of its reverse
    steps = members[chains[:, 1:].ravel()].astype(np.int8) - members[chains[:, :-1].ravel()].astype(np.int8)
    steps = sparse.csr_array(steps)
    steps.eliminate_zeros()
    if (np.diff(steps.indptr) != 1).any() or (steps.data != 1).any() or (members[chains[:, 0]].sum() != 0):
        raise ValueError("a permutation sample is not a chain ∅ ⊂ … ⊂ N adding one contributor per step")
    added = steps.indices.reshape(len(draws), 2, n)  # contributor added at each step of each chain
    keep = np.isfinite(measured.mean[draws]).all(axis=1)  # a draw using an excluded coalition is dropped
    draws, done, added = draws[keep], done[keep], added[keep]
    if len(done) < 2:
        raise ValueError(
            f"the permutation plan has {len(done)} complete draw(s) with utilities; at least 2 are needed for an "
            "interval: raise the budget"
        )
    # weights[k, slot, i]: ±½ on the two utilities of each of contributor i's steps in draw k's two chains
    weights = np.zeros((len(draws), 2, n + 1, n))
    chain_draw, step = np.arange(len(draws))[:, None, None], np.arange(n)[None, None, :]
    weights[chain_draw, np.arange(2)[None, :, None], step + 1, added] += 0.5
    weights[chain_draw, np.arange(2)[None, :, None], step, added] -= 0.5
    weights = weights.reshape(len(draws), 2 * (n + 1), n)
    mean_gain = np.einsum("ksn,ks->kn", weights, measured.mean[draws])
    at_end = np.zeros((len(draws), n), bool)
    at_end[chain_draw[:, 0, 0], added[:, 0, 0]] = at_end[chain_draw[:, 0, 0], added[:, 0, -1]] = True
    noise = np.nan_to_num(measured.noise)
    empty, grand = _bounds_of(members)
    delta = measured.mean[grand] - measured.mean[empty]
    path = []
    for q in grid:
        stop = int(np.searchsorted(done, q))
        if stop >= 2:
            seed_noise = _permutation_noise(weights[:stop], draws[:stop], at_end[:stop], noise)
            estimate = _post_stratified(mean_gain[:stop], at_end[:stop], seed_noise, delta, measured.df)
            path.append((int(q), replace(estimate, used=len(np.unique(draws[:stop])))))
    return path, (
        f"mean marginal contribution over {len(done)} antithetic permutation pairs, post-stratified by position "
        "(a chain end's contribution is one fixed number; contributors seen only in the middle or only at an end "
        "take the end effect in proportion to their middle mean); t-interval with the middle variance pooled "
        "across contributors, projected onto efficiency"
    )


def _end_share(n: int) -> float:
    """The probability 2/n that a contributor is first or last of a random order (1 when every position is an end)."""
    return 2.0 / n if n > 2 else 1.0


def _class_weights(at_end: np.ndarray) -> np.ndarray:
    """Each draw's weight in contributor i's post-stratified estimate (see :func:`_post_stratified`); for a
    contributor seen in one class only, that class's mean (the fitted end effect's factor left out)."""
    share = _end_share(at_end.shape[1])
    k_end, k_mid = at_end.sum(axis=0), (~at_end).sum(axis=0)
    both = (k_end > 0) & (k_mid > 0)
    end = np.where(both, share, 1.0) / np.maximum(k_end, 1)
    middle = np.where(both, 1 - share, 1.0) / np.maximum(k_mid, 1)
    return np.where(at_end, end, middle)


def _permutation_noise(weights: np.ndarray, draws: np.ndarray, at_end: np.ndarray, noise: np.ndarray):
    """Seed noise of the post-stratified estimate, Σ_c W_ic²σ_c², and the part of it that the spread of the middle
    draws does not hold: the end part E_i (one set of four utilities, however often drawn) and the covariance of
    coalitions that several draws use (the draws' own Σ_k Σ_c w_kic²σ_c² subtracted), which may be negative."""
    scaled = weights * _class_weights(at_end)[:, None, :]
    rows, slot = np.unique(draws, return_inverse=True)
    per_coalition = np.zeros((len(rows), weights.shape[2]))
    np.add.at(per_coalition, slot.ravel(), scaled.reshape(-1, weights.shape[2]))
    exact = noise[rows] @ per_coalition**2
    middle = np.einsum("ksn,ks->n", np.where(at_end[:, None, :], 0.0, scaled) ** 2, noise[draws])
    return exact, exact - middle


def _post_stratified(
    gain: np.ndarray, at_end: np.ndarray, seed_noise: tuple[np.ndarray, np.ndarray], delta: float, noise_df: int
):
    """Antithetic permutation draws post-stratified by position: φ_i = (2/n)·E_i + (1 − 2/n)·M_i.

    ``gain`` holds each draw's mean of contributor i's two marginal contributions (order and reverse), ``at_end``
    whether i was first or last of the order. At an end the draw's gain is E_i = ½(v({i}) − v(∅) + v(N) − v(N∖{i}))
    whatever the order, so E_i has no sampling variance; M_i, the mean over the middle positions, is estimated by i's
    middle draws, their variance pooled across contributors (i's own spread counted as its share of the pool). On
    games whose end contributions differ from the middle ones (diminishing returns) the plain mean of the draws is
    conditionally biased by (k_end/m − 2/n)(E_i − M_i), which its spread does not show: 2 draws of 8 contributors
    covered 0.92. A contributor seen in one class only takes the end effect in proportion to its middle mean,
    E_i − M_i = ρ·M_i with ρ fitted on those seen in both, and the deviations from that fit in its variance; a shared
    additive effect instead gave a contributor who adds nothing the others' effect (2.8% of v(N) − v(∅), its
    interval never holding 0). The values are then projected onto efficiency, each moved in proportion to its
    variance, except a contributor whose every measured contribution was 0, which stays at 0. ``seed_noise``: the
    estimate's seed-noise variance and the part of it the middle spread does not hold (:func:`_permutation_noise`).
    """
    n = gain.shape[1]
    share = _end_share(n)
    middle = ~at_end
    k_mid, k_end = middle.sum(axis=0), at_end.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        end_value = np.where(k_end > 0, (gain * at_end).sum(axis=0) / k_end, np.nan)
        mid_value = np.where(k_mid > 0, (gain * middle).sum(axis=0) / k_mid, np.nan)
    squares = (np.where(middle, gain - np.nan_to_num(mid_value), 0.0) ** 2).sum(axis=0)
    pooled_df = float(np.maximum(k_mid - 1, 0).sum())
    pooled = squares.sum() / pooled_df if pooled_df else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = (pooled_df * pooled + squares) / (pooled_df + np.maximum(k_mid - 1, 0))
        mid_var = np.where(k_mid > 0, spread / k_mid, np.nan)
    both = (k_mid > 0) & (k_end > 0)
    # the end effect in proportion to the middle mean, E_i − M_i = ρ·M_i (least squares over those seen in both), so
    # that a contributor who adds nothing (M_i = 0) borrows nothing; d_i's deviation from ρ·M_i enters the variance
    effect = end_value - mid_value
    scale = float((mid_value[both] ** 2).sum())
    if both.sum() >= 2 and scale > 0:
        rho = float((effect[both] * mid_value[both]).sum()) / scale
        residual = effect[both] - rho * mid_value[both]
        deviation = float((residual**2).sum()) / (both.sum() - 1)
        rho_var = deviation / scale
    else:
        rho, deviation, rho_var = 0.0, float(np.var(gain)), 0.0
    growth = 1 + rho if abs(1 + rho) > 0.1 else 1.0  # E_i = (1 + ρ)·M_i: M_i of a contributor seen only at ends
    end_middle = end_value / growth
    value = np.where(
        both,
        share * end_value + (1 - share) * mid_value,
        np.where(k_mid > 0, mid_value * (1 + share * rho), share * end_value + (1 - share) * end_middle),
    )
    exact, unseen = seed_noise
    middle_part = np.where(both, 1 - share, np.where(k_mid > 0, 1 + share * rho, 0.0)) ** 2 * np.nan_to_num(mid_var)
    unknown_effect = np.where(
        both,
        0.0,
        np.where(
            k_mid > 0,
            share**2 * (deviation + np.nan_to_num(mid_value) ** 2 * rho_var),
            (1 - share) ** 2 * (deviation + np.nan_to_num(end_middle) ** 2 * rho_var) / growth**2,
        ),
    )
    only_end = k_mid == 0
    variance = np.maximum(middle_part + unknown_effect + unseen + only_end * (1 - share) ** 2 * pooled, exact)
    if n <= 2:  # every position is an end: E_i is the Shapley value
        value, variance = end_value, exact
    # efficiency: the residual shared in proportion to the variances, but a contributor whose every measured
    # contribution was 0 (a null contributor) stays at 0
    moved = np.where(np.any(gain != 0, axis=0), variance, 0.0)
    if moved.sum() > 0:
        value = value + moved / moved.sum() * (delta - value.sum())
    if n > 2 and pooled_df:
        df = np.full(n, pooled_df)
    else:
        df = np.full(n, float(noise_df) if noise_df else np.inf)
    return _Estimate(value, np.sqrt(variance), df, 0)


def kernelshap_unbiased_path(
    table: pd.DataFrame, members: sparse.csr_array, measured: _Measured, grid: np.ndarray
) -> tuple[list, str]:
    n = members.shape[1]
    pairs, done = _samples(table, 2)
    empty, grand = _bounds_of(members)
    z = members[pairs[:, 0]].toarray()
    if (z + members[pairs[:, 1]].toarray() != 1).any():
        raise ValueError("a kernelshap sample pairs a coalition with something other than its complement")
    s, p = np.arange(1, n), plans.size_kernel(n)
    c = 0.5 - (p * s * (s - 1)).sum() / (p.sum() * n * (n - 1))
    alpha = (z - z.sum(axis=1, keepdims=True) / n) / (2 * c)
    m = len(pairs)
    weights = np.stack([alpha, -alpha, np.full((m, n), 1.0 / n), np.full((m, n), -1.0 / n)], axis=1)
    slots = np.column_stack([pairs, np.full(m, grand), np.full(m, empty)])
    return _sampled_path(
        _Linear(slots, weights, done),
        measured,
        grid,
        "kernelshap_unbiased",
        "unbiased constrained KernelSHAP (exact A) over {draws} i.i.d. paired draws; t-interval over pairs "
        "with variances shrunk across contributors (empirical Bayes)",
    )


def _bounds_of(members: sparse.csr_array) -> tuple[int, int]:
    """Rows of the empty and the grand coalition, which every KernelSHAP plan needs."""
    n = members.shape[1]
    if n < 2:
        raise ValueError("kernelshap needs at least 2 contributors; use the exact estimator")
    size = members.sum(axis=1)
    empty, grand = np.flatnonzero(size == 0), np.flatnonzero(size == n)
    if len(empty) != 1 or len(grand) != 1:
        raise ValueError("a kernelshap plan needs the empty and the grand coalition")
    return int(empty[0]), int(grand[0])


def _sampled_path(linear: _Linear, measured: _Measured, grid: np.ndarray, name: str, method: str) -> tuple[list, str]:
    """Drop the draws that use an excluded coalition, then estimate on the prefixes of the plan."""
    linear = _select(linear, ~np.isnan(measured.mean[linear.slots]).any(axis=1))
    if len(linear.done) < 2:
        raise ValueError(
            f"the {name} plan has {len(linear.done)} complete draw(s) with utilities; at least 2 are needed for an "
            "interval: raise the budget"
        )
    return _linear_path(linear, measured, grid), method.format(draws=len(linear.done))


def kernelshap_path(
    table: pd.DataFrame, members: sparse.csr_array, measured: _Measured, grid: np.ndarray
) -> tuple[list, str]:
    """Stratified paired KernelSHAP with the sampled matrix on about 20 prefixes of the plan."""
    return _stratified_path(table, members, measured, grid, paired=True)


def kernelshap_unpaired_path(
    table: pd.DataFrame, members: sparse.csr_array, measured: _Measured, grid: np.ndarray
) -> tuple[list, str]:
    """Stratified unpaired KernelSHAP (strata: coalition sizes) with the sampled matrix on about 20 prefixes."""
    return _stratified_path(table, members, measured, grid, paired=False)


def _stratified_path(
    table: pd.DataFrame, members: sparse.csr_array, measured: _Measured, grid: np.ndarray, paired: bool
) -> tuple[list, str]:
    n = members.shape[1]
    empty, grand = _bounds_of(members)
    if not np.isfinite(measured.mean[[empty, grand]]).all():
        raise ValueError("kernelshap needs the utilities of the empty and the grand coalition; neither can be excluded")
    draws, done = _samples(table, 2 if paired else 1)
    size = members.sum(axis=1)
    keep = np.isfinite(measured.mean[draws]).all(axis=1)
    if paired:
        left, right = draws[:, 0], draws[:, 1]
        if ((size[left] + size[right]) != n).any() or members[left].multiply(members[right]).sum() != 0:
            raise ValueError("a kernelshap sample pairs a coalition with something other than its complement")
        small = size[left] <= n - size[left]  # put the smaller side first: its membership row is the sparse one
        side, other = np.where(small, left, right)[keep], np.where(small, right, left)[keep]
        response = (measured.mean[side] - measured.mean[other]) / 2
        even = (measured.mean[side] + measured.mean[other] - measured.mean[grand] - measured.mean[empty]) / 2
        noise = np.nan_to_num(measured.noise[side] + measured.noise[other]) / 4
        design = _Design(plans.kernel_mass(n), plans.stratum_pairs(n), paired=True)
        flipped = np.zeros(len(side), bool)
    else:
        side = draws[keep, 0]
        if ((size[side] == 0) | (size[side] == n)).any():
            raise ValueError("a kernelshap_unpaired sample is the empty or the grand coalition; re-run diffcredit plan")
        response, even = measured.mean[side] - measured.mean[empty], None
        noise = np.nan_to_num(measured.noise[side])
        flipped = size[side] > n - size[side]
        design = _Design(plans.size_mass(n), comb(n, np.arange(1, n), exact=False), paired=False)
    done = done[keep]
    unit = "pair" if paired else "coalition"
    if len(done) < 2:
        raise ValueError(
            f"the kernelshap plan has {len(done)} complete {unit}(s) with utilities; at least 2 are needed for an "
            "interval: raise the budget"
        )
    smaller = members[side]
    if flipped.any():  # keep the sparse side: a large coalition is stored as its complement
        smaller = smaller.toarray()
        smaller[flipped] = ~smaller[flipped]
    units = _Units(sparse.csr_array(smaller, dtype=float), size[side], response, noise, flipped, even)
    delta = measured.mean[grand] - measured.mean[empty]
    bounds = np.nan_to_num(measured.noise[[empty, grand]])
    path = []
    for q in grid:
        stop = int(np.searchsorted(done, q))
        if stop >= 2:
            path.append((int(q), _stratified_kernelshap(units.head(stop), design, delta, bounds, measured.df)))
    final = path[-1][1]
    method = (
        f"constrained KernelSHAP with the sampled matrix over {(final.used - 2) // 2} stratified pairs"
        if paired
        else f"constrained KernelSHAP with the sampled matrix over {final.used - 2} coalitions stratified by size, "
        "unpaired"
    ) + "; linearised t-interval with finite-population correction per stratum"
    if np.isfinite(final.pairing):
        method += f"; a pair was worth {final.pairing:.2f} unpaired coalitions" + (
            " (a nearly constant-sum game: kernelshap_unpaired gives more per utility)"
            if final.pairing < _UNPAIRED_HINT
            else ""
        )
    elif final.pairing == np.inf:
        method += "; the pairs left no residual (their odd part is additive): pairing beat unpaired coalitions"
    return path, method


@dataclass(frozen=True)
class _Design:
    """A stratified KernelSHAP design: each stratum's Shapley-kernel mass (summing to 1) and number of units.

    Paired: stratum k holds the pairs (S, N∖S) with min(|S|, n−|S|) = k. Unpaired: stratum s holds the coalitions of
    size s.
    """

    mass: np.ndarray
    population: np.ndarray
    paired: bool


@dataclass(frozen=True)
class _Units:
    """Planned units of a stratified KernelSHAP plan, a pair (S, N∖S) or one coalition S: the membership z of the
    smaller of S and N∖S (a pair: S, its smaller side; a coalition: S itself, or N∖S where ``flipped``, so that z stays
    sparse), the unit's stratum (the pair's min(|S|, n − |S|), the coalition's size), its response y (a pair:
    (v(S) − v(N∖S))/2; a coalition: v(S) − v(∅)), the variance of y from seed noise, and a pair's even part
    (v(S) + v(N∖S) − v(N) − v(∅))/2."""

    z: sparse.csr_array
    stratum: np.ndarray
    response: np.ndarray
    noise: np.ndarray
    flipped: np.ndarray
    even: np.ndarray | None = None

    def head(self, m: int) -> _Units:
        return _Units(
            self.z[:m],
            self.stratum[:m],
            self.response[:m],
            self.noise[:m],
            self.flipped[:m],
            None if self.even is None else self.even[:m],
        )


def _stratified_kernelshap(
    units: _Units, design: _Design, delta: float, bounds: np.ndarray, noise_df: int
) -> _Estimate:
    """Values, stderr and degrees of freedom of stratified kernelshap from its units (see the module docstring);
    ``bounds``: the seed-noise variances of v(∅) and v(N)."""
    n = units.z.shape[1]
    k = units.stratum
    count = np.bincount(k, minlength=len(design.mass) + 1)[1:]
    mass, population = design.mass, design.population
    weight = mass[k - 1] / count[k - 1]  # Q_k / m_k per unit
    z, flipped = units.z, units.flipped
    sign = np.where(flipped, -1.0, 1.0)

    def total(x: np.ndarray) -> np.ndarray:  # Σ_j x_j c_j over the units' coalitions c_j (1 − z_j where flipped)
        return z.T @ (sign * x) + x[flipped].sum()

    column = total(weight)  # Σ w c
    a_hat = (z.T @ sparse.diags_array(weight) @ z).toarray()
    if flipped.any():  # (1 − z)(1 − z)ᵀ = 11ᵀ − 1zᵀ − z1ᵀ + zzᵀ
        towards = z.T @ (weight * flipped)
        a_hat += weight[flipped].sum() - towards[:, None] - towards[None, :]
    rows = None
    if design.paired:
        a_hat += (weight.sum() - column[:, None] - column[None, :]) / 2  # (zzᵀ + z̄z̄ᵀ)/2 = zzᵀ + (11ᵀ − z1ᵀ − 1zᵀ)/2
        if 2 * len(k) < n:  # Â = FᵀF is singular for sure: its pseudo-inverse from the 2m × 2m Gram matrix of F
            half = np.sqrt(weight / 2)[:, None] * z.toarray()
            rows = np.vstack([half, np.sqrt(weight / 2)[:, None] - half])  # √(w/2)·z and √(w/2)·z̄ for each pair
    elif len(k) < n:
        rows = z.toarray()
        rows[flipped] = 1 - rows[flipped]
        rows *= np.sqrt(weight)[:, None]
    inverse = _pseudo_inverse(a_hat, rows)
    ones = inverse.sum(axis=1)  # Â⁺1
    h = ones / ones.sum()

    def project(rows):  # x ↦ P x for each row x (P is symmetric); rows may be sparse
        return rows @ inverse - (rows @ ones)[:, None] * h[None, :]

    value = project(total(weight * units.response)[None, :])[0] + h * delta
    pz = project(z)
    fitted = z @ value
    fitted[flipped] = value.sum() - fitted[flipped]
    # r_j with ψ_j = P(b_j − A_j φ) = r_j·Pc_j: a pair's (e − ē)/2 (Pz̄ = −Pz, since P1 = 0), a coalition's e;
    # c_j = z_j but where flipped, there Pc_j = P(1 − z_j) = −Pz_j, and c_jᵀPc_j = z_jᵀPz_j (the leverage below)
    residual = units.response - fitted + (delta / 2 if design.paired else 0.0)
    # HC2: a unit's own weight pulls the fit towards it (leverage h_j = w_j z_jᵀPz_j, averaging (n − 1)/m), so
    # E[r_j²] = (1 − h_j)σ²; dividing by √(1 − h_j) makes each squared residual unbiased (HC3's 1 − h_j
    # approximates the jackknife and over-covers at m ≈ n: 0.971 at 15 pairs of n = 8, HC2 0.94–0.96)
    leverage = np.clip(weight * np.asarray(z.multiply(pz).sum(axis=1)).ravel(), 0, _MAX_LEVERAGE)
    residual = residual / np.sqrt(1 - leverage)
    pz *= sign[:, None]  # Pc_j
    influence = residual[:, None] * pz
    own_noise = units.noise[:, None] * pz**2  # seed noise left in ψ_j: (1 − h_j) of it, times 1/(1 − h_j)

    def dof(rows: np.ndarray, scale: float | np.ndarray = 1.0) -> np.ndarray:
        # Satterthwaite's df of Σ_j ω_j r_j² with ω_j = (scale_j (Pz_j)_i)²: (Σω)²/Σω² (Kish's effective number of
        # units: a contributor in one unit of a stratum has about 1, not m − 1), less the centring's share
        count, share = rows.sum(), (np.reshape(scale, (-1, 1)) * pz[rows]) ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            effective = share.sum(axis=0) ** 2 / (share**2).sum(axis=0)
        return np.maximum(np.nan_to_num(effective, nan=count) * (count - 1) / count, 1.0)

    noise = (weight**2 * units.noise) @ pz**2
    if design.paired:  # v(∅) and v(N) enter only through Δ: a pair's difference cancels v(∅)
        noise += h**2 * (bounds[1] + bounds[0])
    else:  # v(∅) also enters every coalition's response
        noise += (h - project(column[None, :])[0]) ** 2 * bounds[0] + h**2 * bounds[1]

    parts, dfs = [], []
    strata = np.flatnonzero(count)
    single = [s for s in strata if count[s] == 1 and count[s] < population[s]]
    for s in strata:
        m = count[s]
        if m == population[s] or m == 1:
            continue
        rows = k == s + 1
        spread = influence[rows].var(axis=0, ddof=1) - own_noise[rows].mean(axis=0)
        parts.append(mass[s] ** 2 * (1 - m / population[s]) * np.maximum(spread, 0) / m)
        dfs.append(dof(rows))
    if len(single) >= 2:  # collapsed strata: one unit each, compared with their share of the group's total
        rows = np.isin(k, np.array(single) + 1)
        total = mass[k[rows] - 1][:, None] * influence[rows]
        share = mass[k[rows] - 1] / mass[k[rows] - 1].sum()
        parts.append(len(single) / (len(single) - 1) * ((total - share[:, None] * total.sum(axis=0)) ** 2).sum(0))
        dfs.append(dof(rows, mass[k[rows] - 1]))
    elif single and parts:  # a lone one-unit stratum borrows the spread of the nearest stratum with several
        s = single[0]
        nearest = min((t for t in strata if 1 < count[t] < population[t]), key=lambda t: abs(t - s))
        rows = k == nearest + 1
        spread = influence[rows].var(axis=0, ddof=1) - own_noise[rows].mean(axis=0)
        parts.append(mass[s] ** 2 * np.maximum(spread, 0))
        dfs.append(dof(rows))
    if noise_df:
        parts.append(noise)
        dfs.append(noise_df)
    variance, df = _satterthwaite(parts, dfs) if parts else (np.zeros(n), np.full(n, np.inf))
    sampled = count[k - 1] < population[k - 1]
    pairing = np.nan if units.even is None else _pairing_worth(units.even, residual, units.response, weight, sampled)
    return _Estimate(value, np.sqrt(variance), df, 2 + (2 if design.paired else 1) * len(k), pairing)


def _pairing_worth(
    even: np.ndarray, odd: np.ndarray, response: np.ndarray, weight: np.ndarray, sampled: np.ndarray
) -> float:
    """How many unpaired coalitions one pair (S, N∖S) was worth, from the pairs of the strata still sampled.

    A game splits into an odd part w(S) = (v(S) − v(N∖S) + v(N) − v(∅))/2, which carries the whole Shapley value,
    and an even part a(S) = a(N∖S) of Shapley value zero. An unpaired coalition's residual holds both, ρ + a, and
    costs one utility; a pair's holds ρ alone and costs two. So a pair is worth (E[ρ²] + E[a²] + σ²)/(E[ρ²] + σ²/2)
    / 2 coalitions, σ² the seed noise; each pair's (e − ē)/2 (HC2-adjusted) and even part carry σ²/2 each, so the
    kernel-weighted means of their squares, R and A, give it as (R + A)/(2R) with no noise term: above 1 pairing
    pays (exact at ∞ on games with at most pairwise interactions), below 1 the game is nearly constant-sum
    (v(S) + v(N∖S) ≈ v(N) + v(∅): majority games) and unpaired coalitions (kernelshap_unpaired) give more per
    utility. NaN when no stratum is sampled (all enumerated) or both parts are rounding error next to the
    responses (an additive game without noise: every design is exact); ∞ when only the odd part is.
    """
    if not sampled.any():
        return np.nan
    odd_part = float(weight[sampled] @ odd[sampled] ** 2)
    even_part = float(weight[sampled] @ even[sampled] ** 2)
    rounding = _ROUNDING * float(weight[sampled] @ response[sampled] ** 2)
    if odd_part <= rounding:
        return np.inf if even_part > rounding else np.nan
    return (odd_part + even_part) / (2 * odd_part)


def _pseudo_inverse(matrix: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Inverse of a symmetric positive semi-definite matrix, or its pseudo-inverse when it is (nearly) singular.

    ``rows`` F with matrix = FᵀF and fewer rows than columns gives the pseudo-inverse from the Gram matrix FFᵀ = VΛVᵀ
    as (FᵀVΛ⁻¹)(FᵀVΛ⁻¹)ᵀ, with pinvh's cutoff: the same matrix at a fraction of pinvh's n × n eigendecomposition
    (at 1,000 contributors that decomposition was most of the convergence table's time).
    """
    if rows is not None and len(rows) < len(matrix):
        eigenvalues, vectors = scipy.linalg.eigh(rows @ rows.T)
        keep = eigenvalues > len(matrix) * np.finfo(float).eps * max(eigenvalues.max(), 0.0)
        basis = rows.T @ (vectors[:, keep] / eigenvalues[keep])
        return basis @ basis.T
    try:
        factor, lower = scipy.linalg.cho_factor(matrix)
        diagonal = np.abs(np.diag(factor))
        if diagonal.min() > _CONDITION * diagonal.max():  # cond(matrix) ≈ (max/min of the factor's diagonal)²
            return scipy.linalg.cho_solve((factor, lower), np.eye(len(matrix)))
    except np.linalg.LinAlgError:
        pass
    return scipy.linalg.pinvh(matrix)


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
            # s² (the variance of g over draws) holds the seed noise T of the coalitions each draw uses alone; the
            # shared coalitions' noise (∅, N, reused prefixes) is not in it and is added apart, with its own df
            between = squares / (stop - 1)
            in_draws = (noise_of_draws - stop * noise_of_mean) / (stop - 1)  # T
            between, between_df = _moderated(between, stop - 1.0)
            parts, dfs = [np.maximum(between, in_draws) / stop], [between_df]
            if measured.df:
                parts, dfs = [*parts, noise_of_mean - in_draws / stop], [*dfs, measured.df]
            variance, df = _satterthwaite(parts, dfs)
            estimate = _Estimate(mean.copy(), np.sqrt(variance), df, int(seen.sum()))
        path.append((int(q), estimate))
    return path


def _moderated(spread: np.ndarray, df: float) -> tuple[np.ndarray, np.ndarray]:
    """Each contributor's variance over draws shrunk toward the pooled one (empirical Bayes), with its df.

    With few draws a contributor whose draws happen to agree gets a variance near zero (majority games: never
    pivotal; heavy-tailed contributions: the rare large one not drawn) and its t-interval does not cover. Smyth's
    (2004, limma) model: s_i² ~ σ_i² χ²_d/d given σ_i², and 1/σ_i² ~ χ²_{d0}/(d0 s0²) across contributors; then
    (φ̂_i − φ_i)/(s̃_i/√m) with s̃_i² = (d0 s0² + d s_i²)/(d0 + d) is exactly t with d0 + d degrees of freedom
    (capped, as in limma, at the pooled df). d0 and s0² are fitted by the moments of s² (limma uses log s², which
    fails at s² = 0): E[s²] = s0² d0/(d0 − 2) and E[s⁴]/E[s²]² = (1 + 2/d)(d0 − 2)/(d0 − 4); a spread of the s_i²
    no larger than their sampling explains gives d0 = ∞ (one common variance, s̃_i² = s0²). Contributor i's prior is
    fitted on the other contributors' s² only: its own s² enters s̃_i² as its data, and counted in the prior too, a
    near-zero s_i² would also pull s0² down (coverage 0.933 → 0.947 for kernelshap_unbiased at 32 coalitions of 8).
    """
    known = np.isfinite(spread)
    if known.sum() < 2 or not spread[known].any():
        return spread, np.full(len(spread), df)
    own = np.where(known, spread, 0.0)
    others = known.sum() - known
    first, second = (own.sum() - own) / others, ((own**2).sum() - own**2) / others
    pooled_df = df * (known.sum() - 1)  # the contributions of one draw sum to v(N) − v(∅): n − 1 free per draw
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = second / first**2 / (1 + 2 / df)
        prior = (4 * ratio - 2) / (ratio - 1)  # d0 > 4: the moment above exists only there
        shrunk = (first * (prior - 2) + df * spread) / (prior + df)  # d0 s0² = first·(d0 − 2)
    common = ratio <= 1
    # unknown s_i², or no spread among the others (contrived: one draw's contributions sum to a constant): keep s_i²
    fitted = known & (first > 0)
    value = np.where(fitted, np.where(common, first, shrunk), spread)
    dof = np.where(fitted, np.where(common, pooled_df, np.minimum(prior + df, pooled_df)), df)
    return value, dof


def _satterthwaite(parts: Sequence[np.ndarray], dfs: Sequence[float | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sum of independent variance estimates and its Welch–Satterthwaite degrees of freedom (df ∞ where it is 0)."""
    parts = np.array(parts, float).reshape(len(dfs), -1)
    dfs = np.array([np.broadcast_to(np.asarray(d, float), parts.shape[1:]) for d in dfs])
    variance = parts.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        df = variance**2 / (parts**2 / dfs).sum(axis=0)
    return variance, np.where(variance > 0, df, np.inf)


def banzhaf_path(
    table: pd.DataFrame, members: sparse.csr_array, measured: _Measured, grid: np.ndarray
) -> tuple[list, str]:
    """Banzhaf estimates on plan prefixes, from per-contributor sums that grow by chunk between grid points."""
    rows, n = members.shape
    keep = np.isfinite(measured.mean)
    u = np.where(keep, measured.mean - np.nanmean(measured.mean), 0.0)  # centred: sums of squares stay accurate
    per_row = np.column_stack([keep, u, u**2, np.where(keep, measured.noise, 0.0)])  # count, Σu, Σu², Σ noise
    z = members.astype(float)
    inside, total = np.zeros((4, n)), np.zeros((4, 1))
    path, start = [], 0
    for q in grid:
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
    return path, f"Banzhaf by maximum sample reuse over {path[-1][1].used} coalitions; Welch t-interval"


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
    variance, df = _satterthwaite([v_in, v_out], [k_in - 1, k_out - 1])
    return _Estimate(with_i - without_i, np.sqrt(variance), df, int(inside[0, 0] + outside[0, 0]))


def _grid(rows: int) -> np.ndarray:
    """About 20 log-spaced plan prefixes ending at the whole plan."""
    return np.unique(np.geomspace(min(4, rows), rows, _GRID_POINTS).round().astype(int))


def write_result(
    result: ValuationResult, path: str | os.PathLike[str], convergence: str | os.PathLike[str] | None = None
) -> None:
    """Write the values table as CSV (and optionally the convergence table, TSV if named .tsv), atomically."""
    write_table(result.table, path, sep=",")
    if convergence is not None:
        write_table(result.convergence, convergence, sep="\t" if str(convergence).endswith(".tsv") else ",")
