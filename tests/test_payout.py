"""Payout: shares of a budget by the documented rule, their intervals, statements with evidence, the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm, t
from test_provenance import references  # noqa: F401  (the prepared trusted and held-out reference folders)

from diffcredit.cli import main
from diffcredit.payout import NOT_STATED, RULE, metadata, payout, statement_text, statements, unallocated
from diffcredit.properties import reference_provenance
from diffcredit.shapley import ValuationResult

Z = norm.ppf(0.975)


def values(rows: list[tuple], df: float | list[float] = np.inf) -> pd.DataFrame:
    """A values table as the estimators write it: (contributor, value, stderr) rows, 95% t-intervals of `df`."""
    names, value, stderr = zip(*rows, strict=True)
    return ValuationResult.from_estimates(names, value, stderr, df, estimator="hand", method="hand-made").to_frame()


HAND = values(
    [
        ("a", 6.0, 0.0),  # positive: [6, 6]
        ("b", 2.0, 3.0 / Z),  # uncertain, [-1, 5]: paid by its estimate
        ("c", -3.0, 2.0 / Z),  # harmful: [-5, -1], below zero
        ("d", -0.5, 1.5 / Z),  # not positive: [-2, 1]
    ]
)


def test_shares_sum_to_the_budget_and_follow_the_rule():
    shares = payout(HAND, 100.0).set_index("contributor")
    np.testing.assert_allclose(shares[["ci_low", "ci_high"]].to_numpy(), [[6, 6], [-1, 5], [-5, -1], [-2, 1]])
    assert shares["share"].to_dict() == {"a": 75.0, "b": 25.0, "c": 0.0, "d": 0.0}
    assert shares["share"].sum() == pytest.approx(100.0) and unallocated(shares, 100.0) == pytest.approx(0.0)
    assert shares["status"].to_dict() == {"a": "positive", "b": "uncertain", "c": "harmful", "d": "not positive"}
    assert shares["rank"].to_dict() == {"a": 1, "b": 2, "c": 4, "d": 3}
    assert shares["fraction"].to_dict() == {"a": 0.75, "b": 0.25, "c": 0.0, "d": 0.0}
    assert shares.loc["b", "share_low"] < 25.0 < shares.loc["b", "share_high"] and shares.loc["d", "share_high"] > 0
    # Exact values (stderr 0, intervals of no width) are not drawn: the intervals collapse onto the shares.
    exact = payout(values([("a", 6.0, 0.0), ("b", 2.0, 0.0), ("c", -3.0, 0.0)]), 100.0)
    np.testing.assert_array_equal(exact["share_low"], exact["share"])
    np.testing.assert_array_equal(exact["share_high"], exact["share"])
    assert exact["share"].tolist() == [75.0, 25.0, 0.0]


def test_a_harmful_value_stays_at_zero_even_when_draws_are_positive():
    table = values([("good", 1.0, 0.1), ("bad", -0.3, 0.15)])  # bad: [-0.594, -0.006], 2% of its draws above 0
    shares = payout(table, 10.0, draws=2000).set_index("contributor")
    assert shares.loc["bad", "status"] == "harmful"
    assert shares.loc["bad", ["share", "share_low", "share_high"]].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(shares.loc["good", ["share", "share_low", "share_high"]].tolist(), 10.0, rtol=1e-12)


@pytest.mark.parametrize("df", [np.inf, 3.0])
def test_a_share_interval_is_the_share_at_the_ends_of_the_values_own_interval(df):
    # a is exact at 1, b has a t-interval of df (normal at df = inf): share_b = 100 b / (1 + b) is increasing in b,
    # so its interval is that function at the ends of b's stated interval, and a's share is the rest of the budget.
    table = values([("a", 1.0, 0.0), ("b", 2.0, 0.5)], df=df)
    low, high = table.set_index("contributor").loc["b", ["ci_low", "ci_high"]]
    assert (low, high) == pytest.approx(2 + 0.5 * t.ppf([0.025, 0.975], df))
    shares = payout(table, 100.0, draws=200_000, seed=3).set_index("contributor")
    assert shares.loc["b", "share"] == pytest.approx(200 / 3)
    assert shares.loc["b", "share_low"] == pytest.approx(100 * low / (1 + low), rel=0.005)
    assert shares.loc["b", "share_high"] == pytest.approx(100 * high / (1 + high), rel=0.005)
    assert shares.loc["a", "share_low"] == pytest.approx(100 - shares.loc["b", "share_high"], abs=1e-6)
    assert shares.loc["a", "share_high"] == pytest.approx(100 - shares.loc["b", "share_low"], abs=1e-6)
    again = payout(table, 100.0, draws=200_000, seed=3)
    assert again["share_low"].tolist() == shares["share_low"].tolist()  # seeded


def test_without_df_a_share_interval_is_the_share_at_the_ends_of_the_stated_interval():
    # No df (add-one-in's, the multi-fidelity values): the draws span the stated interval itself, whatever the stderr.
    table = pd.DataFrame(
        {
            "contributor": ["a", "b"],
            "value": [1.0, 2.0],
            "stderr": [0.0, 0.1],
            "ci_low": [1.0, 1.0],
            "ci_high": [1.0, 3.0],
        }
    )
    shares = payout(table, 100.0, draws=200_000, seed=3).set_index("contributor")
    assert shares.loc["b", ["share_low", "share_high"]].tolist() == pytest.approx([50.0, 75.0], rel=0.005)
    ninety = payout(table, 100.0, level=0.9, draws=200_000, seed=3).set_index("contributor")  # a 90% interval
    assert ninety.loc["b", "share_low"] < 0.99 * shares.loc["b", "share_low"]  # wider draws: a wider 95% share range
    with pytest.raises(ValueError, match=r"'b' has the interval \[1, 4\] around 2"):
        payout(table.assign(ci_high=[1.0, 4.0]), 100.0)


def test_the_share_interval_widens_as_the_values_df_shrinks():
    widths = []
    for df in (np.inf, 30.0, 5.0, 2.0):  # the same stderr: fewer degrees of freedom, a wider stated interval
        table = values([("a", 1.0, 0.2), ("b", 2.0, 0.3)], df=df)
        shares = payout(table, 100.0, draws=50_000, seed=1).set_index("contributor")
        assert shares["share"].sum() == pytest.approx(100.0)
        widths.append(shares.loc["b", "share_high"] - shares.loc["b", "share_low"])
    assert all(narrow < wide for narrow, wide in itertools.pairwise(widths)), widths
    assert widths[-1] > 1.5 * widths[0]  # t(2)'s 97.5% point is 4.30 against the normal's 1.96


def test_no_positive_value_pays_no_one_and_leaves_the_budget_unallocated():
    table = values([("x", -1.0, 0.0), ("y", 0.0, 0.0)])
    shares = payout(table, 50.0)
    assert shares["share"].tolist() == [0.0, 0.0]
    assert unallocated(shares, 50.0) == 50.0


NINETY = HAND.assign(  # d's interval at the 90% level, the others at 95%
    ci_low=[6.0, -1.0, -5.0, -0.5 - norm.ppf(0.95) * 1.5 / Z], ci_high=[6.0, 5.0, -1.0, -0.5 + norm.ppf(0.95) * 1.5 / Z]
)


@pytest.mark.parametrize(
    ("table", "budget", "message"),
    [
        (HAND.drop(columns="stderr"), 1.0, r"lacks column\(s\) \['stderr'\]"),
        (HAND, 0.0, "positive amount"),
        (HAND.assign(value=[1.0, np.nan, 0.0, 0.0]), 1.0, "'b' has no finite value"),
        (pd.concat([HAND, HAND.head(1)]), 1.0, "'a' appears twice"),
        (HAND.assign(stderr=[-1.0, 0, 0, 0]), 1.0, "stderr is negative"),
        (HAND.assign(df=[np.inf, 0.0, np.inf, np.inf]), 1.0, "a df is not positive"),
        (HAND.assign(ci_high=[6.0, 6.0, -1.0, 1.0]), 1.0, r"'b' has the interval \[-1, 6\] around 2"),
        (HAND.assign(ci_low=[5.0, -1.0, -5.0, -2.0]), 1.0, r"'a' has the interval \[5, 6\] around 6, stderr 0"),
        (NINETY, 1.0, r"different levels \('d': 0.900, '[bc]': 0.950\)"),
    ],
)
def test_bad_values_are_refused(table, budget, message):
    with pytest.raises(ValueError, match=message):
        payout(table, budget)


def test_statements_show_value_rank_share_and_the_evidence_coalitions():
    shares = payout(HAND, 100.0)
    plan = pd.DataFrame({"coalition": ["c0", "c1", "c2", "c3"], "members": ["", "a", "a,b", "b,c,d"]})
    utilities = pd.DataFrame({"coalition": ["c0", "c1", "c1", "c2", "c3"], "utility": [0.0, 4.0, 6.0, 9.0, 1.0]})
    stated = statements(shares, coalitions=plan, utilities=utilities, budget=100.0)
    a = stated["a"]
    assert (a["rank"], a["of"], a["share"], a["status"], a["rule"]) == (1, 4, 75.0, "positive", RULE)
    assert a["evidence"]["coalitions_with"] == [
        {"coalition": "c1", "size": 1, "utility": 5.0, "measurements": 2},
        {"coalition": "c2", "size": 2, "utility": 9.0, "measurements": 1},
    ]
    assert a["evidence"]["mean_utility_with"] == 7.0 and a["evidence"]["mean_utility_without"] == 0.5
    text = statement_text(stated["c"])
    assert "# Statement for c" in text and "status: harmful" in text and "| c3 | 3 | 1 | 1 |" in text
    assert "evidence" not in statements(shares)["a"]


def test_cli_writes_shares_and_one_statement_per_contributor(tmp_path):
    HAND.to_csv(tmp_path / "values.csv", index=False)
    status = main(
        [
            "payout",
            "--values",
            str(tmp_path / "values.csv"),
            "--budget",
            "1000",
            "--out",
            str(tmp_path / "payout.csv"),
            "--statements",
            str(tmp_path / "statements"),
        ]
    )
    assert status == 0
    written = pd.read_csv(tmp_path / "payout.csv")
    assert written["share"].sum() == pytest.approx(1000.0)
    assert sorted(p.name for p in (tmp_path / "statements").iterdir()) == [
        "a.md",
        "b.md",
        "c.md",
        "d.md",
        "statements.json",
    ]
    assert json.loads((tmp_path / "statements" / "statements.json").read_text())["b"]["share"] == 250.0


def test_cli_statements_carry_the_evidence_of_a_plan_and_its_utilities(tmp_path):
    HAND.to_csv(tmp_path / "values.csv", index=False)
    pd.DataFrame({"coalition": ["c0", "c1", "c2"], "members": ["", "a", "a,b"]}).to_csv(
        tmp_path / "plan.tsv", sep="\t", index=False
    )
    pd.DataFrame({"coalition": ["c0", "c1", "c2"], "utility": [0.0, 4.0, 9.0]}).to_csv(
        tmp_path / "utilities.tsv", sep="\t", index=False
    )
    args = [
        "payout",
        "--values",
        str(tmp_path / "values.csv"),
        "--budget",
        "10",
        "--out",
        str(tmp_path / "p.csv"),
        "--statements",
        str(tmp_path / "s"),
        "--coalitions",
        str(tmp_path / "plan.tsv"),
    ]
    with pytest.raises(SystemExit):  # evidence needs both files
        main(args)
    assert main([*args, "--utilities", str(tmp_path / "utilities.tsv")]) == 0
    text = (tmp_path / "s" / "a.md").read_text()
    assert "the 2 measured coalitions with you" in text and "Mean utility with you 6.5, without you 0" in text


def test_statements_and_the_table_metadata_name_the_yardstick_or_say_it_is_not_stated(references):  # noqa: F811
    shares = payout(HAND, 100.0)
    trusted = reference_provenance(references["trusted"])
    stated = statements(shares, yardstick=trusted)
    assert all(s["yardstick"] == trusted for s in stated.values())
    assert "- yardstick: Properties are measured against a trusted reference" in statement_text(stated["a"])
    assert "data.reference = source npz, path buyer.npz" in statement_text(stated["a"])
    about = metadata(shares, 100.0, confidence=0.95, yardstick=trusted)
    assert about["yardstick"] == trusted and about["yardstick_statement"] == trusted["statement"]
    plain = statements(shares)["a"]
    assert plain["yardstick"] is None and f"- yardstick: {NOT_STATED}" in statement_text(plain)
    assert metadata(shares, 100.0, confidence=0.95)["yardstick_statement"] == NOT_STATED


@pytest.mark.parametrize("kind", ["trusted", "heldout", None])
def test_cli_names_the_yardstick_of_the_reference_folder(references, kind, tmp_path, capsys):  # noqa: F811
    HAND.to_csv(tmp_path / "values.csv", index=False)
    args = ["payout", "--values", str(tmp_path / "values.csv"), "--budget", "10", "--out", str(tmp_path / "p.csv")]
    args += ["--statements", str(tmp_path / "s")]
    assert main(args if kind is None else [*args, "--reference", str(references[kind])]) == 0
    provenance = None if kind is None else reference_provenance(references[kind])
    sentence = NOT_STATED if kind is None else provenance["statement"]
    stated = json.loads((tmp_path / "s" / "statements.json").read_text())
    assert [s["yardstick"] for s in stated.values()] == [provenance] * 4
    assert f"- yardstick: {sentence}\n" in (tmp_path / "s" / "c.md").read_text()
    about = json.loads((tmp_path / "p.json").read_text())  # the shares table's metadata, beside it
    assert (about["yardstick"], about["yardstick_statement"], about["budget"]) == (provenance, sentence, 10.0)
    assert f"yardstick: {sentence}" in capsys.readouterr().out
    if kind == "heldout":
        assert sentence.startswith("Warning: the contributors shape their own yardstick")
    if kind == "trusted":
        assert provenance["reference_digest"][:12] in sentence and "buyer.npz" in sentence


def test_cli_refuses_a_folder_that_is_no_reference(tmp_path, capsys):
    HAND.to_csv(tmp_path / "values.csv", index=False)
    args = ["payout", "--values", str(tmp_path / "values.csv"), "--budget", "10", "--out", str(tmp_path / "p.csv")]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--reference", str(tmp_path)])
    assert exit_.value.code == 2 and "reference.json' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


NORMAL_90 = pd.DataFrame(  # no df; b's interval is a 90% one (values.json says so)
    {"contributor": ["a", "b"], "value": [1.0, 2.0], "stderr": [0.0, 0.1], "ci_low": [1.0, 1.0], "ci_high": [1.0, 3.0]}
)


def test_cli_reads_the_values_level_from_their_json_or_from_confidence(tmp_path, capsys):
    NORMAL_90.to_csv(tmp_path / "values.csv", index=False)
    args = ["payout", "--values", str(tmp_path / "values.csv"), "--budget", "100", "--out", str(tmp_path / "p.csv")]
    ninety = payout(NORMAL_90, 100.0, confidence=0.9, level=0.9)
    assert not np.allclose(payout(NORMAL_90, 100.0)["share_low"], ninety["share_low"])  # the level matters

    def written() -> pd.DataFrame:
        return pd.read_csv(tmp_path / "p.csv")[["share", "share_low", "share_high"]]

    assert main([*args, "--confidence", "0.9"]) == 0  # no values.json: --confidence is the values' level
    pd.testing.assert_frame_equal(written(), ninety[["share", "share_low", "share_high"]])
    (tmp_path / "values.json").write_text(json.dumps({"estimator": "hand", "confidence": 0.9}))
    (tmp_path / "p.csv").unlink()
    assert main(args) == 0  # values.json's level, for the values' and the share intervals
    pd.testing.assert_frame_equal(written(), ninety[["share", "share_low", "share_high"]])
    assert json.loads((tmp_path / "p.json").read_text())["confidence"] == 0.9
    assert main([*args, "--confidence", "0.9"]) == 0  # agreeing is fine
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--confidence", "0.95"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "confidence 0.95 differs from the values' own level 0.9" in error and "values.json" in error
