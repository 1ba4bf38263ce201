"""Seeds: every random stream of a run derives from the run's seed and a purpose label.

Streams with different purposes are independent, and the same purpose always gives the same stream, so e.g. the
generation noise is identical for every coalition (common random numbers) while training seeds differ by repeat.
"""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(seed: int, purpose: str, *index: int) -> int:
    """A 31-bit seed for `purpose` (and optional integer indices) derived from the run's `seed`."""
    entropy = [int(seed), zlib.crc32(purpose.encode()), *map(int, index)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)
