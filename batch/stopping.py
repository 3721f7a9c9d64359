"""Graceful stop on SIGTERM, SIGUSR1 (Slurm's warning before the time limit) and a first Ctrl-C.

Installed before torch is imported: SIGUSR1's default action kills the process, and Slurm may send
it at any moment. The pipeline finishes the batch in hand, commits, and exits with EXIT_INTERRUPTED so
a job script knows to requeue; running the same command again resumes.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: committed what was done; run the same command again to go on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

log = logging.getLogger(__name__)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> "StopRequest":
        for number in STOP_SIGNALS:
            signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(number).name
        log.warning("received %s: finishing the batch in hand, committing, then exiting", self.signal_name)


def ignore_stop_signals() -> None:
    """For loader workers: the main process decides when to stop, and shuts them down itself."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
