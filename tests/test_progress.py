"""Progress: a redrawn bar on a terminal, timed log lines in a batch log; exact text on a clock the test sets."""

from __future__ import annotations

import io
import logging
import re
import time

import pytest

from batch import progress
from batch.options import LOG_DATE_FORMAT, LOG_FORMAT
from batch.progress import Progress, format_duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(progress, "time", clock)
    return clock


@pytest.fixture
def batch_log():
    """What the `batch` CLI's logging writes to a batch log, captured."""
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    logger = logging.getLogger("batch.progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield log
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def test_a_batch_log_gets_a_timed_line_each_interval_with_rate_eta_and_errors(clock, batch_log):
    not_a_terminal = io.StringIO()
    bar = Progress(total=10, stream=not_a_terminal)  # the README's "a line every 5 seconds"
    clock.now = 102
    bar.update(4, 1)  # within the interval: no line yet
    clock.now = 105
    bar.update(2, 0)
    bar.finish()
    assert not_a_terminal.getvalue() == ""
    line = batch_log.getvalue()
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO progress: 6/10 images, 1.2 images/s, ETA 0:03, 1 errors\n", line)
    assert line[:8] in {time.strftime("%H:%M:%S", time.localtime(time.time() - s)) for s in (0, 1)}


def test_a_terminal_gets_a_bar_redrawn_in_place_and_a_newline_at_the_end(clock):
    terminal = Terminal()
    bar = Progress(total=4, stream=terminal)
    clock.now = 101
    bar.update(1, 0)
    clock.now = 101.1
    bar.update(1, 1)  # sooner than 0.2 s after the last drawing: not drawn
    clock.now = 102
    bar.update(2, 0)
    bar.finish()
    quarter = "\r[######..................] 1/4 images, 1.0 images/s, ETA 0:03, 0 errors\033[K"
    full = "\r[########################] 4/4 images, 2.0 images/s, ETA 0:00, 1 errors\033[K"
    assert terminal.getvalue() == quarter + full + full + "\n"


@pytest.mark.parametrize("done, total, filled", [(0, 3, 0), (1, 3, 8), (2, 3, 16), (3, 3, 24), (0, 0, 24)])
def test_the_bar_fills_in_proportion(clock, done, total, filled):
    terminal = Terminal()
    bar = Progress(total=total, stream=terminal)
    clock.now = 101
    bar.update(done, 0)
    assert terminal.getvalue().startswith(f"\r[{'#' * filled}{'.' * (24 - filled)}] {done}/{total} images, ")


def test_durations_read_like_clocks():
    assert [format_duration(s) for s in (5, 65, 3725)] == ["0:05", "1:05", "1:02:05"]
