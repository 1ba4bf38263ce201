"""Progress of long loops (training steps, denoising steps) through `logging`: count, rate and time left.

The package only logs; whoever runs it chooses where the lines go (:func:`log_to_stderr` in a rule script and the
demo). Reports come about ten times per loop, so a log stays short whatever the loop's length.
"""

from __future__ import annotations

import logging
import math
import sys
import time

LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"


def log_to_stderr(level: int = logging.INFO) -> None:
    """Send the package's log lines (progress with rate and ETA, warnings) to stderr: a rule's log, or the terminal."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr, force=True)


class Progress:
    """Logs ``label: done/total unit, rate, ETA`` every ``every`` units and at the end.

    ``every=None`` reports about ten times over ``total``; ``every=0`` never reports.
    """

    def __init__(
        self, logger: logging.Logger, label: str, total: int, *, unit: str = "steps", every: int | None = None
    ) -> None:
        self.logger, self.label, self.total, self.unit = logger, label, int(total), unit
        self.every = max(1, math.ceil(self.total / 10)) if every is None else int(every)
        self.done = 0
        self.start = time.perf_counter()

    def due(self, done: int) -> bool:
        """Whether reaching ``done`` units calls for a report (so that callers compute details only then)."""
        return (
            self.every > 0 and done > self.done and (done == self.total or done // self.every > self.done // self.every)
        )

    def update(self, done: int, detail: str = "") -> None:
        """Record that ``done`` units are finished; log if a report is due."""
        if self.due(done):
            elapsed = time.perf_counter() - self.start
            rate = done / elapsed if elapsed > 0 else math.inf
            left = (self.total - done) / rate if rate > 0 else math.inf
            self.logger.info(
                "%s: %d/%d %s (%.0f%%)  %.3g %s/s  ETA %s%s",
                self.label,
                done,
                self.total,
                self.unit,
                100 * done / max(self.total, 1),
                rate,
                self.unit,
                _clock(left),
                f"  {detail}" if detail else "",
            )
        self.done = max(self.done, done)


def _clock(seconds: float) -> str:
    """``1:02:03`` / ``02:03`` for a duration in seconds."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
