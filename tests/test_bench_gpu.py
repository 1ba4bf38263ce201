"""The GPU benchmark runs end to end on the CPU with --tiny (the GPU figures themselves go to benchmarks/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_gpu_tiny_runs_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling machine.py
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCHMARKS / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        report = bench.main(["--tiny", "--device", "cpu", "--json", str(tmp_path / "bench.json")])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "bench.json").exists() and report["tiny"] and report["device"].startswith("CPU")
    for recipe in ("anchor", "diffcredit"):
        figures = report["per_coalition"][recipe]
        assert figures["total"] == figures["finetune"] + figures["sample"] + figures["score"] > 0
        assert figures["peak_memory"] is None  # CUDA only
    assert report["recipes"]["anchor"]["sampler"] == "ddim" and report["recipes"]["diffcredit"]["precision"] == "bf16"
    assert report["together"]["sequential"]["finetune_gain"] == 1.0
    assert "streams" not in report["together"]  # no CUDA streams on the CPU
    assert report["together"]["vmap"]["finetune_steps_per_s"] > 0
    assert "bench_gpu" not in sys.modules
