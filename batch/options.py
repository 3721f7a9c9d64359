"""The click pieces the `batch` commands share: logging set up alike, the parameter types, and the
option groups that more than one command takes. Light to import, like cli.py.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable

import click

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"


def setup_logging(verbose: bool) -> None:
    """Our own messages at INFO (DEBUG with -v); other libraries' only from WARNING up. Python warnings
    (torch's) are logged too, so that every line of a batch log starts with the time."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, stream=sys.stderr)
    logging.captureWarnings(True)
    logging.getLogger("batch").setLevel(logging.DEBUG if verbose else logging.INFO)


class Triple(click.ParamType):
    """Three numbers, one per colour channel: --mean and --std."""

    name = "R,G,B"

    def convert(self, value, param, ctx):  # type: ignore[override]
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(float(part) for part in value.split(","))
        except ValueError:
            numbers = ()
        if len(numbers) != 3:
            self.fail(f"{value!r} is not three comma-separated numbers", param, ctx)
        return numbers


class Size(click.ParamType):
    """A number of bytes as Slurm writes memory (4G, 4096M): --memory."""

    name = "SIZE"

    def convert(self, value, param, ctx):  # type: ignore[override]
        from batch.spill import parse_size

        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


class WidthRange(click.ParamType):
    """A width, or a range of them that generated pictures are drawn from: bench's --width."""

    name = "W[-W2]"

    def convert(self, value, param, ctx):  # type: ignore[override]
        if isinstance(value, tuple):
            return value
        parts = value.split("-")
        if len(parts) > 2 or not all(part.isdigit() and int(part) >= 16 for part in parts):
            self.fail(f"{value!r} is not a width (at least 16 px) or a range like 2000-4000", param, ctx)
        low, high = int(parts[0]), int(parts[-1])
        return (low, high) if low <= high else (high, low)


RETRY_FAILED = click.option("--retry-failed", is_flag=True,
                            help="Also take the inputs whose rows failed; classify puts each new row in the old one's place.")
RETRY_KIND = click.option("--retry-kind", "retry_kinds", multiple=True, metavar="KIND",
                          help="With --retry-failed, only errors of this kind ('io error', 'decoder crashed'...); "
                               "repeatable.")  # fmt: skip


def retry_asked(retry_failed: bool, retry_kinds: tuple[str, ...]):  # -> RetryFailed | None, imported late
    """The RetryFailed that --retry-failed and --retry-kind ask for, or None."""
    from batch.retry_failed import RetryFailed

    if retry_kinds and not retry_failed:
        raise click.UsageError("--retry-kind narrows --retry-failed: pass both")
    return RetryFailed(retry_kinds) if retry_failed else None


def budget_options(command: Callable) -> Callable:
    """--memory and --spill-dir, for the commands that hold every name (batch.spill): the command gets
    their `budget`, and a budget it cannot keep ends it with the message of what to change."""

    @functools.wraps(command)
    def within_budget(*args: Any, memory: int | None, spill_dir: str | None, **kwargs: Any) -> Any:
        from batch.spill import Budget, SpillError

        setup_logging(False)
        try:
            budget = Budget.of(memory, spill_dir)
        except ValueError as error:
            raise click.UsageError(str(error)) from None
        logging.getLogger("batch").info("batch %s: %s", command.__name__, budget)  # before any work
        try:
            return command(*args, budget=budget, **kwargs)
        except SpillError as error:
            raise click.ClickException(str(error)) from None

    within_budget = click.option("--spill-dir", type=click.Path(file_okay=False),
                                 help="Where to spill past --memory  [default: TMPDIR]")(within_budget)  # fmt: skip
    return click.option("--memory", type=Size(),
                        help="Memory this may hold, as Slurm writes it (4G, 4096M)  [default: the Slurm "
                             "allocation, else 1.5G]")(within_budget)  # fmt: skip
