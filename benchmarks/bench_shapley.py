"""Benchmark of planning and aggregation at the design point (1,000 contributors), KernelSHAP, intervals included.

Run: ``.venv/bin/python benchmarks/bench_shapley.py``. Prints the figures and writes them into the section
"## Planning and aggregation" of benchmarks/RESULTS.md (other sections are left alone).
"""

from __future__ import annotations

import datetime
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from diffcredit.coalitions import parse_coalitions, plan, read_coalitions, write_coalitions
from diffcredit.shapley import aggregate, read_utilities

CONTRIBUTORS = 1_000
PLANNED = 100_000
AGGREGATED = 10_000
SEEDS = 2  # utility rows per coalition, so the intervals include seed noise
NOISE = 0.05
RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Planning and aggregation"


def timed(function, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    load = os.getloadavg()[0]
    return (
        f"{len(os.sched_getaffinity(0))} cores (nproc), {model.group(1) if model else 'unknown CPU'}, "
        f"load average {load:.1f} at the start (the cores are shared)"
    )


def main() -> None:
    context = machine()
    names = [f"artist{i:04d}" for i in range(CONTRIBUTORS)]
    large, plan_seconds = timed(plan, names, "kernelshap", PLANNED, 0)

    # An additive game with seed noise: the Shapley values are the planted terms.
    table = large.head(AGGREGATED)  # prefix stability: the plan of budget 10,000
    rng = np.random.default_rng(0)
    planted = rng.normal(size=CONTRIBUTORS)
    utility = parse_coalitions(table, names)[2] @ planted
    rows = pd.DataFrame(
        {
            "coalition": np.repeat(table["coalition"].to_numpy(), SEEDS),
            "utility": np.repeat(utility, SEEDS) + NOISE * rng.normal(size=SEEDS * len(table)),
        }
    )
    with tempfile.TemporaryDirectory() as folder:
        plan_file, utilities_file = Path(folder) / "coalitions.tsv", Path(folder) / "utilities.tsv"
        _, write_seconds = timed(write_coalitions, large, plan_file)
        size_mb = plan_file.stat().st_size / 1e6
        write_coalitions(table, plan_file)
        rows.to_csv(utilities_file, sep="\t", index=False)
        (read, measured), read_seconds = timed(lambda: (read_coalitions(plan_file), read_utilities(utilities_file)))
    result, aggregate_seconds = timed(aggregate, read, measured)
    values = result.table
    covered = ((values["ci_low"] <= planted) & (planted <= values["ci_high"])).mean()
    error = np.abs(values["value"] - planted)
    correlation = np.corrcoef(values["value"], planted)[0, 1]

    figures = [
        f"- plan {PLANNED:,} KernelSHAP coalitions of {CONTRIBUTORS:,} contributors: **{plan_seconds:.2f} s** "
        f"(then writing the {size_mb:.0f} MB TSV: {write_seconds:.2f} s)",
        f"- aggregate {AGGREGATED:,} coalitions ({SEEDS} utility rows each, {len(result.convergence) // CONTRIBUTORS}"
        f"-point convergence table, 95% intervals): **{aggregate_seconds:.2f} s** (before it, reading and "
        f"validating the two TSV files: {read_seconds:.2f} s)",
        f"- check (additive game, seed noise sd {NOISE}): Pearson r = {correlation:.3f} with the planted values, "
        f"median |error| {np.median(error):.3f}, median stderr {values['stderr'].median():.3f}, "
        f"95% intervals cover {covered:.1%}",
    ]
    text = "\n".join(
        [
            SECTION,
            "",
            f"`.venv/bin/python benchmarks/bench_shapley.py` on {datetime.date.today().isoformat()}, {context}; "
            "one process.",
            "",
            *figures,
            "",
        ]
    )
    print(text)
    write_section(text)


def write_section(text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (or add it), keeping every other section as it is."""
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text + "\n", current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(updated.rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
