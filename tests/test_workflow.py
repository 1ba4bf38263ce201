"""The Snakemake workflow end to end: lint, dry-run, config validation, a real tiny run, its report, kill and resume
(with an injected failure), budget raise and adaptive rounds.

Each test runs Snakemake in a fresh copy of the workflow files (as a clone would have them) inside a temporary folder;
the tests that go on from the tiny run work on a copy of it, so that every test sees the run as it finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from workflow_files import SNAKEMAKE, continued, fail_once, planned_jobs, snakemake, stored_records, workflow_copy

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def measurements(plan: pd.DataFrame) -> int:
    """Utility measurements a plan asks for (its `repeats` column, else one per coalition)."""
    return int(plan["repeats"].sum()) if "repeats" in plan else len(plan)


def html_table(page: str) -> pd.DataFrame:
    """The first table of an HTML page written by pandas, as strings."""
    table = re.search(r"<table.*?</table>", page, re.S).group(0)
    rows = [
        re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S)
    ]
    return pd.DataFrame(rows[1:], columns=[cell.strip() for cell in rows[0]])


def sizes_of(plan: pd.DataFrame) -> pd.Series:
    return plan.set_index("coalition")["members"].map(lambda m: len([x for x in m.split(",") if x]))


def assert_efficient(values: pd.DataFrame, utilities: pd.DataFrame, plan: pd.DataFrame, n: int) -> None:
    """The values sum to v(N) − v(∅), each the mean over its measurements."""
    by_size = utilities.groupby(utilities["coalition"].map(sizes_of(plan)))["utility"].mean()
    assert values["value"].sum() == pytest.approx(by_size[n] - by_size[0], rel=1e-6)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One complete tiny run, shared by the tests that only read its results."""
    workdir = workflow_copy(tmp_path_factory.mktemp("tiny"))
    snakemake(workdir, "--cores", "2", "--configfile", str(TINY))
    return workdir


def test_the_solo_stages_compute_the_same_bytes_on_one_core(tiny_run, tmp_path):
    # train_full and recover compute with the two torch threads their rules fix, also where --cores 1 leaves Snakemake
    # one thread to give: another thread count changes reductions, hence the bytes
    workdir = workflow_copy(tmp_path)
    snakemake(workdir, "results/tiny/models/recovered", "--cores", "1", "--configfile", str(TINY))

    def digest(run: Path, model: str) -> str:
        files = sorted(path for path in (run / "results" / "tiny" / "models" / model).rglob("*") if path.is_file())
        return hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()

    for model in ("full", "recovered"):
        assert digest(workdir, model) == digest(tiny_run, model), model


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
    assert "round_values" not in counts


def test_dry_run_of_adaptive_rounds_lists_the_first_round(tmp_path):
    workdir = workflow_copy(tmp_path)
    adaptive = tmp_path / "adaptive.yaml"
    adaptive.write_text("estimator: {budget: 20, stopping: {rule: halfwidth, target: 0.5, round_budget: 16}}\n")
    counts = planned_jobs(snakemake(workdir, "-n", "--cores", "2", "--configfile", str(adaptive)).stdout)
    default = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert counts["coalition_utilities"] == math.ceil(20 / default["coalitions_per_job"])  # round 0: 20 coalitions
    assert counts["collect_round"] == counts["round_values"] == 1


def test_config_rejects_unknown_key_naming_it(tmp_path):
    workdir = workflow_copy(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("utility:\n  finetune_step: 10\n")
    result = snakemake(workdir, "-n", "--configfile", str(bad), check=False)
    assert result.returncode != 0
    assert "finetune_step" in result.stdout + result.stderr


def test_tiny_run_produces_values_with_intervals(tiny_run):
    run = tiny_run / "results" / "tiny"
    values = pd.read_csv(run / "sft" / "kernelshap" / "values.csv")
    assert list(values.columns[:5]) == ["contributor", "value", "stderr", "ci_low", "ci_high"]
    assert len(values) == 10
    assert (values["ci_low"] <= values["value"]).all() and (values["value"] <= values["ci_high"]).all()
    utilities = pd.read_csv(run / "sft" / "kernelshap" / "utilities.tsv", sep="\t")
    plan = pd.read_csv(run / "plans" / "kernelshap.tsv", sep="\t", keep_default_na=False)
    assert_efficient(values, utilities, plan, 10)
    # One round without a stopping rule; the plan's repeats (if any) were measured, at least one per coalition.
    assert (values["round"] == 0).all()
    rounds = pd.read_csv(run / "sft" / "kernelshap" / "rounds.tsv", sep="\t")
    assert rounds[["round", "n_coalitions"]].drop_duplicates().values.tolist() == [[0, 8]]
    planned = plan["repeats"] if "repeats" in plan else pd.Series(1, index=plan.index)
    assert utilities.groupby("coalition").size().sort_index().tolist() == planned.clip(lower=1).tolist()
    for figure in ("sft/kernelshap/values.png", "sft/kernelshap/convergence.png", "figures/samples.png"):
        assert (run / figure).stat().st_size > 1000


def test_tiny_run_records_stages_and_bundle_verifies(tiny_run):
    from diffcredit.bundle import bundled_yardstick, verify_bundle

    run = tiny_run / "results" / "tiny"
    record = json.loads(next(run.glob("sft/store/*/*.json")).read_text())
    assert {"load", "sample", "score"} <= set(record["seconds"]) and record["device"] == "cpu"
    assert verify_bundle(run / "bundle") == []
    assert bundled_yardstick(run / "bundle")["trusted"] is False  # the tiny config has no data.reference


def test_report_holds_description_values_costs_captions_and_config(tiny_run, tmp_path):
    archive = tmp_path / "report.zip"
    snakemake(tiny_run, "--report", str(archive), "--configfile", str(TINY))
    with zipfile.ZipFile(archive) as report:
        names = report.namelist()
        page = report.read(next(name for name in names if name.endswith("report.html"))).decode()
        tables = {Path(name).name: report.read(name).decode() for name in names if name.endswith(".html")}
    for figure in ("values.png", "convergence.png", "samples.png"):
        assert any(name.endswith(figure) for name in names), figure
    assert "DiffCredit credits the data contributors" in page  # workflow/report/workflow.rst
    assert "the contributors shape their own yardstick" in tables["values.html"]
    assert r"they sum to v(N) \u2212 v(\u2205)" in page  # the kernelshap caption (JSON in the page) says so
    assert "block_out_channels:\n    - 16\n    - 32" in tables["config.html"]  # the tiny config, as run
    values = pd.read_csv(tiny_run / "results" / "tiny" / "sft" / "kernelshap" / "values.csv")
    shown = html_table(tables["values.html"])
    assert {"value", "ci_low", "ci_high"} <= set(shown.columns)
    assert shown["contributor"].tolist() == values.sort_values("rank", kind="stable")["contributor"].tolist()
    costs = html_table(tables["costs.html"]).set_index("stage")
    assert costs.loc["coalition_utilities", "jobs"] == "2" and costs.loc["train_full", "jobs"] == "1"


@pytest.mark.parametrize("kind", ["Shapley", "Banzhaf", "leave-one-out"])
def test_values_caption_says_what_the_estimator_values_are(kind):
    from jinja2 import Environment

    caption = (ROOT / "workflow" / "report" / "values.rst").read_text()
    job = SimpleNamespace(
        params=SimpleNamespace(kind=kind, confidence=0.95), wildcards=SimpleNamespace(plan="p", mode="sft")
    )
    text = " ".join(Environment().from_string(caption).render(snakemake=job).split())
    assert text.startswith(f"{kind} values (p)")
    assert ("they sum to v(N) − v(∅)" in text) == (kind == "Shapley")
    assert ("do not sum to v(N) − v(∅)" in text) == (kind != "Shapley")


def test_stage_costs_assign_each_benchmark_to_its_most_specific_rule(tmp_path):
    from diffcredit.report import stage_costs

    patterns = {
        "coalition_utilities": "b/{mode}/{plan}/{batch}.tsv",
        "aggregate": "b/{mode}/{plan}/aggregate.tsv",
        "plan": "b/plan/{plan}.tsv",
    }
    header = "s\th:m:s\tmax_rss\tcpu_time\n"
    for path, seconds, rss in (
        ("b/sft/ks/b00000.tsv", 10, 300),
        ("b/sft/ks/b00001.tsv", 20, "NA"),
        ("b/sft/ks/aggregate.tsv", 1, 50),
        ("b/plan/ks.tsv", 2, 40),
        ("b/other.tsv", 9, 1),
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(f"{header}{seconds}\t0:00:{seconds}\t{rss}\t{seconds / 2}\n")
    costs = stage_costs(patterns, tmp_path).set_index("stage")
    assert costs["jobs"].to_dict() == {"coalition_utilities": 2, "plan": 1, "aggregate": 1}
    assert costs.loc["coalition_utilities", ["wall_s", "max_wall_s", "cpu_s", "peak_rss_mb"]].tolist() == [
        30,
        20,
        15,
        300,
    ]


def test_raising_the_budget_runs_only_new_coalitions(tiny_run, tmp_path):
    workdir = continued(tiny_run, tmp_path / "run")
    run = workdir / "results" / "tiny"
    before = stored_records(run)
    larger = workdir / "larger.yaml"
    larger.write_text("estimator: {name: kernelshap, budget: 12}\n")
    snakemake(workdir, "--cores", "2", "--configfile", str(TINY), str(larger))
    after = stored_records(run)
    assert {p: after[p] for p in before} == before, "a finished coalition was recomputed"
    plan = pd.read_csv(run / "plans" / "kernelshap.tsv", sep="\t")
    assert len(plan) == 12 and len(after) == len(before) + 4
    assert len(pd.read_csv(run / "sft" / "kernelshap" / "utilities.tsv", sep="\t").drop_duplicates("coalition")) == 12


def test_adaptive_rounds_extend_the_plan_and_measure_only_new_coalitions(tiny_run, tmp_path):
    workdir = continued(tiny_run, tmp_path / "run")
    run = workdir / "results" / "tiny"
    first = pd.read_csv(run / "sft" / "kernelshap" / "values.csv")
    before = stored_records(run)
    # A target no interval meets: round 0 (the tiny run's 8 coalitions) goes on, round 1 (12) spends the budget.
    adaptive = workdir / "adaptive.yaml"
    adaptive.write_text("estimator: {stopping: {rule: halfwidth, target: 1.0e-9, round_budget: 4, max_budget: 12}}\n")
    result = snakemake(workdir, "--cores", "2", "--configfile", str(TINY), str(adaptive))
    output = result.stdout + result.stderr
    after = stored_records(run)
    assert {p: after[p] for p in before} == before, "a finished coalition was recomputed"
    assert len(after) == len(before) + 4  # round 1 measured its 4 new coalitions, nothing else
    assert "rule coalition_utilities:" in output and "batch=b00002" in output and "batch=b00000" not in output
    decisions = [
        json.loads((run / "sft" / "kernelshap" / "rounds" / r / "decision.json").read_text()) for r in ("r00", "r01")
    ]
    assert [(d["n_coalitions"], d["stop"]) for d in decisions] == [(8, False), (12, True)]
    assert decisions[1]["reason"].startswith("budget spent")
    assert not (run / "sft" / "kernelshap" / "rounds" / "r02").exists()
    # Round 0 evaluated the tiny run's coalitions: the same values; the final values are round 1's.
    round0 = pd.read_csv(run / "sft" / "kernelshap" / "rounds" / "r00" / "values.csv")
    assert round0["value"].tolist() == pytest.approx(first["value"].tolist(), rel=1e-9)
    values = pd.read_csv(run / "sft" / "kernelshap" / "values.csv")
    assert (values["round"] == 1).all() and (values["n_coalitions"] <= 12).all()
    plan = pd.read_csv(run / "plans" / "kernelshap.tsv", sep="\t", keep_default_na=False)
    utilities = pd.read_csv(run / "sft" / "kernelshap" / "utilities.tsv", sep="\t")
    assert utilities["coalition"].nunique() == 12
    assert_efficient(values, utilities, plan, 10)
    rounds = pd.read_csv(run / "sft" / "kernelshap" / "rounds.tsv", sep="\t")
    assert rounds[["round", "n_coalitions"]].drop_duplicates().values.tolist() == [[0, 8], [1, 12]]
    convergence = pd.read_csv(run / "sft" / "kernelshap" / "convergence.tsv", sep="\t")
    assert set(convergence["round"]) == {0, 1}


def test_failed_and_killed_run_resumes_without_recomputing(tmp_path):
    workdir = workflow_copy(tmp_path)
    fail_once(workdir, "coalition_utilities", tmp_path / "failed-once")  # the first coalition job fails, is retried
    process = subprocess.Popen(
        [*SNAKEMAKE, "--cores", "1", "--retries", "1", "--configfile", str(TINY)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while len(stored_records(workdir / "results" / "tiny")) < 2:  # some coalitions of the first job are done
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert (tmp_path / "failed-once").exists(), "the injected failure did not happen"
    finished = stored_records(workdir / "results" / "tiny")
    assert 2 <= len(finished) < 8  # the first job's 4 coalitions are not all done
    for record in finished:  # what a killed job left at a record's path is whole (its temporary file is not read)
        assert json.loads(record.read_text())["utility"] is not None, f"{record} was left half-written"

    snakemake(workdir, "--unlock", "--configfile", str(TINY))  # a killed Snakemake leaves its lock behind
    snakemake(workdir, "--cores", "2", "--configfile", str(TINY))
    after = stored_records(workdir / "results" / "tiny")
    assert {p: after[p] for p in finished} == finished, "a finished coalition was recomputed"
    plan = pd.read_csv(workdir / "results" / "tiny" / "plans" / "kernelshap.tsv", sep="\t")
    assert len(after) == measurements(plan)
    values = pd.read_csv(workdir / "results" / "tiny" / "sft" / "kernelshap" / "values.csv")
    assert values["value"].notna().all()
