"""What makes two runs compute the same bytes: the environment every job of the workflow gets.

On CPU, torch, oneDNN and MKL choose kernels by the instruction sets of the machine at run time, so the same seeds give
different bytes on a machine with AVX-512 and one without (measured: README, "Reproducibility"); the thread count
changes reductions too (the rules give each job a fixed number of threads). Pinning the kernels to AVX2 makes every
x86-64 machine with AVX2 run the same kernels. A value the user exported wins over a pin.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

KERNEL_PINS: dict[str, str] = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def job_environment(source: str, current: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables to export for jobs: ``source`` (the checkout's src/) first on PYTHONPATH, and the kernel pins.

    Jobs then import the package from the checkout also inside a ``--sdm conda`` env, which holds only the pinned
    dependencies, and on SLURM nodes, which inherit the submitting environment.
    """
    current = os.environ if current is None else current
    path = os.pathsep.join([source, *filter(None, [current.get("PYTHONPATH")])])
    return {"PYTHONPATH": path, **{name: current.get(name, value) for name, value in KERNEL_PINS.items()}}
