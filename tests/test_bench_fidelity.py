"""The fidelity benchmark's presets: each plans `snakemake evaluate` under the run folder the script reads."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import pytest
from workflow_files import planned_jobs, snakemake, workflow_copy

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def fidelity():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling machine.py
    try:
        spec = importlib.util.spec_from_file_location("fidelity", BENCHMARKS / "fidelity.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["fidelity"] = module  # its dataclass looks its module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.mark.parametrize("name", ["digits", "latent", "lora", "marketplace"])
def test_each_fidelity_benchmark_plans_its_evaluation_in_its_run_folder(tmp_path, fidelity, name):
    benchmark = fidelity.BENCHMARKS[name]
    presets = [f"config/presets/{file}" for file in benchmark.configfiles]
    result = snakemake(workflow_copy(tmp_path), "-n", "evaluate", "--configfile", "config/config.yaml", *presets)
    jobs = planned_jobs(result.stdout)
    assert jobs["evaluation_report"] == 1 and jobs["counterfactual"] == 1
    assert f"results/{benchmark.run}/evaluation/report.json" in result.stdout
    assert jobs.get("prepare_family", 0) == (name in ("latent", "lora"))


def test_the_marketplace_report_ranks_every_planted_contributor_per_ranking(fidelity):
    clean = [f"digit{label}" for label in range(5)]
    planted = ["dup2", "few4", "noisy3", "blurred1", "glyphs", "noise"]
    shapley = [
        {"contributor": c, "value": v, "ci_low": v - 1, "ci_high": v + 1}
        for c, v in zip(clean + planted, [10, 9, 8, 7, 6, 8, 3, 1, 0, -1, -2], strict=True)
    ]
    # A ranking without intervals that puts the noise contributor first.
    similarity = [
        {"contributor": c, "value": float(i), "ci_low": None, "ci_high": None} for i, c in enumerate(clean + planted)
    ]
    for table in (shapley, similarity):
        values = [row["value"] for row in table]
        for row in table:
            row["rank"] = 1 + sum(v > row["value"] for v in values)
    lines = fidelity.planted_tables({"sft_shapley": shapley, "pixel_similarity_max": similarity})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    assert rows["sft_shapley"].endswith("| 1 | 2 | 3 | 5 | 6 | 3 | 7 | 8 | 9 | 10 | 11 | yes | yes |")
    assert rows["pixel_similarity_max"].endswith("| 11 | 10 | 9 | 8 | 7 | 6 | 5 | 4 | 3 | 2 | 1 | **no** | n/a |")
    assert rows["noise"] == "| noise | -2 [-3, -1] |"  # only the ranking with intervals has a value column


@pytest.mark.parametrize("name", ["digits", "latent", "lora", "marketplace"])
def test_every_row_of_the_written_section_has_its_tables_columns(fidelity, name):
    # The committed figures through the section writer: a verdict or value outside its table's columns would break
    # the rendering (the LDS target once trailed the last cell).
    out = json.loads((BENCHMARKS / fidelity.BENCHMARKS[name].figures).read_text())
    lines = fidelity.markdown(out, name).splitlines()
    tables = 0
    for i, line in enumerate(lines):
        if line.startswith("| --- "):
            tables += 1
            width = lines[i - 1].count(" | ")
            body = itertools.takewhile(lambda row: row.startswith("| "), lines[i + 1 :])
            assert all(row.count(" | ") == width for row in body), lines[i - 1]
    assert tables >= 4 + 2 * (name == "marketplace")
    lds_head = next(i for i, line in enumerate(lines) if line.startswith("| ranking | LDS |"))
    sft = next(line for line in lines[lds_head:] if line.startswith("| sft_shapley |"))
    assert sft.rsplit(" | ", 1)[1].startswith("≥ 0.6: ")  # the paper-LDS target, in its own column
