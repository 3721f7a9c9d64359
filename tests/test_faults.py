"""The fault shim itself (tests/faults.py), in real child processes: before a test of a retry trusts an EIO to
happen exactly n times, each read route Python and its libraries take must be shown to fail, and to recover."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults import fault_env, lock_fault_env, tokens_left

# Reads `path` by one route up to `tries` times; answers the errno of each failure and what was read at last.
READER = """
import ctypes, json, os, sys
path, how, tries = sys.argv[1], sys.argv[2], int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
def once():
    if how == "read":
        with open(path, "rb") as handle:
            return handle.read()
    fd = os.open(path, os.O_RDONLY)
    try:
        if how == "os.pread":
            return os.pread(fd, 100, 0)
        buffer = bytearray(os.fstat(fd).st_size)
        if how == "readv":
            os.readv(fd, [buffer])
        elif how == "preadv":
            os.preadv(fd, [buffer], 0)
        else:  # by symbol: libarrow and DuckDB import `pread`, Python `pread64`
            carrier = ctypes.create_string_buffer(len(buffer))
            if getattr(libc, how[len("libc."):])(fd, carrier, len(buffer), ctypes.c_long(0)) < 0:
                raise OSError(ctypes.get_errno(), how)
            buffer[:] = carrier.raw
        return bytes(buffer)
    finally:
        os.close(fd)
errors = []
for _ in range(tries):
    try:
        data = once()
        break
    except OSError as error:
        errors.append(error.errno)
else:
    data = b""
print(json.dumps({"errors": errors, "data": data.decode()}))
"""


def start(env: dict[str, str], path: Path, how: str = "read", tries: int = 10) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", READER, str(path), how, str(tries)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        text=True,
    )


def answer(child: subprocess.Popen[str]) -> dict:
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    return json.loads(out)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "target.bin"
    path.write_bytes(b"hello")
    return path


@pytest.mark.parametrize("how", ["read", "os.pread", "readv", "preadv", "libc.pread", "libc.pread64"])
def test_reads_fail_exactly_times_then_succeed(tmp_path: Path, target: Path, how: str) -> None:
    env = fault_env(str(target), 3, tokens_dir=tmp_path / "tokens")
    assert tokens_left(tmp_path / "tokens") == 3
    assert answer(start(env, target, how)) == {"errors": [errno.EIO] * 3, "data": "hello"}
    assert tokens_left(tmp_path / "tokens") == 0


def test_other_files_never_fail(tmp_path: Path, target: Path) -> None:
    other = tmp_path / "other.bin"
    other.write_bytes(b"fine")
    env = fault_env(str(target), 3, tokens_dir=tmp_path / "tokens")
    assert answer(start(env, other)) == {"errors": [], "data": "fine"}
    assert tokens_left(tmp_path / "tokens") == 3


def test_errno_is_chosen(tmp_path: Path, target: Path) -> None:
    env = fault_env(target.name, 2, errno.ESTALE, tokens_dir=tmp_path / "tokens")
    assert answer(start(env, target, "os.pread")) == {"errors": [errno.ESTALE] * 2, "data": "hello"}


def test_tokens_are_shared_by_processes(tmp_path: Path, target: Path) -> None:
    env = fault_env(str(target), 3, tokens_dir=tmp_path / "tokens")
    results = [answer(child) for child in [start(env, target), start(env, target, "os.pread")]]
    assert sum(len(result["errors"]) for result in results) == 3
    assert all(result["data"] == "hello" for result in results)


def test_tokens_are_shared_by_threads(tmp_path: Path, target: Path) -> None:
    code = """
import os, sys, threading
failures = []
def reader():
    for _ in range(50):
        try:
            os.pread(fd, 5, 0)
        except OSError as error:
            failures.append(error.errno)
fd = os.open(sys.argv[1], os.O_RDONLY)
threads = [threading.Thread(target=reader) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(len(failures), set(failures))
"""
    env = {**os.environ, **fault_env("target", 20, tokens_dir=tmp_path / "tokens")}
    out = subprocess.run([sys.executable, "-c", code, str(target)], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split(maxsplit=1) == ["20", "{5}\n"]


def test_locks_fail_and_other_fcntl_passes(tmp_path: Path) -> None:
    code = """
import errno, fcntl, struct, sys
with open(sys.argv[1], "a") as handle:
    assert fcntl.fcntl(handle, fcntl.F_GETFL) & 0o2000  # O_APPEND: arguments reach the real fcntl
    fcntl.fcntl(handle, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    assert fcntl.fcntl(handle, fcntl.F_GETFD) == fcntl.FD_CLOEXEC
    found = []
    for attempt in [
        lambda: fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0),
        # byte 1: lockf's process lock on byte 0 would refuse an open file description's lock on it
        lambda: fcntl.fcntl(handle, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 1, 1, 0)),
    ]:
        try:
            attempt()
            found.append(None)
        except OSError as error:
            found.append(error.errno)
print(found)
"""
    path = str(tmp_path / "lock")
    for env, expected in [({}, "[None, None]"), (lock_fault_env(), f"[{errno.ENOLCK}, {errno.ENOLCK}]")]:
        out = subprocess.run(
            [sys.executable, "-c", code, path], env={**os.environ, **env}, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected
