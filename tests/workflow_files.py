"""The workflow's files as a clone has them, copied into a scratch directory for a test run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
WORKFLOW_PARTS = ("Snakefile", "workflow", "config", "envs", "profiles", "slurm")


def workflow_copy(path: Path) -> Path:
    """Copy the workflow into `path`; links (the root `slurm` profile link) stay links."""
    for part in WORKFLOW_PARTS:
        source = ROOT / part
        if source.is_symlink():
            (path / part).symlink_to(os.readlink(source))
        elif source.is_dir():
            shutil.copytree(source, path / part, symlinks=True)
        else:
            shutil.copy(source, path / part)
    return path


# Test-only fault injection: a stand-in for a workflow script that fails on its first run and then runs the real one.
_FAIL_ONCE = '''"""Test-only stand-in for {script}: fail once (before any work), then run the real script."""
import runpy
from pathlib import Path

marker = Path({marker!r})
if not marker.exists():
    marker.touch()
    raise RuntimeError(f"injected failure (the first run; marker {{marker}})")
runpy.run_path({real!r}, init_globals={{"snakemake": snakemake}}, run_name="__main__")
'''


def fail_once(workdir: Path, script: str, marker: Path) -> None:
    """Make the copy's `workflow/scripts/<script>.py` fail the first time any job runs it, leaving `marker`."""
    scripts = workdir / "workflow" / "scripts"
    real = scripts / f"{script}.real.py"
    (scripts / f"{script}.py").rename(real)
    # Jobs run in `workdir` (locally and on SLURM), so the real script is found relative to it.
    (scripts / f"{script}.py").write_text(
        _FAIL_ONCE.format(script=script, marker=str(marker), real=real.relative_to(workdir).as_posix())
    )


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


def stored_records(results: Path) -> dict[Path, int]:
    """Each coalition measurement stored under a run's `results` folder, and its modification time (ns).

    A job killed mid-write leaves its hidden temporary file (``.KEY.json.XXXX.json``, see `io.write_atomic`) beside
    the records; the store looks records up by key and never reads it, so neither does this.
    """
    return {path: path.stat().st_mtime_ns for path in results.glob("*/store/*/[!.]*.json")}


def continued(workdir: Path, path: Path) -> Path:
    """A copy of a finished run's folder (outputs, their times, Snakemake's records) to go on from."""
    shutil.copytree(workdir, path, symlinks=True)
    return path
