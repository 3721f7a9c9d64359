"""Progress: a redrawn bar on a terminal, a logged line every few seconds in a batch log.

In a batch log the lines go through `logging`, so they carry the time and level like every other line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Counts images as batches finish; `stream` is where a terminal gets the bar (it decides which kind)."""

    BAR_WIDTH = 24

    def __init__(self, total: int, stream: TextIO = sys.stderr, log_interval: float = 5.0):
        self.total = total
        self.done = 0
        self.errors = 0
        self.stream = stream
        self.started = time.monotonic()
        self.interactive = stream.isatty()
        self.interval = 0.2 if self.interactive else log_interval
        self._last_report = self.started

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def update(self, done: int, errors: int) -> None:
        self.done += done
        self.errors += errors
        now = time.monotonic()
        if now - self._last_report >= self.interval:
            self._last_report = now
            self._report()

    def status(self) -> str:
        eta = (self.total - self.done) / self.rate if self.rate else 0.0
        return (
            f"{self.done}/{self.total} images, {self.rate:.1f} images/s, "
            f"ETA {format_duration(eta)}, {self.errors} errors"
        )

    def _report(self) -> None:
        if self.interactive:
            filled = int(self.BAR_WIDTH * self.done / self.total) if self.total else self.BAR_WIDTH
            bar = "#" * filled + "." * (self.BAR_WIDTH - filled)
            self.stream.write(f"\r[{bar}] {self.status()}\033[K")
            self.stream.flush()
        else:
            log.info("progress: %s", self.status())

    def finish(self) -> None:
        if self.interactive:
            self._report()
            self.stream.write("\n")
            self.stream.flush()
