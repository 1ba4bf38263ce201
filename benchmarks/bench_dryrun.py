"""Dry-run at scale: how long `snakemake -n` takes to plan 1,000 contributors and 10,000 coalitions.

The workflow expands one job per `coalitions_per_job` coalitions at parse time, so the dry-run lists every cluster
submission before anything runs. The contributors come from a digits manifest that deals the 1,797 bundled digits out
to the contributors round-robin (no data to download or generate). Each setting runs in a fresh copy of the workflow,
as a clone would have it; the printed Markdown table is what benchmarks/RESULTS.md records.

    .venv/bin/python benchmarks/bench_dryrun.py                      # 1,000 x 10,000 at 1, 10 and 100 per job
    .venv/bin/python benchmarks/bench_dryrun.py --per-job 25 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_PARTS = ("Snakefile", "workflow", "config", "envs", "profiles")
DIGITS = 1797  # items in scikit-learn's bundled digits


@dataclass(frozen=True)
class DryRun:
    per_job: int
    seconds: float
    max_rss_mb: float
    coalition_jobs: int
    total_jobs: int


def workflow_copy(path: Path) -> Path:
    for part in WORKFLOW_PARTS:
        source = ROOT / part
        (shutil.copytree if source.is_dir() else shutil.copy)(source, path / part)
    return path


def write_manifest(path: Path, contributors: int) -> Path:
    """Assign digit i to contributor ``c{i mod contributors}``: every contributor gets at least one item."""
    if not 1 <= contributors <= DIGITS:
        raise ValueError(f"--contributors {contributors}: the digits manifest supports 1 to {DIGITS} contributors")
    width = len(str(contributors - 1))
    rows = [f"digits-{i:04d}\tc{i % contributors:0{width}d}" for i in range(DIGITS)]
    path.write_text("item\tcontributor\n" + "\n".join(rows) + "\n")
    return path


def job_counts(output: str) -> dict[str, int]:
    """Job counts per rule from the summary table a dry-run prints last."""
    counts: dict[str, int] = {}
    for line in output[output.rindex("Job stats:") :].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def dry_run(workdir: Path, configfile: Path, per_job: int) -> DryRun:
    """Time one `snakemake -n` in a child process, with its peak resident memory (from wait4)."""
    log = workdir / f"dryrun-{per_job}.log"
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "--cores",
        "1",
        "--configfile",
        str(configfile),
        "--config",
        f"coalitions_per_job={per_job}",
    ]
    with log.open("w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed in {workdir}:\n{text[-3000:]}")
    counts = job_counts(text)
    return DryRun(per_job, seconds, usage.ru_maxrss / 1024, counts["coalition_utilities"], counts["total"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contributors", type=int, default=1000)
    parser.add_argument("--coalitions", type=int, default=10_000, help="the kernelshap budget")
    parser.add_argument("--per-job", type=int, nargs="+", default=[1, 10, 100], help="coalitions_per_job values")
    parser.add_argument("--repeats", type=int, default=1, help="dry-runs per setting; the table shows the fastest")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="diffcredit-dryrun-") as tmp:
        workdir = workflow_copy(Path(tmp))
        configfile = workdir / "bench.yaml"
        configfile.write_text(
            yaml.safe_dump(
                {
                    "name": "bench",
                    "data": {
                        "source": "digits",
                        "manifest": str(write_manifest(workdir / "manifest.tsv", args.contributors)),
                    },
                    "estimator": {"name": "kernelshap", "budget": args.coalitions},
                }
            )
        )
        print(
            f"{args.contributors} contributors, {args.coalitions} coalitions (kernelshap), "
            f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}\n"
        )
        print("| coalitions_per_job | coalition jobs | jobs in DAG | `snakemake -n` (s) | peak RSS (MB) |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for per_job in args.per_job:
            runs = [dry_run(workdir, configfile, per_job) for _ in range(args.repeats)]
            best = min(runs, key=lambda run: run.seconds)
            print(
                f"| {per_job} | {best.coalition_jobs:,} | {best.total_jobs:,} | {best.seconds:.1f} | "
                f"{best.max_rss_mb:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
