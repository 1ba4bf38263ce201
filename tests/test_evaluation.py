"""Evaluation on planted inputs: held-out subsets, LDS, budget curve, multi-fidelity values, counterfactual,
utility agreement, job costs."""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats
from workflow_files import ROOT, workflow_copy

from diffcredit import coalitions
from diffcredit.coalitions import member_sets
from diffcredit.evaluation import (
    alphas,
    budget_curve,
    counterfactual_removals,
    counterfactual_table,
    heldout_subsets,
    lds,
    random_ranking,
    subset_size,
    utility_agreement,
)
from diffcredit.multifidelity import multifidelity_values

TEN = [f"c{i}" for i in range(10)]


# --- held-out subsets ---------------------------------------------------------------------------------------------


def test_subsets_keep_int_alpha_n_sorted_members() -> None:
    assert {len(s) for s in heldout_subsets(TEN, 20, seed=1)} == {5}
    # int(alpha * n) as in the paper: 0.5 of 5 keeps 2, 0.25 of 10 keeps 2, and 0.29 of 100 keeps 29 (not 28).
    subsets = heldout_subsets(TEN[:5], 6, alpha=0.5, seed=1)
    assert {len(s) for s in subsets} == {2}
    assert all(list(s) == sorted(s) and set(s) <= set(TEN[:5]) for s in subsets)
    assert (subset_size(0.25, 10), subset_size(0.29, 100)) == (2, 29)


def test_subsets_are_prefix_stable_seeded_and_independent_of_input_order() -> None:
    many = heldout_subsets(TEN, 12, seed=7)
    assert heldout_subsets(TEN, 5, seed=7) == many[:5]
    assert heldout_subsets(list(reversed(TEN)), 12, seed=7) == many
    assert heldout_subsets(TEN, 12, seed=8) != many


def test_an_alpha_list_gives_one_block_per_alpha_each_prefix_stable() -> None:
    both = heldout_subsets(TEN, 6, alpha=[0.25, 0.75], seed=3)
    assert [len(s) for s in both] == [2] * 6 + [7] * 6
    # Each alpha has its own stream: its subsets do not depend on the other alphas or on their count.
    assert both[:6] == heldout_subsets(TEN, 6, alpha=0.25, seed=3)
    assert both[6:] == heldout_subsets(TEN, 6, alpha=[0.75], seed=3)
    assert heldout_subsets(TEN, 9, alpha=[0.5, 0.75], seed=3)[9:15] == both[6:]
    assert alphas(0.5) == (0.5,) and alphas([0.25, 0.5]) == (0.25, 0.5)


def test_subsets_are_distinct_until_all_are_used() -> None:
    pairs = heldout_subsets(TEN[:4], 8, alpha=0.5, seed=3)
    assert set(pairs[:6]) == set(itertools.combinations(TEN[:4], 2))
    assert set(pairs[6:]) <= set(pairs[:6])


@pytest.mark.parametrize(
    ("contributors", "alpha", "message"),
    [
        (TEN[:4], 0.1, "alpha=0.1 keeps 0 of 4"),
        (TEN[:4], [0.5, 0.6], "alpha=0.6 and alpha=0.5 both keep 2 of 4 contributors"),
        (TEN[:4], [], r"alpha=\[\]: give at least one share"),
        (TEN[:4], [0.5, 1.0], "alpha=1.0: the share of contributors kept must lie strictly between 0 and 1"),
        (["a", "b", "a"], 0.5, "contributor 'a' appears more than once"),
        (["a", "b/c"], 0.5, "invalid contributor id 'b/c'"),
    ],
)
def test_subsets_refuse_bad_input(contributors: list[str], alpha, message: str) -> None:
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


def test_lds_is_one_for_planted_linear_scores_and_minus_one_for_reversed() -> None:
    scores, subsets, truth = _planted()
    # Per-seed offsets and a monotone (nonlinear) transform leave every rank correlation at exactly 1.
    measured = np.exp(truth) + np.array([0.0, 1.0, 2.0])
    result = lds(scores, subsets, measured)
    assert (result.value, result.seed_averaged) == pytest.approx((1.0, 1.0))
    assert result.per_seed == pytest.approx((1.0, 1.0, 1.0))
    for low, high in ((result.ci_low, result.ci_high), (result.bootstrap_low, result.bootstrap_high)):
        assert (low, high) == pytest.approx((1.0, 1.0))
    assert (result.n_subsets, result.n_seeds, result.n_missing) == (30, 3, 0)
    reversed_ = lds(-scores, subsets, measured)
    assert (reversed_.value, reversed_.seed_averaged) == pytest.approx((-1.0, -1.0))
    assert reversed_.per_seed == pytest.approx((-1.0, -1.0, -1.0))


def test_lds_is_the_papers_per_seed_definition_on_hand_made_inputs() -> None:
    # Five subsets of three contributors, three seeds whose measurements rank the subsets differently.
    scores = pd.Series([3.0, -1.0, 0.5, 2.0], index=["a", "b", "c", "d"])
    subsets = [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("a", "d")]
    measured = np.array([[1.0, 2.0, 0.5], [2.0, 1.0, 3.0], [0.0, 0.5, 0.1], [3.0, 2.5, 1.0], [4.0, 0.0, 2.0]])
    predicted = [2.0, 3.5, 1.0, 2.5, 5.0]
    per_seed = [stats.spearmanr(predicted, measured[:, j]).statistic for j in range(3)]
    result = lds(scores, subsets, measured)
    assert result.per_seed == pytest.approx(per_seed)
    assert result.value == pytest.approx(np.mean(per_seed))
    # The authors' interval: 1.96 * np.std (ddof 0) over the seeds / sqrt(seeds).
    half = 1.959964 * np.std(per_seed) / math.sqrt(3)
    assert (result.ci_low, result.ci_high) == pytest.approx((np.mean(per_seed) - half, np.mean(per_seed) + half))
    assert result.seed_averaged == pytest.approx(stats.spearmanr(predicted, measured.mean(axis=1)).statistic)
    assert result.value < result.seed_averaged  # averaging the seeds first is a different, higher number here


def test_lds_leaves_out_missing_runs_and_reports_them() -> None:
    scores, subsets, measured = _planted(noise=0.5)
    holed = measured.copy()
    holed[4, :] = np.nan  # a subset whose every run failed
    holed[7, 1] = np.nan
    result = lds(scores, subsets, holed)
    assert (result.n_subsets, result.n_missing) == (29, 4)
    keep = [row for row in range(30) if row != 4]
    predicted = np.array([scores[list(subsets[row])].sum() for row in keep])
    column = holed[keep, 1]
    ok = np.isfinite(column)
    assert result.per_seed[1] == pytest.approx(stats.spearmanr(predicted[ok], column[ok]).statistic)
    assert result.value == pytest.approx(
        np.mean(
            [
                stats.spearmanr(predicted, holed[keep, 0]).statistic,
                result.per_seed[1],
                stats.spearmanr(predicted, holed[keep, 2]).statistic,
            ]
        )
    )
    assert result.seed_averaged == pytest.approx(stats.spearmanr(predicted, np.nanmean(holed[keep], axis=1)).statistic)


def test_lds_intervals_widen_with_seed_noise() -> None:
    widths = []
    for noise in (0.2, 1.0, 3.0):
        result = lds(*_planted(noise=noise))
        assert result.bootstrap_low <= result.value <= result.bootstrap_high
        assert result.seed_averaged_low <= result.seed_averaged <= result.seed_averaged_high
        widths.append(result.bootstrap_high - result.bootstrap_low)
    assert widths[0] < widths[1] < widths[2]


def test_lds_bootstrap_covers_the_population_value() -> None:
    # Single-member subsets make Σ score a normal variable x; each seed measures x + noise, bivariate normal with x,
    # whose Spearman correlation is (6/π)·asin(ρ/2) with ρ = 1/sqrt(1 + noise²): the per-seed LDS's population value.
    names = [f"p{i}" for i in range(40)]
    noise, n_seeds = 1.5, 3
    truth = 6 / math.pi * math.asin(1 / math.sqrt(1 + noise**2) / 2)
    rng = np.random.default_rng(11)
    covered = []
    for rep in range(120):
        x = rng.normal(size=len(names))
        measured = x[:, None] + noise * rng.normal(size=(len(names), n_seeds))
        result = lds(pd.Series(x, index=names), [[n] for n in names], measured, n_bootstrap=400, seed=rep)
        covered.append(result.bootstrap_low <= truth <= result.bootstrap_high)
    assert 0.88 <= np.mean(covered) <= 0.99


def test_lds_with_one_seed_has_no_interval_over_seeds() -> None:
    scores, subsets, measured = _planted(n_seeds=1, noise=0.5)
    result = lds(scores, subsets, measured[:, 0])
    assert result.value == pytest.approx(result.seed_averaged)
    assert math.isnan(result.ci_low) and math.isnan(result.ci_high)
    assert math.isfinite(result.bootstrap_low)


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
    assert payload["value"] == pytest.approx(1.0) and payload["ci_low"] is None  # one seed: no interval over seeds
    assert json.loads(json.dumps(payload, allow_nan=False))["n_missing"] == 30


def _additive_plan(n: int = 8, budget: int = 64, seed: int = 0, estimator: str = "kernelshap"):
    """A plan over n contributors with their member sets, and planted additive weights."""
    names = [f"p{i}" for i in range(n)]
    plan = coalitions.plan(names, estimator, budget, seed)
    return names, plan, member_sets(plan), np.random.default_rng(seed).normal(1.0, 0.5, n)


def test_budget_curve_prices_each_prefix_and_ends_at_the_whole_plan() -> None:
    names, plan, sets, w = _additive_plan(estimator="permutation")
    weight = pd.Series(w, index=names)
    utilities = pd.DataFrame(
        {"coalition": list(sets), "utility": [weight[list(m)].sum() for m in sets.values()], "seconds": 2.0}
    )
    subsets = heldout_subsets(names, 12, seed=1)
    measured = np.array([[weight[list(s)].sum()] * 2 for s in subsets])
    curve = budget_curve(plan, utilities, subsets=subsets, measured=measured, contributors=names, setup_seconds=100)
    assert curve["budget"].is_monotonic_increasing and curve["budget"].iloc[-1] == len(plan)
    assert curve["seconds"].tolist() == pytest.approx((100 + 2.0 * curve["budget"]).tolist())
    # Permutation values of an additive game are its weights once a prefix has two permutations: every LDS is 1.
    assert curve["lds"].to_numpy() == pytest.approx(1.0)


# --- multi-fidelity values -----------------------------------------------------------------------------------------


def _retrained_rows(sets: dict, prefix: list[str], utility, rng, seeds: int = 3, noise: float = 0.2) -> pd.DataFrame:
    rows = [(c, j, utility(sets[c]) + (noise * rng.normal() if sets[c] else 0.0)) for c in prefix for j in range(seeds)]
    return pd.DataFrame(rows, columns=["coalition", "repeat", "utility"])


def test_multifidelity_of_an_affine_cheap_utility_is_the_rescaled_cheap_estimate() -> None:
    # u_sft = 2 + 0.5 * u_retrain exactly: the slope is 2, the residual game is constant, its values are zero, and
    # the multi-fidelity values are the cheap values rescaled to the retraining game's units.
    names, plan, sets, w = _additive_plan(estimator="permutation")
    weight = pd.Series(w, index=names)
    truth = {c: weight[list(m)].sum() for c, m in sets.items()}
    cheap = pd.DataFrame({"coalition": list(truth), "utility": [2 + 0.5 * u for u in truth.values()]})
    prefix = list(sets)[:32]  # two antithetic permutation pairs
    retrained = pd.DataFrame(
        [(c, j, truth[c]) for c in prefix for j in range(2)], columns=["coalition", "repeat", "utility"]
    )
    result = multifidelity_values(plan, cheap, plan.head(32), retrained, contributors=names)
    assert result.beta == pytest.approx(2.0) and result.beta_stderr == pytest.approx(0.0, abs=1e-9)
    table = result.table.set_index("contributor").loc[names]
    assert table["value"].to_numpy() == pytest.approx(2 * table["sft_value"].to_numpy())
    assert table["value"].to_numpy() == pytest.approx(w)  # additive: permutation sampling is exact
    assert (result.n_cheap, result.n_retrained, result.n_seeds) == (64, 32, 2)


def test_multifidelity_beats_biased_sft_and_its_interval_covers_the_retraining_values() -> None:
    # Retraining game: additive + pairwise terms (exact Shapley values known); the cheap utility is the same game
    # plus a smooth bias (a size term and a second additive game) plus noise; retrains have seed noise.
    n, budget, prefix_size = 8, 64, 24
    errors, covered = {"mf": [], "sft": []}, []
    for rep in range(60):
        rng = np.random.default_rng(rep)
        names, plan, sets, w = _additive_plan(n, budget, seed=rep)
        q, a = np.triu(rng.normal(0, 0.2, (n, n)), 1), rng.normal(0, 1, n)
        phi = w + 0.5 * (q.sum(axis=0) + q.sum(axis=1))

        def game(members, names=names, w=w, q=q):
            z = np.isin(names, members)
            return w @ z + z @ q @ z

        def bias(members, names=names, a=a):
            z = np.isin(names, members)
            return 0.3 * a @ z + 0.5 * z.sum() ** 2 / n

        cheap = pd.DataFrame(
            {"coalition": list(sets), "utility": [game(m) + bias(m) + 0.05 * rng.normal() for m in sets.values()]}
        )
        prefix = list(sets)[:prefix_size]
        result = multifidelity_values(
            plan, cheap, plan.head(prefix_size), _retrained_rows(sets, prefix, game, rng), contributors=names
        )
        table = result.table.set_index("contributor").loc[names]
        errors["mf"].append(np.sqrt(np.mean((table["value"] - phi) ** 2)))
        errors["sft"].append(np.sqrt(np.mean((table["sft_value"] - phi) ** 2)))
        covered.append(np.mean((table["ci_low"] <= phi) & (phi <= table["ci_high"])))
    assert np.mean(errors["mf"]) < 0.8 * np.mean(errors["sft"])
    assert 0.89 <= np.mean(covered) <= 0.99


def test_multifidelity_needs_a_prefix_of_the_cheap_plan() -> None:
    names, plan, sets, _ = _additive_plan()
    cheap = pd.DataFrame({"coalition": list(sets), "utility": np.arange(len(sets), dtype=float)})
    later = plan.iloc[[0, 1, 4, 5, 2, 3]]
    retrained = pd.DataFrame({"coalition": later["coalition"], "utility": 1.0})
    with pytest.raises(ValueError, match="not the first rows of the cheap plan"):
        multifidelity_values(plan, cheap, later, retrained, contributors=names)
    with pytest.raises(ValueError, match=r"raise evaluation\.agreement_coalitions"):
        multifidelity_values(plan, cheap, plan.head(2), retrained.head(2), contributors=names)


# --- counterfactual -----------------------------------------------------------------------------------------------


def test_removals_pick_the_planted_top_contributors_best_first() -> None:
    scores = pd.Series(np.arange(10.0), index=TEN)
    assert counterfactual_removals(scores) == ("c9", "c8", "c7", "c6")
    assert counterfactual_removals(scores, fraction=0.01) == ("c9",)


def test_removals_break_ties_by_id() -> None:
    scores = pd.Series([1.0, 5.0, 5.0, 5.0, 0.0], index=["e", "d", "b", "c", "a"])
    assert counterfactual_removals(scores, fraction=0.4) == ("b", "c")


def test_removals_must_leave_someone_to_train_on() -> None:
    with pytest.raises(ValueError, match=r"fraction=0\.9 removes 3 of 3 contributors"):
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
    # The change's interval pairs seed s of a ranking with seed s of the baseline: differences -2 and -3.
    paired = stats.t.ppf(0.975, 1) * math.sqrt(0.5) / math.sqrt(2)
    assert shapley[["change_low", "change_high"]].tolist() == pytest.approx([-2.5 - paired, -2.5 + paired])
    assert table.loc["full", ["change_low", "change_high"]].tolist() == [0.0, 0.0]
    assert np.isnan(table.loc["random", ["change_low", "change_high"]].astype(float)).all()  # one pair only


def test_counterfactual_assembles_each_rankings_own_runs_in_their_order(tmp_path) -> None:
    from diffcredit.fidelity import counterfactual

    runs = {
        "full": ([10.0, 12.0], ""),
        "shapley": ([8.0, 9.0], "c1,c2"),
        "random": ([11.0, 11.0], "c2,c0"),
    }
    paths = []
    for name, (utilities, removed) in runs.items():  # as counterfactual_runs writes them, one file per job
        paths.append(tmp_path / f"{name}.tsv")
        rows = pd.DataFrame({"ranking": name, "repeat": [0, 1], "utility": utilities, "removed": removed})
        rows.to_csv(paths[-1], sep="\t", index=False)
    table = counterfactual(runs=[str(path) for path in paths], out=str(tmp_path / "counterfactual.tsv"))
    assert list(table.index) == ["full", "shapley", "random"]
    assert table.loc["shapley", "change"] == pytest.approx(-2.5) and table.loc["random", "change"] == pytest.approx(0)
    assert table.loc["shapley", "removed"] == "c1,c2" and pd.isna(table.loc["full", "removed"])
    written = pd.read_csv(tmp_path / "counterfactual.tsv", sep="\t").set_index("ranking")
    pd.testing.assert_frame_equal(written, table, check_names=False)


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
    retrain = pd.DataFrame((sizes.to_numpy() + signal)[:, None] + 0.05 * rng.normal(size=(len(sizes), 3)), sizes.index)
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


def test_job_costs_sum_wall_time_with_stored_coalitions_and_take_the_peak_memory(tmp_path) -> None:
    from diffcredit.fidelity import job_costs

    bench = tmp_path / "benchmarks"
    (bench / "sft" / "kernelshap").mkdir(parents=True)
    (tmp_path / "sft" / "kernelshap" / "batches").mkdir(parents=True)
    (bench / "baselines").mkdir()
    for path, wall, rss in (
        (bench / "sft" / "kernelshap" / "b00000.tsv", 50.0, 300.5),
        (bench / "sft" / "kernelshap" / "aggregate.tsv", 2.0, 120.0),
        (bench / "baselines" / "dtrak.tsv", 30.0, "-"),
    ):
        pd.DataFrame({"s": [wall], "max_rss": [rss]}).to_csv(path, sep="\t", index=False)
    # The batch found one coalition stored (measured by another plan's job in 25 s): it counts at its cost.
    pd.DataFrame({"seconds": [20.0, 25.0], "fresh": [True, False]}).to_csv(
        tmp_path / "sft" / "kernelshap" / "batches" / "b00000.tsv", sep="\t", index=False
    )
    assert job_costs(bench, ["sft/kernelshap/**/*.tsv"]) == {"wall_seconds": 77.0, "peak_rss_mb": 300.5, "n_jobs": 2}
    assert job_costs(bench, ["baselines/dtrak.tsv"]) == {"wall_seconds": 30.0, "peak_rss_mb": None, "n_jobs": 1}
    assert job_costs(bench, ["baselines/inrun.tsv"]) == {"wall_seconds": None, "peak_rss_mb": None, "n_jobs": 0}


# --- `snakemake evaluate` on the tiny config ----------------------------------------------------------------------

TINY = ROOT / "tests" / "configs" / "tiny.yaml"
# Two alphas (one LDS each) and enough retrained coalitions for multi-fidelity values of their own (two pairs).
EVALUATE = {
    "evaluation": {"alpha": [0.25, 0.5], "agreement_coalitions": 6, "baselines": ["dtrak", "pixel_similarity_mean"]}
}


def _evaluate(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    overlay = workdir / "evaluate.yaml"
    overlay.write_text(yaml.safe_dump(EVALUATE))
    command = [sys.executable, "-m", "snakemake", "evaluate", "--cores", "2", "--configfile", str(TINY), str(overlay)]
    result = subprocess.run([*command, *args], cwd=workdir, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def test_evaluate_dry_run_plans_multifidelity_values_and_the_report(tmp_path) -> None:
    output = _evaluate(workflow_copy(tmp_path), "-n").stdout
    for rule in ("multifidelity", "counterfactual", "evaluation_report", "evaluate"):
        assert re.search(rf"^{rule}\s+1$", output, re.MULTILINE), f"{rule} is not planned once:\n{output[-3000:]}"
    # the baseline, the 7 rankings and the random control retrain in jobs of their own
    assert re.search(r"^counterfactual_runs\s+9$", output, re.MULTILINE), output[-3000:]


@pytest.mark.slow
def test_evaluate_reports_every_method_per_alpha_with_costs_and_the_budget_comparison(tmp_path) -> None:
    workdir = workflow_copy(tmp_path)
    _evaluate(workdir)
    out = workdir / "results" / "tiny" / "evaluation"
    report = json.loads((out / "report.json").read_text())
    rankings = [
        "sft_shapley",
        "finetune_shapley",
        "loo",
        "banzhaf",
        "multifidelity_shapley",
        "dtrak",
        "pixel_similarity_mean",
    ]
    reported = [*rankings, "retrain_shapley"]  # the report's own, from the retrained agreement coalitions
    assert report["lds_alpha"] == 0.5 and set(report["lds_by_alpha"]) == {"0.25", "0.5"}
    for name in reported:
        row = report["lds"][name]
        assert report[f"lds_{name}"] == row["value"]  # the headline is the paper's per-seed LDS
        assert report[f"lds_seed_averaged_{name}"] == row["seed_averaged"]
        assert row["value"] == pytest.approx(np.mean([rho for rho in row["per_seed"] if rho is not None]))
    table = pd.read_csv(out / "lds.tsv", sep="\t")
    assert sorted(table.groupby("alpha")["n_subsets"].first().items()) == [(0.25, 4), (0.5, 4)]
    methods = pd.read_csv(out / "methods.tsv", sep="\t").set_index("ranking")
    assert set(methods.index) == set(reported)
    everyone = pd.read_csv(workdir / "results" / "tiny" / "data" / "contributors.tsv", sep="\t")["contributor"]
    for name in reported:  # each ranking's value, interval where it has one, and rank, for every contributor
        rows = pd.DataFrame(report["contributors"][name]).set_index("contributor")
        assert sorted(rows.index) == sorted(everyone) and rows["rank"].min() == 1
        assert (rows["rank"] == rows["value"].rank(ascending=False, method="min")).all()
    retrained = pd.DataFrame(report["contributors"]["retrain_shapley"])
    assert (retrained["ci_low"] <= retrained["value"]).all() and (retrained["value"] <= retrained["ci_high"]).all()
    assert (methods["wall_seconds"] > 0).all() and (methods["peak_rss_mb"] > 0).all()
    curve = pd.read_csv(out / "budget.tsv", sep="\t")
    assert set(curve["mode"]) == {"sft", "finetune", "retrain", "multifidelity"}
    assert curve.groupby(["alpha", "mode"])["seconds"].is_monotonic_increasing.all()
    mf = report["multifidelity"]
    assert (mf["n_retrained"], mf["n_seeds"]) == (6, 2) and np.isfinite(mf["beta"])
    # one retraining job per counterfactual row: the baseline, every ranking, the random control
    counterfactual = pd.read_csv(out / "counterfactual.tsv", sep="\t").set_index("ranking")
    assert counterfactual.index[0] == "full" and counterfactual.index[-1] == "random"
    assert sorted(counterfactual.index[1:-1]) == sorted(rankings)
    assert (counterfactual["n_seeds"] == 2).all() and counterfactual["removed"].iloc[1:].str.len().gt(0).all()
    assert (counterfactual["change_low"] <= counterfactual["change"]).all()
    assert (counterfactual["change"] <= counterfactual["change_high"]).all()
    assert len(list((out / "counterfactual").glob("*.tsv"))) == len(counterfactual)
    for figure in ("methods.png", "budget.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
