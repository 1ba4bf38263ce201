"""Adaptive budgets: round sizes, the stopping rules on hand-made values tables, and the refused configurations."""

from __future__ import annotations

import pandas as pd
import pytest

from diffcredit import rounds


def values(value, half):
    """A values table with the given values and interval half-widths (contributors a, b, c, ...)."""
    names = [chr(ord("a") + i) for i in range(len(value))]
    table = pd.DataFrame({"contributor": names, "value": value, "stderr": [h / 2 for h in half]})
    return table.assign(ci_low=table["value"] - half, ci_high=table["value"] + half)


STOPPING = {"rule": "halfwidth", "target": 0.1, "relative": False, "round_budget": 4, "max_budget": 12}


def test_round_sizes_grow_by_the_round_budget_up_to_the_cap():
    assert rounds.round_sizes(8, 4, 16) == [8, 12, 16]
    assert rounds.round_sizes(8, 3, 12) == [8, 11, 12]  # the last round fills up to max_budget
    assert rounds.round_sizes(8, 4, 8) == [8]
    assert rounds.round_sizes(8, 4, 64, limit=10) == [8, 10]  # no more than the 2^n coalitions there are


def test_round_of_names_the_first_round_holding_a_prefix():
    assert rounds.round_of([1, 8, 9, 12, 13], [8, 12, 16]).tolist() == [0, 0, 1, 1, 2]


def test_halfwidth_stops_when_every_interval_is_narrow_enough():
    wide = rounds.decide(values([1.0, 2.0], [0.05, 0.2]), None, round=0, n_coalitions=8, rule="halfwidth", target=0.1)
    assert not wide.stop and wide.max_halfwidth == pytest.approx(0.2)
    narrow = rounds.decide(
        values([1.0, 2.0], [0.05, 0.08]), None, round=1, n_coalitions=12, rule="halfwidth", target=0.1
    )
    assert narrow.stop and "0.08 ≤ target 0.1" in narrow.reason


def test_relative_halfwidth_is_measured_against_the_largest_value():
    table = values([1.0, -4.0], [0.3, 0.3])  # 0.3 / 4 = 0.075
    assert rounds.decide(table, None, round=0, n_coalitions=8, rule="halfwidth", target=0.08, relative=True).stop
    assert not rounds.decide(table, None, round=0, n_coalitions=8, rule="halfwidth", target=0.07, relative=True).stop


def test_rank_stable_compares_with_the_previous_round():
    first = rounds.decide(
        values([3.0, 2.0, 1.0], [1, 1, 1]), None, round=0, n_coalitions=8, rule="rank_stable", target=1.0
    )
    assert not first.stop and first.rank_correlation is None
    before = values([3.0, 2.0, 1.0], [1, 1, 1])
    same = rounds.decide(
        values([30.0, 2.5, 1.0], [1, 1, 1]), before, round=1, n_coalitions=12, rule="rank_stable", target=1.0
    )
    assert same.stop and same.rank_correlation == pytest.approx(1.0)
    swapped = rounds.decide(
        values([2.0, 3.0, 1.0], [1, 1, 1]), before, round=1, n_coalitions=12, rule="rank_stable", target=0.9
    )
    assert not swapped.stop and swapped.rank_correlation == pytest.approx(0.5)


def test_the_last_round_stops_whatever_the_rule_says():
    decision = rounds.decide(
        values([1.0], [5.0]), None, round=2, n_coalitions=16, rule="halfwidth", target=0.1, last=True
    )
    assert decision.stop and decision.reason.startswith("budget spent (16 coalitions")


def test_decision_round_trips_through_its_file(tmp_path):
    decision = rounds.decide(
        values([1.0, 2.0], [0.5, 0.5]),
        values([2.0, 1.0], [0.5, 0.5]),
        round=1,
        n_coalitions=12,
        rule="rank_stable",
        target=0.5,
    )
    rounds.write_decision(decision, tmp_path / "decision.json")
    assert rounds.read_decision(tmp_path / "decision.json") == decision


def test_rounds_table_has_one_row_per_round_and_contributor():
    decisions = [
        rounds.decide(
            values([1.0, 2.0], [1.0, 1.0]), None, round=r, n_coalitions=n, rule="halfwidth", target=0.5, last=r == 1
        )
        for r, n in ((0, 8), (1, 12))
    ]
    table = rounds.rounds_table([values([1.0, 2.0], [1.0, 1.0])] * 2, decisions)
    assert table[["round", "n_coalitions", "contributor"]].values.tolist() == [
        [0, 8, "a"],
        [0, 8, "b"],
        [1, 12, "a"],
        [1, 12, "b"],
    ]
    assert table["stop"].tolist() == [False, False, True, True]


@pytest.mark.parametrize(
    ("change", "sampled", "message"),
    [
        ({"target": None}, True, "needs estimator.stopping.target"),
        ({}, False, "needs a sampled estimator"),
        ({"max_budget": 4}, True, "max_budget 4 is below estimator.budget 8"),
        ({"rule": "rank_stable", "target": 2.0}, True, "not a Spearman correlation"),
        ({"rule": "often"}, True, "'often' is unknown"),
    ],
)
def test_unusable_stopping_configs_are_refused_naming_the_key(change, sampled, message):
    with pytest.raises(ValueError, match=message):
        rounds.check_stopping({**STOPPING, **change}, sampled=sampled, budget=8)


def test_no_stopping_rule_accepts_any_estimator():
    rounds.check_stopping({**STOPPING, "rule": "none", "target": None}, sampled=False, budget=8)
