"""The estimator registry: the one place that defines each estimator DiffCredit offers.

An estimator is its name (in the plan's ``estimator`` column, ``diffcredit plan --estimator``, the config schema's
``estimator.name`` and the workflow's plan wildcard), its planner (:mod:`diffcredit.coalitions`), the sampler
columns its plans carry, its aggregation with its interval (:mod:`diffcredit.shapley`), what it values and a
description. Adding an estimator is one entry in :data:`REGISTRY`, plus its planner and aggregation functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from diffcredit import coalitions, shapley


@dataclass(frozen=True)
class Estimator:
    """One estimator: how it plans, how it aggregates, what its values and intervals are."""

    name: str
    values: str  # what the values are: "Shapley", "Banzhaf" or "leave-one-out"
    description: str  # one line, for --help, the report and the docs
    interval: str  # how the interval is made
    sampled: bool  # whether the plan takes a budget
    columns: tuple[str, ...]  # sampler columns of its plans
    planner: Callable[[list[str], int], Iterator[object]]  # (contributors, seed) -> draws for coalitions._collect
    aggregation: Callable  # (plan, membership, measured, prefix grid) -> (estimates on the prefixes, method text)


REGISTRY: dict[str, Estimator] = {
    entry.name: entry
    for entry in (
        Estimator(
            "kernelshap",
            "Shapley",
            "constrained KernelSHAP with the sampled matrix (Covert & Lee eq. 7, the paper's estimator) on paired "
            "coalitions, stratified by size with proportional allocation; complete strata are enumerated",
            "linearisation (HC2 sandwich) variance per stratum with finite-population correction, plus seed noise",
            True,
            ("pair", "stratum", "samples"),
            coalitions.kernelshap_draws,
            shapley.kernelshap_path,
        ),
        Estimator(
            "kernelshap_leverage",
            "Shapley",
            "as kernelshap, but every coalition size gets the same share of the pairs (Musco & Witter's leverage "
            "scores), reweighted by the kernel",
            "linearisation (HC2 sandwich) variance per stratum with finite-population correction, plus seed noise",
            True,
            ("pair", "stratum", "samples"),
            coalitions.leverage_draws,
            shapley.kernelshap_path,
        ),
        Estimator(
            "kernelshap_unpaired",
            "Shapley",
            "constrained KernelSHAP with the sampled matrix on single coalitions (no complements), stratified by size "
            "with proportional allocation; complete sizes are enumerated (shapiq's design): for nearly constant-sum "
            "games, where a complement adds nothing",
            "linearisation (HC2 sandwich) variance per stratum with finite-population correction, plus seed noise",
            True,
            ("draw", "stratum", "samples"),
            coalitions.kernelshap_unpaired_draws,
            shapley.kernelshap_unpaired_path,
        ),
        Estimator(
            "kernelshap_unbiased",
            "Shapley",
            "Covert & Lee's unbiased KernelSHAP (exact kernel matrix, sampled vector) on i.i.d. paired draws",
            "t-interval over draws, variances shrunk across contributors (empirical Bayes), plus shared seed noise",
            True,
            ("pair", "samples"),
            coalitions.kernelshap_iid_draws,
            shapley.kernelshap_unbiased_path,
        ),
        Estimator(
            "permutation",
            "Shapley",
            "marginal contributions over antithetic permutations (each order and its reverse), post-stratified by "
            "position: a chain end's contribution is measured once, the middle positions averaged",
            "t-interval, the middle draws' variance pooled across contributors, plus the fitted end effect's "
            "deviations and the seed noise of shared coalitions; projected onto efficiency (a null contributor stays 0)",
            True,
            ("permutation", "position", "samples"),
            coalitions.permutation_draws,
            shapley.permutation_path,
        ),
        Estimator(
            "exact",
            "Shapley",
            "exact Shapley values from all 2^n coalitions (n ≤ 16)",
            "t-interval from seed noise only",
            False,
            (),
            coalitions.exact_draws,
            shapley.exact_path,
        ),
        Estimator(
            "banzhaf",
            "Banzhaf",
            "Banzhaf values by maximum sample reuse over a uniform sample of coalitions (Wang & Jia)",
            "Welch t-interval with finite-population correction",
            True,
            ("draw",),
            coalitions.banzhaf_draws,
            shapley.banzhaf_path,
        ),
        Estimator(
            "loo",
            "leave-one-out",
            "leave-one-out: v(N) - v(N without i)",
            "t-interval from seed noise only",
            False,
            ("left_out",),
            coalitions.loo_draws,
            shapley.loo_path,
        ),
    )
}
NAMES: tuple[str, ...] = tuple(REGISTRY)
DEFAULT = "kernelshap"


def estimator_named(name: str) -> Estimator:
    """The registry entry of ``name``; raise listing the choices otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(NAMES)}") from None
