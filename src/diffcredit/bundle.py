"""Result bundles: a byte-reproducible tar.gz of a run's results, with SHA-256 checksums to verify it.

The archive is reproducible: members are sorted, and owners, permissions and timestamps are fixed, so the same
results give the same archive bytes (and checksum) on any machine. Its manifest says which yardstick the values were
measured by (a trusted reference, named by source, path and digest, or the contributors' own held-out items), so a
reader of the bundle alone can tell whether the contributors shaped their own yardstick.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path

from diffcredit.io import file_digest, write_atomic, write_text
from diffcredit.reproducibility import KERNEL_PINS

ARCHIVE = "results.tar.gz"
CHECKSUMS = "SHA256SUMS"
PACKAGES = ("diffcredit", "torch", "diffusers", "peft", "torch-pruning", "clean-fid", "numpy", "pandas", "snakemake")
YARDSTICK = "yardstick"  # the metadata key of the reference's provenance


def make_bundle(
    files: Mapping[str, str | Path],
    out_dir: str | Path,
    metadata: Mapping | None = None,
    *,
    reference: str | Path | None = None,
) -> Path:
    """Archive `files` (name in the archive -> path) with a MANIFEST.json into `out_dir`; returns the checksum file.

    `out_dir` receives ``results.tar.gz`` and ``SHA256SUMS`` (one line per archived file and one for the archive, in
    ``sha256sum`` format, so ``sha256sum -c`` verifies the archive in place). With `reference`, the run's prepared
    reference folder, the metadata gains ``yardstick`` (:func:`diffcredit.properties.reference_provenance`: trusted or
    not, the ``data.reference`` source and path, the images' digest and the statement) and the archive its
    ``reference.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = dict(metadata or {})
    if reference is not None:
        from diffcredit.properties import INFO_FILE, reference_provenance

        metadata[YARDSTICK] = reference_provenance(reference)
        files = {**files, INFO_FILE: Path(reference, INFO_FILE)}
    missing = [str(path) for path in files.values() if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot bundle missing files: {', '.join(missing)}")
    sums = {name: file_digest(path) for name, path in sorted(files.items())}
    manifest = json.dumps({"files": sums, "metadata": metadata}, indent=1, sort_keys=True).encode()

    def write_archive(tmp: str) -> None:
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            _add(tar, "MANIFEST.json", manifest)
            for name, path in sorted(files.items()):
                _add(tar, name, Path(path).read_bytes())

    write_atomic(out_dir / ARCHIVE, write_archive)

    lines = [f"{sums[name]}  {name}" for name in sorted(sums)] + [f"{file_digest(out_dir / ARCHIVE)}  {ARCHIVE}"]
    checksums = out_dir / CHECKSUMS
    write_text(checksums, "\n".join(lines) + "\n")
    return checksums


def environment() -> dict:
    """What a reader needs to judge whether another run should reproduce these results byte for byte.

    Package versions, the commit of the workflow, the CPU (model and the instruction sets that select kernels), the
    GPU if any, torch's thread count in this job and the kernel-pinning variables.
    """
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    flags: set[str] = set()
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "versions": {name: installed(name) for name in PACKAGES},
        "python": platform.python_version(),
        "commit": commit,
        "machine": platform.machine(),
        "cpu": model,
        "cpu_isa": sorted(flags & {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "kernel_variables": {name: os.environ.get(name) for name in (*KERNEL_PINS, "OMP_NUM_THREADS")},
    }


def verify_bundle(out_dir: str | Path) -> list[str]:
    """Check the archive against SHA256SUMS and every member against the manifest; returns the problems found."""
    out_dir = Path(out_dir)
    expected = dict(reversed(line.split("  ", 1)) for line in (out_dir / CHECKSUMS).read_text().splitlines() if line)
    problems = []
    if file_digest(out_dir / ARCHIVE) != expected.get(ARCHIVE):
        problems.append(f"{ARCHIVE}: checksum differs from {CHECKSUMS}")
    with tarfile.open(out_dir / ARCHIVE, "r:gz") as tar:
        manifest = json.loads(tar.extractfile("MANIFEST.json").read())
        for name, digest in manifest["files"].items():
            member = tar.extractfile(name)
            if member is None:
                problems.append(f"{name}: missing from the archive")
            elif hashlib.sha256(member.read()).hexdigest() != digest or expected.get(name) != digest:
                problems.append(f"{name}: checksum differs")
    return problems


def bundled_yardstick(out_dir: str | Path) -> dict | None:
    """The yardstick a bundle's values were measured by (its manifest's ``yardstick``), None if it does not say."""
    with tarfile.open(Path(out_dir) / ARCHIVE, "r:gz") as tar:
        return json.loads(tar.extractfile("MANIFEST.json").read())["metadata"].get(YARDSTICK)


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))
