"""A finished marketplace run's values, payout and planted expectations, and its ranking under each training seed.

Usage: python benchmarks/marketplace_seeds.py results/<name> [--budget 1000]   (seconds; reads only the run folder)
Prints a Markdown table: each contributor's value with its interval and rank (the run's values.csv), its payout
share of the budget (`diffcredit.payout`), and the values when only one repeat's utilities are aggregated (the run's
`utility.repeats` training seeds per coalition, aggregated apart by the plan's estimator), then the Spearman
correlation between the repeats' values and whether the preset's expectations hold: every corrupted contributor
below every clean one, the duplicate equal to its original within their intervals.
"""

import argparse
from itertools import combinations
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

from diffcredit.coalitions import read_coalitions
from diffcredit.contributors import MARKETPLACE_DUPLICATE, marketplace_expectations
from diffcredit.payout import payout
from diffcredit.shapley import aggregate


def main(run: Path, budget: float, estimator: str = "kernelshap", mode: str = "sft") -> None:
    values = pd.read_csv(run / mode / estimator / "values.csv").set_index("contributor")
    utilities = pd.read_csv(run / mode / estimator / "utilities.tsv", sep="\t")
    plan = read_coalitions(run / "plans" / f"{estimator}.tsv")
    per_repeat = {
        repeat: aggregate(plan, rows[["coalition", "utility"]], contributors=list(values.index))
        .to_frame()
        .set_index("contributor")
        for repeat, rows in utilities.groupby("repeat")
    }
    shares = payout(values.reset_index(), budget).set_index("contributor")

    def cell(table: pd.DataFrame, name: str, interval: bool = True) -> str:
        row = table.loc[name]
        spread = f" [{row.ci_low:+.3f}, {row.ci_high:+.3f}]" if interval else ""
        return f"{row.value:+.3f}{spread} ({int(row['rank'])})"

    repeats = sorted(per_repeat)
    print(
        "| contributor | value [95% interval] (rank) | payout of "
        f"{budget:,.0f} [interval] | " + " | ".join(f"repeat {r} alone (rank)" for r in repeats) + " |"
    )
    print("| --- " * (3 + len(repeats)) + "|")
    for name in values.index:
        share = shares.loc[name]
        print(
            f"| {name} | {cell(values, name)} | {share.share:.0f} [{share.share_low:.0f}, {share.share_high:.0f}] | "
            + " | ".join(cell(per_repeat[r], name, interval=False) for r in repeats)
            + " |"
        )
    print()
    for label, table in [("all repeats", values)] + [(f"repeat {r}", per_repeat[r]) for r in repeats]:
        held = marketplace_expectations(table)
        print(
            f"{label}: every corrupted below every clean: {held['corrupted_below_clean']}; "
            f"{MARKETPLACE_DUPLICATE[0]} = {MARKETPLACE_DUPLICATE[1]} within intervals: {held['duplicate_equal']}"
        )
    for first, second in combinations(repeats, 2):
        rho = spearmanr(per_repeat[first]["value"], per_repeat[second]["value"]).statistic
        print(f"Spearman of the values, repeat {first} against repeat {second}: {rho:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--budget", type=float, default=1000.0)
    args = parser.parse_args()
    main(args.run, args.budget)
