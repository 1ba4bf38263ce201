"""Multi-fidelity Shapley values: the retraining game's values from many cheap coalitions and a few retrained ones.

Retraining from scratch defines the game whose Shapley values are wanted, v(S) = E_seed[property of a model trained
on S]; sparsified fine-tuning (SFT) measures a cheap utility u_s(S) of every planned coalition, but its values are
those of a different game (another scale, and a bias that varies over coalitions). ``snakemake evaluate`` already
retrains the first K coalitions of the estimation plan with several seeds (the agreement prefix). This module
combines the two with the SFT utilities as a control variate.

Derivation. Let P_M be the estimation plan (M coalitions, all measured by SFT) and P_K its first K coalitions (also
retrained, seeds j = 1..J, utilities u_r(S, j)). Every DiffCredit estimator is, for a given plan, linear in the
utilities, φ̂[u; P] = Σ_S W_S(P) u(S), and φ̂[u; P_K] and φ̂[u; P_M] estimate the same thing (the Shapley values of
u, from the same sampler at two budgets). For any number β,

    φ_MF = φ̂[u_r − β u_s; P_K] + β φ̂[u_s; P_M] = φ̂[u_r; P_K] + β (φ̂[u_s; P_M] − φ̂[u_s; P_K])

has the expectation of φ̂[u_r; P_K], the retrain-only estimate from K coalitions: the bracket has expectation zero
whatever the SFT bias is, so φ_MF is unbiased for the retraining game's values (consistent, for estimators that are
consistent rather than unbiased), while plain SFT-Shapley φ̂[u_s; P_M] carries the SFT bias at any budget. The first
term is the Shapley estimate of the residual game r = u_r − β u_s on the K retrained coalitions: when u_r ≈ a + β u_s
up to a bias that varies little between coalitions, r is nearly constant, and a constant game has Shapley values
zero under every estimator (efficiency with v(N) = v(∅)), so its estimate from only K coalitions has little
variance. β is the control-variate coefficient that minimises the residual's variance over coalitions: the
least-squares slope of the retrained seed means on the SFT utilities over the K coalitions. β = 0 is the retrain-only
estimate; β = 1 with M = K is the same.

Interval. With A = φ̂[r; P_K], B = φ̂[u_s; P_M] and D = B − φ̂[u_s; P_K] (the derivative of φ_MF in β),

    Var(φ_MF) ≈ Var(A) + β² Var(B) + D² Var(β̂),

each taken from :func:`diffcredit.shapley.aggregate` (A's interval carries the retraining seed noise through the
repeated utilities, B's is plain SFT-Shapley's) and from the least-squares variance of β̂; the half-widths of A's and
B's intervals (the aggregate's t quantiles) are combined in quadrature with z·|D|·se(β̂). The covariance of A and B,
whose draws overlap in the prefix, is left out: the residual is uncorrelated with u_s over the K coalitions by
construction of β̂. tests/test_evaluation.py checks on a synthetic game (cheap = true + smooth bias + noise) that the
error is below plain SFT's and that the interval covers the retraining game's values at about the nominal rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from diffcredit.coalitions import member_sets, parse_coalitions
from diffcredit.shapley import aggregate, validate_utilities

__all__ = ["MultiFidelityResult", "multifidelity_values"]


@dataclass(frozen=True)
class MultiFidelityResult:
    """Values of the retraining game with intervals (``table``) and the control variate behind them.

    ``table`` has the columns of ``values.csv`` (``contributor``, ``value``, ``stderr``, ``ci_low``, ``ci_high``,
    ``rank``) plus ``sft_value`` (plain SFT-Shapley from all M coalitions), ``retrain_value`` (retrain-only from
    the K retrained ones) and ``correction`` (value − sft_value).
    """

    table: pd.DataFrame
    beta: float
    beta_stderr: float
    n_cheap: int  # M: coalitions with a cheap (SFT) utility
    n_retrained: int  # K: coalitions also retrained
    n_seeds: int  # retraining seeds per coalition (the most any coalition has)
    confidence: float

    def summary(self) -> dict[str, object]:
        """The scalars, for the evaluation report."""
        return {
            "beta": self.beta,
            "beta_stderr": self.beta_stderr,
            "n_cheap": self.n_cheap,
            "n_retrained": self.n_retrained,
            "n_seeds": self.n_seeds,
            "confidence": self.confidence,
        }


def multifidelity_values(
    cheap_plan: pd.DataFrame,
    cheap: pd.DataFrame,
    retrained_plan: pd.DataFrame,
    retrained: pd.DataFrame,
    *,
    contributors: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> MultiFidelityResult:
    """Multi-fidelity values (see the module docstring) from two coalition tables and their utilities.

    ``cheap_plan`` is the estimation plan (M coalitions) and ``cheap`` its SFT utilities (``coalition``,
    ``utility``; several rows per coalition allowed); ``retrained_plan`` is a prefix of it (the K coalitions the
    evaluation retrains) and ``retrained`` their utilities, one row per training seed.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must lie strictly between 0 and 1, e.g. 0.95")
    cheap, retrained = validate_utilities(cheap, "cheap utilities"), validate_utilities(retrained, "retrained")
    prefix = _check_prefix(cheap_plan, retrained_plan)
    sft_mean = cheap.groupby("coalition")["utility"].mean()
    retrain_mean = retrained.groupby("coalition")["utility"].mean()
    both = pd.DataFrame({"sft": sft_mean.reindex(prefix), "retrain": retrain_mean.reindex(prefix)}).dropna()
    if len(both) < 3:
        raise ValueError(
            f"only {len(both)} of the {len(prefix)} retrained coalitions have both a cheap and a retrained utility; "
            "the control variate's slope needs at least 3: raise evaluation.agreement_coalitions"
        )
    beta, beta_stderr = _slope(both["sft"].to_numpy(), both["retrain"].to_numpy())
    residual = retrained.assign(utility=retrained["utility"] - beta * retrained["coalition"].map(sft_mean))
    prefix_cheap = cheap[cheap["coalition"].isin(prefix)]
    try:
        part = aggregate(retrained_plan, residual, contributors=contributors, confidence=confidence)
        sft_prefix = aggregate(retrained_plan, prefix_cheap, contributors=contributors, confidence=confidence)
    except ValueError as error:
        raise ValueError(
            f"the {len(prefix)} retrained coalitions do not give Shapley values of their own ({error}); "
            "raise evaluation.agreement_coalitions"
        ) from error
    sft = aggregate(cheap_plan, cheap, contributors=contributors, confidence=confidence)
    a, b, c = (result.table.set_index("contributor") for result in (part, sft, sft_prefix))
    value = a["value"] + beta * b["value"]
    slope_term = (b["value"] - c["value"]) * beta_stderr
    z = stats.norm.ppf((1 + confidence) / 2)
    half = np.sqrt(_half(a) ** 2 + (beta * _half(b)) ** 2 + (z * slope_term) ** 2)
    stderr = np.sqrt(a["stderr"] ** 2 + (beta * b["stderr"]) ** 2 + slope_term**2)
    table = pd.DataFrame({"value": value, "stderr": stderr, "ci_low": value - half, "ci_high": value + half})
    table["rank"] = table["value"].rank(ascending=False, method="min").astype(int)
    table["sft_value"] = b["value"]
    table["retrain_value"] = a["value"] + beta * c["value"]
    table["correction"] = table["value"] - table["sft_value"]
    return MultiFidelityResult(
        table=table.rename_axis("contributor").reset_index(),
        beta=beta,
        beta_stderr=beta_stderr,
        n_cheap=len(cheap_plan),
        n_retrained=len(prefix),
        n_seeds=int(retrained.groupby("coalition").size().max()),
        confidence=confidence,
    )


def _check_prefix(cheap_plan: pd.DataFrame, retrained_plan: pd.DataFrame) -> list[str]:
    """The retrained coalitions' ids, after checking that they are the cheap plan's first rows with its members."""
    cheap_sets = member_sets(parse_coalitions(cheap_plan, source="cheap plan")[0])
    retrained_sets = member_sets(parse_coalitions(retrained_plan, source="retrained plan")[0])
    ids = list(retrained_sets)
    if ids != list(cheap_sets)[: len(ids)]:
        raise ValueError(
            "the retrained coalitions are not the first rows of the cheap plan; retrain a prefix of the estimation "
            "plan (evaluation.agreement_coalitions) so that both estimates use the same draws"
        )
    for coalition in ids:
        if set(retrained_sets[coalition]) != set(cheap_sets[coalition]):
            raise ValueError(f"coalition {coalition!r} has other members in the retrained plan than in the cheap one")
    return ids


def _slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of y on x and its standard error."""
    dx = x - x.mean()
    sxx = float(dx @ dx)
    if sxx == 0:
        raise ValueError("the cheap utilities of the retrained coalitions are all equal; no slope can be fitted")
    slope = float(dx @ (y - y.mean())) / sxx
    residual = y - y.mean() - slope * dx
    return slope, math.sqrt(float(residual @ residual) / (len(x) - 2) / sxx) if len(x) > 2 else math.nan


def _half(table: pd.DataFrame) -> pd.Series:
    """Half-width of an aggregate's interval (symmetric: value ± t·stderr)."""
    return (table["ci_high"] - table["ci_low"]) / 2
