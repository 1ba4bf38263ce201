"""Atomic writes and file digests: the one place every module writes results through.

Every writer puts its bytes in a temporary file beside the destination and renames it into place (``os.replace`` is
atomic on one file system), so a killed job never leaves a half-written file for the next run to trust. A job killed
by SIGKILL mid-write leaves its hidden temporary file (``.NAME.XXXX.SUFFIX``) behind; readers look results up by
name and never read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PathLike = str | os.PathLike[str]


def write_atomic(path: PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``.

    The temporary file keeps ``path``'s suffix, for writers that choose a format by it (``np.savez``, safetensors).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: PathLike, payload: Any) -> None:
    """JSON with sorted keys and one-space indent (stable bytes for the same payload)."""
    write_text(path, json.dumps(payload, indent=1, sort_keys=True))


def write_table(table: pd.DataFrame, path: PathLike, sep: str = "\t") -> None:
    """A table without its index: TSV by default, ``sep=","`` for CSV."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as stream:
            table.to_csv(stream, sep=sep, index=False)

    write_atomic(path, write)


def save_npz(path: PathLike, **arrays: np.ndarray) -> None:
    """Compressed ``.npz`` of ``arrays``."""
    write_atomic(path, lambda tmp: np.savez_compressed(tmp, **arrays))


@contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder and move it to ``path`` only if the block finishes."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def folder_digest(*folders: PathLike) -> str:
    """SHA-256 over the files below ``folders``, each as its relative path and bytes: what they hold, not where they
    lie. Hidden files (Snakemake's ``.snakemake_timestamp``, a killed writer's temporary file) are left out."""
    digest = hashlib.sha256()
    for root in map(Path, folders):
        files = (p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        for path in sorted(files):
            digest.update(f"{path.relative_to(root).as_posix()}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def file_digest(path: PathLike) -> str:
    """SHA-256 of a file's bytes, as hex (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
