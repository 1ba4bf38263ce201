"""The fidelity benchmark's presets: each plans `snakemake evaluate` under the run folder the script reads."""

from __future__ import annotations

import importlib.util
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


@pytest.mark.parametrize("name", ["digits", "latent"])
def test_each_fidelity_benchmark_plans_its_evaluation_in_its_run_folder(tmp_path, fidelity, name):
    benchmark = fidelity.BENCHMARKS[name]
    presets = [f"config/presets/{file}" for file in benchmark.configfiles]
    result = snakemake(workflow_copy(tmp_path), "-n", "evaluate", "--configfile", "config/config.yaml", *presets)
    jobs = planned_jobs(result.stdout)
    assert jobs["evaluation_report"] == 1 and jobs["counterfactual"] == 1
    assert f"results/{benchmark.run}/evaluation/report.json" in result.stdout
    assert jobs.get("prepare_family", 0) == (name == "latent")
