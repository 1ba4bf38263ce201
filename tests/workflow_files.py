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
