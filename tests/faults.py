"""Real system-call faults for the tests: an LD_PRELOAD shim that makes a child's reads fail with EIO or ESTALE.

Transient errors come from the kernel, under Pillow, pyarrow and DuckDB as much as under our own code: a
mock of one Python function would miss every read made elsewhere. The shim wraps libc's read family in the
child and fails a read of a matching file while tokens are left. Tokens are files in one folder; a read
takes one by unlinking it, which succeeds for exactly one process, so a pool of workers shares one count.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import subprocess
import tempfile

# fd -> path by /proc/self/fd; tokens found with getdents64 (no malloc, no read) and taken with unlinkat.
# Taking any numbered file, not "the next one", needs no count: a scan by name could not tell a taken
# token from one past the last. Nothing here calls read, so the wrappers cannot recurse.
SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static void *next(const char *name, void **slot) {
    void *found = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    if (!found) { found = dlsym(RTLD_NEXT, name); __atomic_store_n(slot, found, __ATOMIC_RELEASE); }
    return found;
}
#define NEXT(name) ((__typeof__(&name))next(#name, &slot_##name))

static int take_token(const char *folder) {
    int dir = open(folder, O_RDONLY | O_DIRECTORY | O_CLOEXEC), taken = 0;
    char entries[1024] __attribute__((aligned(8)));
    long got;
    if (dir < 0) return 0;
    while (!taken && (got = syscall(SYS_getdents64, dir, entries, sizeof entries)) > 0) {
        for (long at = 0; at < got && !taken;) {
            const char *name = entries + at + 19;  /* d_ino 8, d_off 8, d_reclen 2, d_type 1 */
            unsigned short length;
            memcpy(&length, entries + at + 16, sizeof length);
            at += length;
            const char *c = name;
            while (*c >= '0' && *c <= '9') c++;
            taken = c != name && !*c && unlinkat(dir, name, 0) == 0;
        }
    }
    close(dir);
    return taken;
}

static int number(const char *name, int otherwise) {
    const char *text = getenv(name);
    int value = text ? atoi(text) : 0;
    return value > 0 ? value : otherwise;
}

static int read_fails(int fd) {
    const char *match = getenv("BATCH_FAULT_MATCH"), *folder = getenv("BATCH_FAULT_TOKENS");
    if (!match || !*match || !folder || fd < 0) return 0;
    int saved = errno, fails = 0;
    char link[32] = "/proc/self/fd/", digits[12], path[4096];
    int n = 0, end = strlen(link);
    do digits[n++] = '0' + fd % 10; while (fd /= 10);
    while (n) link[end++] = digits[--n];
    link[end] = 0;
    ssize_t length = readlink(link, path, sizeof path - 1);
    if (length > 0) { path[length] = 0; fails = strstr(path, match) && take_token(folder); }
    errno = fails ? number("BATCH_FAULT_ERRNO", EIO) : saved;
    return fails;
}

static int lock_fails(int cmd) {
    if (cmd != F_SETLK && cmd != F_SETLKW && cmd != F_OFD_SETLK && cmd != F_OFD_SETLKW) return 0;
    const char *text = getenv("BATCH_FAULT_LOCK_ERRNO");
    if (!text || !*text) return 0;
    errno = number("BATCH_FAULT_LOCK_ERRNO", ENOLCK);
    return 1;
}

#define WRAP(type, name, params, ...) \
    static void *slot_##name; \
    type name params { \
        if (read_fails(fd)) return -1; \
        if (!NEXT(name)) { errno = ENOSYS; return -1; } \
        return NEXT(name)(fd, __VA_ARGS__); \
    }
WRAP(ssize_t, read, (int fd, void *buf, size_t n), buf, n)
WRAP(ssize_t, pread, (int fd, void *buf, size_t n, off_t at), buf, n, at)
WRAP(ssize_t, pread64, (int fd, void *buf, size_t n, off64_t at), buf, n, at)
WRAP(ssize_t, readv, (int fd, const struct iovec *v, int n), v, n)
WRAP(ssize_t, preadv, (int fd, const struct iovec *v, int n, off_t at), v, n, at)
WRAP(ssize_t, preadv64, (int fd, const struct iovec *v, int n, off64_t at), v, n, at)
WRAP(ssize_t, preadv2, (int fd, const struct iovec *v, int n, off_t at, int flags), v, n, at, flags)
WRAP(ssize_t, preadv64v2, (int fd, const struct iovec *v, int n, off64_t at, int flags), v, n, at, flags)

#define WRAP_FCNTL(name) \
    static void *slot_##name; \
    int name(int fd, int cmd, ...) { \
        va_list rest; va_start(rest, cmd); void *arg = va_arg(rest, void *); va_end(rest); \
        if (lock_fails(cmd)) return -1; \
        if (!NEXT(name)) { errno = ENOSYS; return -1; } \
        return NEXT(name)(fd, cmd, arg); \
    }
WRAP_FCNTL(fcntl)
WRAP_FCNTL(fcntl64)
"""


@functools.cache
def shim() -> str:
    """The compiled shim's path, built once per source text; racing builders each replace it atomically."""
    folder = os.path.join(tempfile.gettempdir(), f"batch-faults-{hashlib.sha256(SOURCE.encode()).hexdigest()[:16]}")
    library = os.path.join(folder, "faults.so")
    if not os.path.exists(library):
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            source, built = os.path.join(scratch, "faults.c"), os.path.join(scratch, "faults.so")
            with open(source, "w") as handle:
                handle.write(SOURCE)
            subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", built, source, "-ldl"], check=True)
            os.replace(built, library)
    return library


def _preload() -> str:
    """The shim first, then whatever this process already preloads (a sanitizer, say)."""
    return ":".join(filter(None, [shim(), os.environ.get("LD_PRELOAD")]))


def fault_env(match: str, times: int, error: int = errno.EIO, *, tokens_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Variables for a child whose next `times` reads of any file whose path contains `match` fail with
    `error`, counted over the child and everything it starts. Existing tokens in `tokens_dir` are replaced."""
    os.makedirs(tokens_dir, exist_ok=True)
    for name in os.listdir(tokens_dir):
        if name.isdigit():
            os.unlink(os.path.join(tokens_dir, name))
    for number in range(times):
        open(os.path.join(tokens_dir, str(number)), "x").close()
    return {
        "LD_PRELOAD": _preload(),
        "BATCH_FAULT_MATCH": match,
        "BATCH_FAULT_TOKENS": os.fspath(tokens_dir),
        "BATCH_FAULT_ERRNO": str(error),
    }


def tokens_left(tokens_dir: str | os.PathLike[str]) -> int:
    """How many of the faults are still to happen."""
    return sum(name.isdigit() for name in os.listdir(tokens_dir))


def lock_fault_env(error: int = errno.ENOLCK) -> dict[str, str]:
    """Variables for a child on a file system without POSIX locks: every fcntl lock request fails with
    `error`. flock() is left alone."""
    return {"LD_PRELOAD": _preload(), "BATCH_FAULT_LOCK_ERRNO": str(error)}
