"""Evaluation statistics on planted inputs: held-out subsets, LDS, counterfactual, utility agreement."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from diffcredit.evaluation import (
    counterfactual_removals,
    counterfactual_table,
    heldout_subsets,
    lds,
    random_ranking,
    utility_agreement,
)

TEN = [f"c{i}" for i in range(10)]


# --- held-out subsets ---------------------------------------------------------------------------------------------


def test_subsets_keep_round_alpha_n_sorted_members() -> None:
    assert {len(s) for s in heldout_subsets(TEN, 20, seed=1)} == {5}
    # Halves round up: 0.5 of 5 keeps 3 (Python's round() would keep 2).
    subsets = heldout_subsets(TEN[:5], 6, alpha=0.5, seed=1)
    assert {len(s) for s in subsets} == {3}
    assert all(list(s) == sorted(s) and set(s) <= set(TEN[:5]) for s in subsets)


def test_subsets_are_prefix_stable_seeded_and_independent_of_input_order() -> None:
    many = heldout_subsets(TEN, 12, seed=7)
    assert heldout_subsets(TEN, 5, seed=7) == many[:5]
    assert heldout_subsets(list(reversed(TEN)), 12, seed=7) == many
    assert heldout_subsets(TEN, 12, seed=8) != many


def test_subsets_are_distinct_until_all_are_used() -> None:
    pairs = heldout_subsets(TEN[:4], 8, alpha=0.5, seed=3)
    assert set(pairs[:6]) == set(itertools.combinations(TEN[:4], 2))
    assert set(pairs[6:]) <= set(pairs[:6])


@pytest.mark.parametrize(
    ("contributors", "alpha", "message"),
    [
        (TEN[:4], 0.1, "alpha=0.1 keeps 0 of 4"),
        (TEN[:4], 0.9, "alpha=0.9 keeps 4 of 4"),
        (["a", "b", "a"], 0.5, "contributor 'a' appears more than once"),
        (["a", "b/c"], 0.5, "invalid contributor id 'b/c'"),
    ],
)
def test_subsets_refuse_bad_input(contributors: list[str], alpha: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        heldout_subsets(contributors, 3, alpha=alpha, seed=0)


# --- LDS ----------------------------------------------------------------------------------------------------------


def _planted(n_seeds: int = 3, noise: float = 0.0, seed: int = 0) -> tuple[pd.Series, list, np.ndarray]:
    """Scores, 30 held-out subsets, and a property = sum of true scores (+ per-run noise), one column per seed."""
    rng = np.random.default_rng(seed)
    scores = pd.Series(rng.normal(size=10), index=TEN)
    subsets = heldout_subsets(TEN, 30, seed=seed)
    truth = np.array([scores[list(s)].sum() for s in subsets])
    return scores, subsets, truth[:, None] + noise * rng.normal(size=(len(subsets), n_seeds))


def test_lds_is_one_for_monotone_and_minus_one_for_reversed_scores() -> None:
    scores, subsets, truth = _planted()
    # Per-seed offsets and a monotone (nonlinear) transform leave every rank correlation at exactly 1.
    measured = np.exp(truth) + np.array([0.0, 1.0, 2.0])
    result = lds(scores, subsets, measured)
    assert result.value == pytest.approx(1.0)
    assert result.per_seed == pytest.approx((1.0, 1.0, 1.0))
    assert (result.ci_low, result.ci_high) == pytest.approx((1.0, 1.0))
    assert (result.n_subsets, result.n_seeds, result.n_missing) == (30, 3, 0)
    reversed_ = lds(-scores, subsets, measured)
    assert reversed_.value == pytest.approx(-1.0)
    assert reversed_.per_seed == pytest.approx((-1.0, -1.0, -1.0))


def test_lds_per_seed_values_and_their_mean() -> None:
    scores, subsets, truth = _planted(n_seeds=1)
    measured = np.column_stack([truth[:, 0], -truth[:, 0]])
    result = lds(scores, subsets, measured)
    assert result.per_seed == pytest.approx((1.0, -1.0))
    assert result.per_seed_mean == pytest.approx(0.0)


def test_lds_leaves_out_missing_runs_and_reports_them() -> None:
    scores, subsets, measured = _planted(noise=0.5)
    holed = measured.copy()
    holed[4, :] = np.nan  # a subset whose every run failed
    holed[7, 1] = np.nan
    result = lds(scores, subsets, holed)
    assert (result.n_subsets, result.n_missing) == (29, 4)
    keep = [row for row in range(30) if row != 4]
    mean = np.nanmean(holed[keep], axis=1)
    predicted = [scores[list(subsets[row])].sum() for row in keep]
    assert result.value == pytest.approx(stats.spearmanr(predicted, mean).statistic)
    assert result.per_seed[1] == pytest.approx(
        stats.spearmanr([p for p, row in zip(predicted, keep) if row != 7], np.delete(holed[keep, 1], 6)).statistic
    )


def test_lds_interval_widens_with_seed_noise() -> None:
    widths = []
    for noise in (0.2, 1.0, 3.0):
        result = lds(*_planted(noise=noise))
        assert result.ci_low <= result.value <= result.ci_high
        widths.append(result.ci_high - result.ci_low)
    assert widths[0] < widths[1] < widths[2]


def test_lds_interval_covers_the_population_value() -> None:
    # Single-member subsets make Σ score a normal variable x; measured = x + noise, so the seed mean is bivariate
    # normal with x, whose Spearman correlation is (6/π)·asin(ρ/2).
    names = [f"p{i}" for i in range(40)]
    noise, n_seeds = 2.3, 3
    rho = 1 / math.sqrt(1 + noise**2 / n_seeds)
    truth = 6 / math.pi * math.asin(rho / 2)
    rng = np.random.default_rng(11)
    covered = []
    for rep in range(200):
        x = rng.normal(size=len(names))
        measured = x[:, None] + noise * rng.normal(size=(len(names), n_seeds))
        result = lds(pd.Series(x, index=names), [[n] for n in names], measured, n_bootstrap=400, seed=rep)
        covered.append(result.ci_low <= truth <= result.ci_high)
    assert 0.88 <= np.mean(covered) <= 0.99


@pytest.mark.parametrize(
    ("scores", "subsets", "message"),
    [
        (pd.Series([1.0, 2.0], index=["a", "b"]), [["a"], ["b"], ["a", "x"]], "subset 2 contains contributor 'x'"),
        (pd.Series([1.0, np.nan], index=["a", "b"]), [["a"], ["b"], ["a"]], "contributor 'b' has score nan"),
        (pd.Series([1.0, 2.0], index=["a", "b"]), [["a"], "ab", ["b"]], "subset 1 is the string 'ab'"),
        (pd.Series([1.0, 2.0], index=["a", "b"]), [["a"], ["b", "b"], ["b"]], "subset 1 lists contributor 'b' twice"),
    ],
)
def test_lds_names_the_offending_contributor(scores: pd.Series, subsets: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lds(scores, subsets, np.ones((3, 2)))


def test_lds_matches_integer_score_ids_to_string_members() -> None:
    # pd.read_csv turns ids like "7" into integers; ids are strings by contract, so both name the same contributor.
    scores = pd.Series([1.0, 2.0, 3.0], index=[7, 8, 9])
    assert lds(scores, [["7"], ["8"], ["9"]], np.array([1.0, 2.0, 3.0])).value == pytest.approx(1.0)


def test_lds_refuses_misaligned_measurements() -> None:
    scores, subsets, measured = _planted()
    with pytest.raises(ValueError, match=r"shape \(29, 3\) but there are 30 subsets"):
        lds(scores, subsets, measured[:29])


def test_lds_result_is_strict_json() -> None:
    scores, subsets, truth = _planted(n_seeds=1)
    measured = np.column_stack([truth[:, 0], np.full(30, np.nan)])  # the second seed never ran
    payload = lds(scores, subsets, measured).to_dict()
    assert payload["per_seed"] == [pytest.approx(1.0), None]
    assert json.loads(json.dumps(payload, allow_nan=False))["n_missing"] == 30


# --- counterfactual -----------------------------------------------------------------------------------------------


def test_removals_pick_the_planted_top_contributors_best_first() -> None:
    scores = pd.Series(np.arange(10.0), index=TEN)
    assert counterfactual_removals(scores) == ("c9", "c8", "c7", "c6")
    assert counterfactual_removals(scores, fraction=0.01) == ("c9",)


def test_removals_break_ties_by_id() -> None:
    scores = pd.Series([1.0, 5.0, 5.0, 5.0, 0.0], index=["e", "d", "b", "c", "a"])
    assert counterfactual_removals(scores, fraction=0.4) == ("b", "c")


def test_removals_must_leave_someone_to_train_on() -> None:
    with pytest.raises(ValueError, match="fraction=0.9 removes 3 of 3 contributors"):
        counterfactual_removals(pd.Series([1.0, 2.0, 3.0], index=["a", "b", "c"]), fraction=0.9)


def test_random_ranking_is_a_seeded_permutation() -> None:
    ranking = random_ranking(TEN, seed=5)
    assert sorted(ranking) == list(range(1, 11))
    pd.testing.assert_series_equal(random_ranking(list(reversed(TEN)), seed=5), ranking)
    assert not random_ranking(TEN, seed=6).equals(ranking)


def test_counterfactual_table_exact_small_case() -> None:
    table = counterfactual_table(np.array([10.0, 12.0]), {"shapley": np.array([8.0, 9.0, np.nan]), "random": [11.0]})
    assert list(table.index) == ["full", "shapley", "random"]
    half = stats.t.ppf(0.975, 1) * math.sqrt(2) / math.sqrt(2)
    assert table.loc["full", ["ci_low", "ci_high"]].tolist() == pytest.approx([11 - half, 11 + half])
    shapley = table.loc["shapley"]
    assert shapley["n_seeds"] == 2
    assert (shapley["mean"], shapley["change"], shapley["change_pct"]) == pytest.approx((8.5, -2.5, -2.5 / 11 * 100))
    assert np.isnan(table.loc["random", ["std", "ci_low", "ci_high"]].astype(float)).all()
    assert table.loc["random", "change_pct"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("removed", "message"),
    [({"full": [1.0]}, "rename the ranking called 'full'"), ({"loo": [np.nan]}, "'loo': no finite measurement")],
)
def test_counterfactual_table_refuses_bad_rankings(removed: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        counterfactual_table(np.array([1.0, 2.0]), removed)


# --- utility agreement --------------------------------------------------------------------------------------------


def _coalitions(per_size: int) -> pd.Series:
    sizes = np.repeat(np.arange(1, 10), per_size)
    return pd.Series(sizes, index=[f"k{i:04d}" for i in range(len(sizes))])


def test_size_alone_correlates_overall_but_not_once_size_is_removed() -> None:
    rng = np.random.default_rng(0)
    sizes = _coalitions(30)
    retrain = pd.DataFrame(np.log(sizes.to_numpy())[:, None] + 0.1 * rng.normal(size=(len(sizes), 3)), sizes.index)
    approx = pd.Series(np.sqrt(sizes.to_numpy()) + 0.1 * rng.normal(size=len(sizes)), sizes.index)
    result = utility_agreement(approx, retrain, sizes)
    assert result["spearman"] > 0.9
    assert abs(result["spearman_size_removed"]) < 0.2
    assert result["n_size_removed"] == len(sizes)


def test_saturating_size_effect_leaks_into_partial_but_not_within_size() -> None:
    # Why `spearman_size_removed` is the within-size mean: a rank-linear fit cannot remove a saturating size trend.
    rng = np.random.default_rng(0)
    sizes = _coalitions(60)
    saturating = 1 - np.exp(-sizes.to_numpy())
    retrain = pd.DataFrame(saturating[:, None] + 0.03 * rng.normal(size=(len(sizes), 3)), sizes.index)
    approx = pd.Series(saturating + 0.03 * rng.normal(size=len(sizes)), sizes.index)
    result = utility_agreement(approx, retrain, sizes)
    assert abs(result["spearman_size_removed"]) < 0.1
    assert result["spearman_partial_size"] > 0.2


def test_planted_within_size_signal_survives_size_removal() -> None:
    rng = np.random.default_rng(1)
    sizes = _coalitions(10)
    signal = rng.normal(size=len(sizes))
    retrain = pd.DataFrame(
        (sizes.to_numpy() + signal)[:, None] + 0.05 * rng.normal(size=(len(sizes), 3)), sizes.index
    )
    approx = pd.Series(2 * sizes.to_numpy() + signal, sizes.index)
    result = utility_agreement(approx, retrain, sizes)
    assert result["spearman_size_removed"] > 0.95
    assert result["spearman_partial_size"] > 0.9


def test_agreement_exact_small_case() -> None:
    index = ["a", "b", "c", "d"]
    retrain = pd.DataFrame([[1.0, 3.0], [2.0, 2.0], [4.0, np.nan], [np.nan, np.nan]], index=index)
    approx = pd.Series([5.0, 5.0, 9.0, 0.0, 99.0], index=[*index, "unused"])  # = 2 * seed mean + 1
    sizes = pd.Series([1, 1, 1, 2, 3], index=[*index, "unused"])
    result = utility_agreement(approx, retrain, sizes)
    assert result["pearson"] == pytest.approx(1.0)
    assert result["spearman"] == pytest.approx(1.0)
    # Seed means 2, 2, 4 tie within the one size group, as do their approximations, so the rank correlation is 1.
    assert (result["spearman_size_removed"], result["n_size_removed"]) == (pytest.approx(1.0), 3)
    assert result["retrain_seed_cv"] == pytest.approx((math.sqrt(2) / 2 + 0.0) / 2)
    assert (result["n_coalitions"], result["n_seeds"], result["n_missing"]) == (3, 2, 3)


def test_agreement_without_groups_of_three_reports_nan() -> None:
    retrain = pd.DataFrame([[1.0], [2.0], [3.0]], index=["a", "b", "c"])
    result = utility_agreement(retrain[0], retrain, pd.Series([1, 2, 3], index=["a", "b", "c"]))
    assert math.isnan(result["spearman_size_removed"]) and result["n_size_removed"] == 0
    assert math.isnan(result["retrain_seed_cv"])


@pytest.mark.parametrize(
    ("approx", "sizes", "message"),
    [
        ([1.0, np.nan, 3.0], [1, 2, 3], "coalition 'b' has retrain utilities but no finite value in approx"),
        ([1.0, 2.0, 3.0], [1, 2], "coalition 'c' has retrain utilities but no finite value in sizes"),
    ],
)
def test_agreement_names_the_offending_coalition(approx: list, sizes: list, message: str) -> None:
    index = ["a", "b", "c"]
    retrain = pd.DataFrame([[1.0], [2.0], [3.0]], index=index)
    with pytest.raises(ValueError, match=message):
        utility_agreement(pd.Series(approx, index=index), retrain, pd.Series(sizes, index=index[: len(sizes)]))


def test_agreement_refuses_a_repeated_coalition() -> None:
    retrain = pd.DataFrame([[1.0], [2.0], [3.0]], index=["a", "b", "c"])
    sizes = pd.Series([1, 2, 3, 3], index=["a", "b", "c", "c"])
    with pytest.raises(ValueError, match="coalition 'c' appears more than once in sizes"):
        utility_agreement(retrain[0], retrain, sizes)


def test_job_overhead_counts_only_what_each_job_measured(tmp_path) -> None:
    from diffcredit.fidelity import job_overhead

    def job(name: str, wall: float, seconds: list[float], fresh: list[bool]) -> None:
        bench, table = tmp_path / "benchmarks" / "sft" / "kernelshap", tmp_path / "sft" / "kernelshap" / "batches"
        bench.mkdir(parents=True, exist_ok=True)
        table.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"s": [wall]}).to_csv(bench / f"{name}.tsv", sep="\t", index=False)
        pd.DataFrame({"seconds": seconds, "fresh": fresh}).to_csv(table / f"{name}.tsv", sep="\t", index=False)

    job("b00000", 110.0, [60.0, 40.0], [True, True])  # measured everything: 10 s of overhead
    job("b00001", 60.0, [20.0, 50.0], [False, True])  # resumed: only the 50 s it measured count, 10 s overhead
    job("b00002", 4.0, [30.0], [False])  # all stored: a rerun's overhead, left out
    assert job_overhead(tmp_path / "benchmarks") == pytest.approx(20 / 150)
