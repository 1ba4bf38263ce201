"""Coalition planning: exact tables, prefix stability, the samplers' distributions, and refusals that name the row."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from diffcredit.coalitions import (
    kernel_mass,
    member_sets,
    parse_coalitions,
    parse_plan,
    plan,
    read_coalitions,
    read_contributors,
    stratum_pairs,
    write_coalitions,
)
from diffcredit.estimators import DEFAULT
from diffcredit.estimators import NAMES as ESTIMATORS

PLAYERS = [f"p{i}" for i in range(6)]
SAMPLED = ("permutation", "kernelshap", "kernelshap_leverage", "kernelshap_unpaired", "kernelshap_unbiased", "banzhaf")


def sizes(table: pd.DataFrame) -> np.ndarray:
    return np.array([len(m) for m in member_sets(table).values()])


def draws(table: pd.DataFrame) -> list[list[str]]:
    """The samples column as lists of coalition ids, in plan order."""
    return [s.split(",") for cell in table["samples"] for s in cell.split(";") if s]


def test_exact_plan_is_every_coalition_in_bit_mask_order():
    table = plan(["a", "b", "c"], "exact", None, seed=0)
    assert table["coalition"].tolist() == [f"c00000{i}" for i in range(8)]
    assert table["members"].tolist() == ["", "a", "b", "a,b", "c", "a,c", "b,c", "a,b,c"]
    assert set(table["estimator"]) == {"exact"}


def test_exact_refuses_many_contributors_and_suggests_a_sampled_estimator():
    with pytest.raises(ValueError, match=r"2\^17 coalitions.*--estimator kernelshap"):
        plan([f"p{i}" for i in range(17)], "exact", None, seed=0)


def test_loo_plan_is_the_grand_coalition_and_each_one_left_out():
    table = plan(["a", "b", "c"], "loo", budget=99, seed=5)
    assert table["members"].tolist() == ["a,b,c", "b,c", "a,c", "a,b"]
    assert table["left_out"].tolist() == ["", "a", "b", "c"]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_raising_the_budget_only_appends_rows(estimator):
    players = [f"p{i}" for i in range(9)]
    large = plan(players, estimator, 300, seed=7)
    for budget in (1, 2, 3, 17, 150):
        small = plan(players, estimator, budget, seed=7)
        if estimator in ("exact", "loo"):
            pd.testing.assert_frame_equal(small, large)
        else:
            assert len(small) == budget
            pd.testing.assert_frame_equal(small, large.head(budget))


@pytest.mark.parametrize("estimator", SAMPLED)
def test_plans_depend_on_the_seed_only(estimator):
    first = plan(PLAYERS, estimator, 40, seed=1)
    pd.testing.assert_frame_equal(first, plan(PLAYERS, estimator, 40, seed=1))
    assert first["members"].tolist() != plan(PLAYERS, estimator, 40, seed=2)["members"].tolist()


@pytest.mark.parametrize("estimator", SAMPLED)
def test_sampled_plans_list_distinct_coalitions(estimator):
    table = plan(PLAYERS, estimator, 50, seed=3)
    assert len({frozenset(m) for m in member_sets(table).values()}) == 50
    parse_plan(table)  # the aggregator's checks accept it


def test_a_budget_of_every_coalition_plans_each_once():
    table = plan(PLAYERS[:4], "kernelshap", 16, seed=0)
    assert sorted(map(frozenset, member_sets(table).values()), key=sorted) == sorted(
        (frozenset(c) for r in range(5) for c in itertools.combinations(PLAYERS[:4], r)), key=sorted
    )
    with pytest.raises(ValueError, match=r"budget 17 exceeds the 2\^4 = 16.*--estimator exact"):
        plan(PLAYERS[:4], "kernelshap", 17, seed=0)


def test_kernelshap_pairs_complements_after_the_empty_and_grand_coalition():
    table = plan(PLAYERS, "kernelshap", 60, seed=4)
    assert table["members"][0] == "" and table["members"][1] == ",".join(PLAYERS)
    sets = member_sets(table)
    for left, right in draws(table):
        assert set(sets[left]).isdisjoint(sets[right]) and len(sets[left]) + len(sets[right]) == len(PLAYERS)


def test_unbiased_kernelshap_sizes_follow_the_shapley_kernel():
    n = 10
    table = plan([f"p{i}" for i in range(n)], "kernelshap_unbiased", 1000, seed=0)
    sets = member_sets(table)
    drawn = np.array([len(sets[left]) for left, _ in draws(table)])
    s = np.arange(1, n)
    expected = (1 / (s * (n - s))) / (1 / (s * (n - s))).sum()
    observed = np.bincount(drawn, minlength=n)[1:] / len(drawn)
    assert len(drawn) > 450
    np.testing.assert_allclose(observed, expected, atol=0.03)


def stratum_counts(table: pd.DataFrame, n: int) -> np.ndarray:
    sets = member_sets(table)
    sizes = [min(len(sets[left]), n - len(sets[left])) for left, _ in draws(table)]
    return np.bincount(sizes, minlength=n // 2 + 1)[1:]


def test_kernelshap_allocates_pairs_to_strata_in_proportion_to_the_kernel():
    n = 10
    players = [f"p{i}" for i in range(n)]
    mass = kernel_mass(n)  # strata {1, 9}, {2, 8}, {3, 7}, {4, 6}, {5}
    np.testing.assert_allclose(mass.sum(), 1)
    np.testing.assert_allclose(mass[0] / mass[1], (1 / 9) / (1 / 16))
    np.testing.assert_array_equal(stratum_pairs(n), [10, 45, 120, 210, 126])
    table = plan(players, "kernelshap", 2 + 2 * 20, seed=0)
    counts = stratum_counts(table, n)
    assert counts.sum() == 20
    # the allocation of 20 pairs by largest w_k / (count_k + 1): within one pair of the proportional share
    assert (np.abs(counts - 20 * mass) <= 1).all(), counts
    # with 40 pairs the first stratum is full (10 pairs) and the others share the rest in proportion
    counts = stratum_counts(plan(players, "kernelshap", 2 + 2 * 40, seed=0), n)
    assert counts[0] == 10 and (np.abs(counts[1:] - 30 * mass[1:] / mass[1:].sum()) <= 1).all(), counts
    np.testing.assert_array_equal(table["stratum"][2::2].dropna().astype(int), table["stratum"][3::2].astype(int))


def test_kernelshap_enumerates_the_strata_it_fills_and_never_repeats_a_pair():
    n = 10
    players = [f"p{i}" for i in range(n)]
    table = plan(players, "kernelshap", 2 + 2 * 150, seed=3)
    counts = stratum_counts(table, n)
    assert counts[0] == 10 and counts[1] == 45  # sizes 1 and 9, 2 and 8: every pair, so those strata are exact
    assert (counts[2:] < stratum_pairs(n)[2:]).all()
    assert len({frozenset(m) for m in member_sets(table).values()}) == len(table)
    # at the half size each pair {S, N∖S} is one pair, whichever side is listed first
    halves = plan(players[:6], "kernelshap", 64, seed=1)
    assert stratum_counts(halves, 6).tolist() == [6, 15, 10]
    assert len({frozenset(m) for m in member_sets(halves).values()}) == 64


def test_kernelshap_leverage_gives_every_size_the_same_share():
    n = 12
    table = plan([f"p{i}" for i in range(n)], "kernelshap_leverage", 2 + 2 * 66, seed=0)
    counts = stratum_counts(table, n)  # strata 1–5 hold two sizes each, stratum 6 one: 12 : … : 12 : 6 pairs
    np.testing.assert_array_equal(counts, [12, 12, 12, 12, 12, 6])


def test_kernelshap_unpaired_fills_the_highest_kernel_sizes_first():
    # each next coalition goes to the size s with the largest mass/(count + 1), mass ∝ 1/(s(n − s)): sizes 1 and
    # n − 1 (1/7 each at n = 8) are complete (the border trick) by 42 coalitions, when sizes 2 and 6 (1/12) hold 6
    # and sizes 3-5 (1/15, 1/16) 4 each; a complete size takes no more
    n = 8
    sizes = {}
    for budget in (18, 42, 120):
        table = plan([f"p{i}" for i in range(n)], "kernelshap_unpaired", budget, seed=0)
        members = list(member_sets(table).values())
        assert len({frozenset(m) for m in members}) == budget
        assert table["stratum"][2:].astype(int).tolist() == [len(m) for m in members[2:]]
        sizes[budget] = np.bincount([len(m) for m in members], minlength=n + 1)
    np.testing.assert_array_equal(sizes[18], [1, 4, 2, 2, 1, 1, 2, 4, 1])
    np.testing.assert_array_equal(sizes[42], [1, 8, 6, 4, 4, 4, 6, 8, 1])
    assert sizes[120][1] == sizes[120][7] == 8 and sizes[120][2] > sizes[120][4]


def test_large_strata_are_sampled_without_replacement():
    players = [f"p{i}" for i in range(40)]  # C(40, k) pairs are far too many to enumerate beyond k = 3
    table = plan(players, "kernelshap", 3000, seed=2)
    assert len({frozenset(m) for m in member_sets(table).values()}) == 3000
    counts = stratum_counts(table, 40)
    assert counts[0] == 40 and counts.sum() == 1499 and (counts > 0).sum() > 10


def test_permutation_samples_are_antithetic_chains_adding_one_contributor_each():
    n = len(PLAYERS)
    table = plan(PLAYERS, "permutation", 40, seed=2)
    sets = member_sets(table)
    row = {c: r for r, c in enumerate(table["coalition"])}
    samples = draws(table)
    assert len(samples) >= 2
    for sample in samples:
        assert len(sample) == 2 * (n + 1)
        forward, backward = sample[: n + 1], sample[n + 1 :]
        for chain in (forward, backward):
            assert [len(sets[c]) for c in chain] == list(range(n + 1))
            assert all(set(sets[a]) < set(sets[b]) for a, b in itertools.pairwise(chain))
        added = [(set(sets[b]) - set(sets[a])).pop() for a, b in itertools.pairwise(forward)]
        again = [(set(sets[b]) - set(sets[a])).pop() for a, b in itertools.pairwise(backward)]
        assert again == added[::-1]  # the second chain is the reversed order
    completed = [
        row[c]
        for cell_row, cell in enumerate(table["samples"])
        for s in cell.split(";")
        if s
        for c in s.split(",")
        if row[c] > cell_row
    ]
    assert completed == []  # a sample only names coalitions planned at or before its row


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_the_empty_and_grand_coalition_are_measured_twice_by_default(estimator):
    table = plan(PLAYERS, estimator, 30, seed=1)
    sizes_ = sizes(table)
    bound = (sizes_ == 0) | (sizes_ == len(PLAYERS)) | (np.arange(len(table)) < 2)
    np.testing.assert_array_equal(table["repeats"].astype(int), np.where(bound, 2, 1))
    once = plan(PLAYERS, estimator, 30, seed=1, bound_repeats=1)
    assert (once["repeats"] == 1).all()
    pd.testing.assert_frame_equal(once.drop(columns="repeats"), table.drop(columns="repeats"))
    with pytest.raises(ValueError, match="bound_repeats must be a positive number"):
        plan(PLAYERS, estimator, 30, seed=1, bound_repeats=0)


@pytest.mark.parametrize("estimator", ["kernelshap", "permutation", "exact"])
def test_a_null_without_seed_noise_is_measured_once_and_its_repeat_goes_to_the_grand_coalition(estimator):
    noisy = plan(PLAYERS, estimator, 30, seed=1)
    table = plan(PLAYERS, estimator, 30, seed=1, null_has_noise=False)
    sizes_ = sizes(table)
    expected = np.where(sizes_ == 0, 1, np.where(sizes_ == len(PLAYERS), 3, noisy["repeats"].astype(int)))
    np.testing.assert_array_equal(table["repeats"].astype(int), expected)
    assert table["repeats"].sum() == noisy["repeats"].sum()  # the same measurements, N's noise on 2 df instead of 1
    pd.testing.assert_frame_equal(table.drop(columns="repeats"), noisy.drop(columns="repeats"))
    if estimator != "exact":  # prefix-stable: a larger budget keeps every row, repeats included
        larger = plan(PLAYERS, estimator, 60, seed=1, null_has_noise=False)
        pd.testing.assert_frame_equal(larger.head(len(table)), table)


def test_the_workflows_plans_pass_the_familys_null_on():
    from diffcredit.stages import plan_table

    spec = {"contributors": PLAYERS, "seed": 1, "budget": 30, "main_estimator": "kernelshap", "lds_subsets": 4}
    spec |= {"alpha": 0.5, "agreement_coalitions": 6, "null_has_noise": False}
    for name in ("kernelshap", "agreement"):
        table = plan_table(plan=name, **spec)
        assert table["repeats"].head(2).astype(int).tolist() == [1, 3]  # rows 0 and 1: ∅ and N


def test_the_schema_offers_the_registry_estimators():
    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml").read_text())
    name = schema["properties"]["estimator"]["properties"]["name"]
    assert name["enum"] == list(ESTIMATORS)
    assert name["default"] == DEFAULT


def test_banzhaf_draws_each_contributor_with_probability_one_half():
    players = [f"p{i}" for i in range(12)]
    table = plan(players, "banzhaf", 2000, seed=0)
    share = np.mean([[p in m for p in players] for m in member_sets(table).values()], axis=0)
    np.testing.assert_allclose(share, 0.5, atol=0.03)
    assert table["draw"].is_monotonic_increasing


@pytest.mark.parametrize("budget", [0, -3, 2.5, None, True])
def test_sampled_estimators_refuse_a_bad_budget(budget):
    with pytest.raises(ValueError, match="budget must be a positive number of coalitions"):
        plan(PLAYERS, "banzhaf", budget, seed=0)


@pytest.mark.parametrize(
    ("contributors", "message"),
    [
        (["a", "b/c"], r"invalid contributor id 'b/c' \(contributor 2\)"),
        (["a", "b c"], r"invalid contributor id 'b c' \(contributor 2\)"),
        (["a..b"], r"invalid contributor id 'a\.\.b'.*may not contain '\.\.'"),
        (["a", "b", "a"], r"duplicate contributor 'a' at row 3"),
        ([], "no contributors"),
    ],
)
def test_plan_refuses_bad_contributors(contributors, message):
    with pytest.raises(ValueError, match=message):
        plan(contributors, "loo", None, seed=0)


def test_plan_refuses_unknown_estimators_and_options():
    with pytest.raises(ValueError, match="unknown estimator 'tmc'; choose one of kernelshap, kernelshap_leverage"):
        plan(PLAYERS, "tmc", 10, seed=0)
    with pytest.raises(TypeError, match="paired"):
        plan(PLAYERS, "kernelshap", 10, seed=0, paired=False)


def test_contributors_file(tmp_path: Path):
    path = tmp_path / "contributors.tsv"
    path.write_text("contributor\tn_items\nbob\t3\nalice\t5\n")
    assert read_contributors(path) == ["bob", "alice"]
    path.write_text("contributor\nbob\nx/../y\n")
    with pytest.raises(ValueError, match=r"invalid contributor id 'x/\.\./y' \(.*contributors.tsv row 2\)"):
        read_contributors(path)
    path.write_text("name\nbob\n")
    with pytest.raises(ValueError, match="no 'contributor' column"):
        read_contributors(path)
    path.write_text("")
    with pytest.raises(ValueError, match="empty file"):
        read_contributors(path)
    path.write_text("contributor\n")
    with pytest.raises(ValueError, match="no rows under the header"):
        read_contributors(path)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_written_plans_read_back_to_the_same_coalitions(tmp_path: Path, estimator):
    table = plan(PLAYERS, estimator, 30, seed=1)
    write_coalitions(table, tmp_path / "plan.tsv")
    back = read_coalitions(tmp_path / "plan.tsv", contributors=PLAYERS)
    assert member_sets(back) == member_sets(table)
    pd.testing.assert_frame_equal(back, table.astype(object).fillna("").astype(str))
    assert [p.name for p in tmp_path.iterdir()] == ["plan.tsv"]  # no temporary file left behind


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path):
    path = tmp_path / "plan.tsv"
    write_coalitions(plan(PLAYERS, "loo", None, seed=0), path)
    before = path.read_text()

    class Broken(pd.DataFrame):
        def to_csv(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_coalitions(Broken({"coalition": ["c000000"]}), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.tsv"]


def table_of(*members: str, ids: list[str] | None = None, **columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"coalition": ids or [f"c{i:06d}" for i in range(len(members))], "members": members, **columns})


@pytest.mark.parametrize(
    ("table", "contributors", "message"),
    [
        (
            table_of("a", "a,zed"),
            ["a", "b"],
            r"coalitions row 2, coalition c000001: unknown contributor 'zed'; it is not in the contributors file",
        ),
        (
            table_of("a", "b", ids=["c000001", "c000001"]),
            None,
            r"row 2: duplicate coalition id 'c000001' \(also row 1\)",
        ),
        (table_of("a", "b", ids=["c000000", "../c1"]), None, r"row 2: invalid coalition id '\.\./c1'"),
        (table_of("a", "a,b/c"), None, r"invalid contributor id 'b/c' \(coalitions row 2, coalition c000001\)"),
        (table_of("a", "a, b"), None, r"invalid contributor id ' b' \(coalitions row 2"),
        (table_of("a", "a..b"), None, r"invalid contributor id 'a\.\.b' \(coalitions row 2"),
        (table_of("a", "b,a,b"), None, r"row 2: coalition c000001 lists 'b' twice"),
        (table_of("a", "a,,b"), None, r"invalid contributor id '' \(coalitions row 2"),
        (pd.DataFrame({"coalition": ["c000000"]}), None, r"missing column\(s\) \['members'\]"),
        (table_of(), None, "no coalitions"),
        (table_of("a"), ["a", "b", "a"], "duplicate contributor 'a' at row 3"),
    ],
)
def test_bad_coalition_tables_are_refused_naming_the_row(table, contributors, message):
    with pytest.raises(ValueError, match=message):
        parse_coalitions(table, contributors)


def test_other_coalition_tables_may_repeat_member_sets_but_plans_may_not():
    lds = table_of("a,b", "b", "a,b", ids=["s000000", "s000001", "s000002"], estimator=["lds"] * 3)
    assert member_sets(parse_coalitions(lds)[0]) == {"s000000": ("a", "b"), "s000001": ("b",), "s000002": ("a", "b")}
    with pytest.raises(ValueError, match="must hold one of kernelshap, kernelshap_leverage"):
        parse_plan(lds)
    repeated = table_of("a,b", "b", "b,a", estimator=["banzhaf"] * 3, draw=["0", "1", "2"])
    with pytest.raises(ValueError, match=r"row 3: coalition c000002 has the same members as c000000 \(row 1\)"):
        parse_plan(repeated)
    with pytest.raises(ValueError, match="the kernelshap plan needs a 'pair' column"):
        parse_plan(table_of("", "a,b", estimator=["kernelshap"] * 2))
    with pytest.raises(ValueError, match="no 'estimator' column"):
        parse_plan(table_of("", "a"))


def test_membership_follows_the_contributors_order():
    table = plan(PLAYERS, "banzhaf", 20, seed=0)
    assert "p0,p1,p2,p3,p4,p5" not in set(table["members"])  # no grand coalition: the order is merged from rows
    _, names, matrix = parse_coalitions(table)
    assert names == PLAYERS
    expected = np.array([[p in m for p in PLAYERS] for m in member_sets(table).values()])
    np.testing.assert_array_equal(matrix.toarray(), expected)
    _, names, matrix = parse_coalitions(table, contributors=[*PLAYERS[::-1], "extra"])
    np.testing.assert_array_equal(matrix.toarray(), np.column_stack([expected[:, ::-1], np.zeros(20, bool)]))
