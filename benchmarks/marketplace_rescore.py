"""Rescore a marketplace run's kept samples (`keep.samples: true`) with other properties; values with intervals.

Usage: python benchmarks/marketplace_rescore.py results/<name>   (prints a Markdown table; ~2 min on one core)
Each coalition's samples (every repeat) are scored against the run's reference folder by coverage, density,
precision and −FID, and the plan's estimator turns each property's utilities into values (`diffcredit.shapley`).
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diffcredit.coalitions import read_coalitions
from diffcredit.properties import load_property, oriented
from diffcredit.shapley import aggregate

NAMES = ("coverage", "density", "precision", "fid")


def main(run: Path, estimator: str = "kernelshap", mode: str = "sft") -> None:
    torch.set_num_threads(1)
    plan = read_coalitions(run / "plans" / f"{estimator}.tsv")
    props = {name: load_property(name, run / "reference") for name in NAMES}
    rows = []
    for coalition in plan["coalition"]:
        for path in sorted((run / mode / estimator / "kept" / coalition).glob("repeat*/samples.npz")):
            with np.load(path) as stored:
                samples = stored["samples"]
            rows.append(
                {
                    "coalition": coalition,
                    **{name: oriented(p(samples), p.higher_is_better) for name, p in props.items()},
                }
            )
    utilities = pd.DataFrame(rows)
    contributors = pd.read_csv(run / "data" / "contributors.tsv", sep="\t")["contributor"].tolist()
    tables = {}
    for name in NAMES:
        table = aggregate(
            plan,
            utilities.rename(columns={name: "utility"})[["coalition", "utility"]],
            contributors=contributors,
            convergence=False,
        ).table.set_index("contributor")
        tables[name] = table.assign(rank=table["value"].rank(ascending=False, method="min").astype(int))
    print("| contributor | " + " | ".join(f"{name} [95% CI] (rank)" for name in NAMES) + " |")
    print("| --- |" + " --- |" * len(NAMES))
    for c in contributors:
        cells = [
            f"{t.loc[c, 'value']:+.3g} [{t.loc[c, 'ci_low']:+.3g}, {t.loc[c, 'ci_high']:+.3g}] ({t.loc[c, 'rank']})"
            for t in tables.values()
        ]
        print(f"| {c} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
