"""The Snakemake workflow end to end: lint, dry-run, config validation, a real tiny run, kill and resume, budget raise.

Each test runs Snakemake in a fresh copy of the workflow files (as a clone would have them) inside a temporary folder.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from workflow_files import workflow_copy

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([*SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def planned_jobs(output: str) -> dict[str, int]:
    """Job counts per rule from a dry-run's summary table."""
    counts, in_table = {}, False
    for line in output.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
        elif in_table and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
        elif in_table and counts and not parts:
            break
    return counts


def stored_records(run: Path) -> dict[Path, int]:
    """Each stored coalition measurement and its modification time (ns)."""
    return {path: path.stat().st_mtime_ns for path in run.glob("*/store/*/*.json")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One complete tiny run, shared by the tests that only read its results."""
    workdir = workflow_copy(tmp_path_factory.mktemp("tiny"))
    snakemake(workdir, "--cores", "2", "--configfile", str(TINY))
    return workdir


def test_lint_is_clean(tmp_path):
    result = snakemake(workflow_copy(tmp_path), "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_dry_run_lists_every_coalition_job(tmp_path):
    result = snakemake(workflow_copy(tmp_path), "-n", "--cores", "2")
    counts = planned_jobs(result.stdout)
    default = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert counts["coalition_utilities"] == math.ceil(default["estimator"]["budget"] / default["coalitions_per_job"])
    for rule in ("prepare_data", "train_full", "prune", "recover", "aggregate", "bundle"):
        assert counts[rule] == 1


def test_config_rejects_unknown_key_naming_it(tmp_path):
    workdir = workflow_copy(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("utility:\n  finetune_step: 10\n")
    result = snakemake(workdir, "-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert "finetune_step" in result.stdout + result.stderr


def test_tiny_run_produces_values_with_intervals(tiny_run):
    run = tiny_run / "results" / "tiny"
    values = pd.read_csv(run / "sft" / "kernelshap" / "shapley.csv")
    assert list(values.columns[:5]) == ["contributor", "value", "stderr", "ci_low", "ci_high"]
    assert len(values) == 10
    assert (values["ci_low"] <= values["value"]).all() and (values["value"] <= values["ci_high"]).all()
    utilities = pd.read_csv(run / "sft" / "kernelshap" / "utilities.tsv", sep="\t")
    plan = pd.read_csv(run / "plans" / "kernelshap.tsv", sep="\t", keep_default_na=False)
    sizes = plan.set_index("coalition")["members"].map(lambda m: len([x for x in m.split(",") if x]))
    by_size = utilities.groupby(utilities["coalition"].map(sizes))["utility"].mean()
    # Efficiency: the values sum to v(N) - v(∅).
    assert values["value"].sum() == pytest.approx(by_size[10] - by_size[0], rel=1e-6)
    assert (run / "sft" / "kernelshap" / "shapley.png").stat().st_size > 1000
    assert (run / "figures" / "samples.png").stat().st_size > 1000


def test_tiny_run_records_stages_and_bundle_verifies(tiny_run):
    from diffcredit.bundle import verify_bundle

    run = tiny_run / "results" / "tiny"
    record = json.loads(next(run.glob("sft/store/*/*.json")).read_text())
    assert {"load", "sample", "score"} <= set(record["seconds"]) and record["device"] == "cpu"
    assert verify_bundle(run / "bundle") == []


def test_raising_the_budget_runs_only_new_coalitions(tiny_run):
    run = tiny_run / "results" / "tiny"
    before = stored_records(run)
    larger = tiny_run / "larger.yaml"
    larger.write_text("estimator: {name: kernelshap, budget: 12}\n")
    snakemake(tiny_run, "--cores", "2", "--configfile", str(TINY), str(larger))
    after = stored_records(run)
    assert {p: after[p] for p in before} == before, "a finished coalition was recomputed"
    plan = pd.read_csv(run / "plans" / "kernelshap.tsv", sep="\t")
    assert len(plan) == 12 and len(after) == len(before) + 4
    assert len(pd.read_csv(run / "sft" / "kernelshap" / "utilities.tsv", sep="\t")) == 12


def test_killed_run_resumes_without_recomputing(tmp_path):
    workdir = workflow_copy(tmp_path)
    store = workdir / "results" / "tiny" / "sft" / "store"
    process = subprocess.Popen([*SNAKEMAKE, "--cores", "1", "--configfile", str(TINY)], cwd=workdir,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len(list(store.glob("*/*.json"))) < 2:  # some coalitions of the first job are done
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    finished = stored_records(workdir / "results" / "tiny")
    assert 2 <= len(finished) < 8
    assert not list(store.glob("*/.*.tmp")), "a half-written record was left behind"

    snakemake(workdir, "--unlock", "--configfile", str(TINY))  # a killed Snakemake leaves its lock behind
    snakemake(workdir, "--cores", "2", "--configfile", str(TINY))
    after = stored_records(workdir / "results" / "tiny")
    assert {p: after[p] for p in finished} == finished, "a finished coalition was recomputed"
    assert len(after) == 8
    values = pd.read_csv(workdir / "results" / "tiny" / "sft" / "kernelshap" / "shapley.csv")
    assert values["value"].notna().all()
