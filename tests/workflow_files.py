"""The workflow's files as a clone has them, copied into a scratch directory for a test run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
