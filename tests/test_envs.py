"""The conda environment installs exactly the pins that `make` installs and CI tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _conda_env_script():
    spec = importlib.util.spec_from_file_location("conda_env", ROOT / "scripts" / "conda-env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conda_env_pins_match_the_lock():
    env = yaml.safe_load((ROOT / "envs" / "diffcredit.yaml").read_text())
    pip = next(entry["pip"] for entry in env["dependencies"] if isinstance(entry, dict))
    assert pip == _conda_env_script().pins(ROOT / "requirements.lock"), (
        "envs/diffcredit.yaml disagrees with requirements.lock: run `python3 scripts/conda-env.py`"
    )


def test_conda_env_has_no_relative_paths():
    """Snakemake copies env files under .snakemake/conda/, so a relative path would point there."""
    text = (ROOT / "envs" / "diffcredit.yaml").read_text()
    assert "../" not in text and " -e " not in text and " -r " not in text


def test_pins_skip_comments_and_blank_lines(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\n\nnumpy==2.0.0  # why\npandas==2.2.0\n")
    assert _conda_env_script().pins(lock) == ["numpy==2.0.0", "pandas==2.2.0"]


def test_job_environment_puts_src_first_and_pins_kernels_unless_exported():
    from diffcredit.reproducibility import KERNEL_PINS, job_environment

    bare = job_environment("/wf/src", current={})
    assert bare == {"PYTHONPATH": "/wf/src", **KERNEL_PINS}
    mine = job_environment("/wf/src", current={"PYTHONPATH": "/mine", "ATEN_CPU_CAPABILITY": "avx512"})
    assert mine["PYTHONPATH"] == "/wf/src:/mine"
    assert mine["ATEN_CPU_CAPABILITY"] == "avx512" and mine["MKL_CBWR"] == "AVX2"
