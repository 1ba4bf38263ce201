"""What every benchmark records beside its figures: the machine, the package versions, and its own RESULTS.md section
(with the header of its markdown tables)."""

from __future__ import annotations

import os
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("torch", "diffusers", "torch-pruning", "clean-fid", "snakemake", "numpy", "pandas", "scipy")


def machine_description() -> str:
    """CPU model, core count, memory and OS, e.g. for a RESULTS.md header."""
    cpuinfo = Path("/proc/cpuinfo")
    model = platform.processor() or "unknown CPU"
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        model = found.group(1).strip() if found else model
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        found = re.search(r"^MemTotal:\s*(\d+) kB", meminfo.read_text(), re.MULTILINE)
        memory = f", {int(found.group(1)) / 2**20:.0f} GiB" if found else ""
    return (
        f"{model}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def replace_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the `## title` section of a Markdown file, leaving the other sections as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    heading = f"## {title}\n"
    section = f"{heading}\n{body.strip()}\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        following = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if following < 0 else "\n" + text[following + 1 :])
    path.write_text(text)


def table_head(*columns: str) -> list[str]:
    """A markdown table's header and rule."""
    return ["| " + " | ".join(columns) + " |", "| --- " * len(columns) + "|"]
