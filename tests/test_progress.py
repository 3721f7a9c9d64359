"""Progress: a redrawn bar on a terminal, plain lines in a batch log."""

from __future__ import annotations

import io

from batch.progress import Progress, format_duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_batch_log_gets_plain_lines_with_rate_eta_and_errors():
    log = io.StringIO()
    progress = Progress(total=10, stream=log, log_interval=0)
    progress.update(4, 1)
    progress.finish()
    line = log.getvalue()
    assert line.startswith("progress: 4/10 images, ") and "images/s, ETA " in line and line.endswith("1 errors\n")
    assert "\r" not in line


def test_a_terminal_gets_a_redrawn_bar_ending_with_a_newline():
    terminal = Terminal()
    progress = Progress(total=4, stream=terminal)
    progress.update(2, 0)
    progress.finish()
    drawn = terminal.getvalue()
    assert drawn.startswith("\r[") and "4" in drawn and drawn.endswith("\n")
    assert "[############............] 2/4 images" in drawn


def test_durations_read_like_clocks():
    assert [format_duration(s) for s in (5, 65, 3725)] == ["0:05", "1:05", "1:02:05"]
