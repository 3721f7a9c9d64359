"""Errors of the system around a file, told apart from errors in its bytes, and retried before they count.

A shared file system fails for a moment: an object storage target restarts, an NFS handle goes stale,
a read times out. Such an error says nothing about the file, so it must not become the file's final
row, which no rerun would try again. A truncated JPEG or an HTML page named .jpg fails the same way
every time and is recorded at once. Only the errno tells the two apart: Pillow raises OSError for
broken bytes too, without one.
"""

from __future__ import annotations

import errno
import logging
import re
import time
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

TRANSIENT_ERRNOS = frozenset({
    errno.EIO,  # a disk, an object storage target or the network under it
    errno.ESTALE,  # an NFS or Lustre handle whose server restarted or whose file was replaced
    errno.ETIMEDOUT,
    errno.EAGAIN,
    errno.EBUSY,
    errno.ENOMEM,  # the node, not the file: a kernel or FUSE allocation failed
    errno.EREMOTEIO,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EHOSTDOWN,
    errno.EHOSTUNREACH,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.ENOLINK,
    errno.ECOMM,
})  # fmt: skip
KIND = "io error"  # the row's error kind once every retry failed: `batch classify --retry-failed` redoes it
REDO = "transient: once the file system is well, `batch classify --retry-failed` redoes them"
DEFAULT_RETRIES = 3
FIRST_DELAY = 0.5  # seconds; then 2 and 8: a restarting storage target is back within tens of seconds
GROWTH = 4
LONGEST_DELAY = 60.0
_ARROW_ERRNO = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)  # pyarrow keeps the errno in its message only

T = TypeVar("T")


def errno_of(error: BaseException) -> int | None:
    number = getattr(error, "errno", None)
    if isinstance(number, int) or not isinstance(error, OSError):
        return number if isinstance(number, int) else None
    found = _ARROW_ERRNO.search(str(error))  # pyarrow's OSError
    return int(found.group(1)) if found else None


def is_transient(error: BaseException) -> bool:
    return errno_of(error) in TRANSIENT_ERRNOS


def delays(retries: int) -> list[float]:
    """The waits before each retry: 0.5, 2, 8, 32, 60, 60... seconds."""
    return [min(FIRST_DELAY * GROWTH**attempt, LONGEST_DELAY) for attempt in range(retries)]


def describe(error: BaseException, tries: int) -> str:
    """The row's error once the retries are spent: its own kind, so that summaries count it apart."""
    return f"{KIND}: {error} (failed {tries} times)" if tries > 1 else f"{KIND}: {error}"


def retried(call: Callable[[], T], retries: int, what: str) -> T:
    """CALL's result, calling it again after a transient error up to RETRIES times; the last error is raised."""
    for delay in delays(retries):
        try:
            return call()
        except Exception as error:
            if not is_transient(error):
                raise
            log.warning("%s: %s; trying again in %g s", what, error, delay)
        time.sleep(delay)
    return call()
